"""The `forgekit` argument parser: every command and option, in one table-like function."""

from __future__ import annotations

import argparse

DEFAULT_BASE = "qwen3.5-dense-mtp"


def make_parser(handlers: dict) -> argparse.ArgumentParser:
    """The whole command line (handlers: command name -> function), one add_argument per option (long on purpose: it is a table,
    and splitting it would scatter the CLI's surface over several functions)."""
    p = argparse.ArgumentParser(prog="forgekit", description="Declarative builds of MTPLX-ready MLX models. "
                                "Build with `forgekit build RECIPE`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="build a recipe (incremental, cached); extra arguments go to doit",
                       description="Build RECIPE through doit: the same tasks and state as `doit build recipe=RECIPE` "
                                   "in a checkout. Extra arguments are doit's: `-n 2 -P process`, or a doit command "
                                   "instead of the build: `list --all`, `clean`, `forget`.")
    b.add_argument("recipe", help="recipe name (./recipes/NAME.yaml, then the packaged recipes) or path")
    b.add_argument("--locked", action="store_true", help="refuse if a source moved since <output>.lock.json")
    b.add_argument("doit_args", nargs=argparse.REMAINDER, help="doit options or command")
    b.set_defaults(func=handlers["build"])

    v = sub.add_parser("validate", help="check a recipe: schema, sources, every rule matches")
    v.add_argument("recipe", help="recipe name (recipes/NAME.yaml) or path")
    v.add_argument("--json", action="store_true")
    v.add_argument("--schema-only", action="store_true", help="do not open the sources")
    v.add_argument("--locked", action="store_true", help="also fail if the sources moved since the lock file")
    v.set_defaults(func=handlers["validate"])

    pl = sub.add_parser("plan", help="dry run: every output tensor, its source, transforms, quantization, bytes")
    pl.add_argument("recipe")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--summary", action="store_true", help="totals and warnings only")
    pl.add_argument("--locked", action="store_true", help="also fail if the sources moved since the lock file")
    pl.set_defaults(func=handlers["plan"])

    i = sub.add_parser("inspect", help="list tensors and metadata of a safetensors dir/file, a GGUF or a cached HF repo")
    i.add_argument("source", help="path, or org/name from the local Hugging Face cache")
    i.add_argument("--revision", help="for a repo id (default main)")
    i.add_argument("--file", help="for a repo id: one file in it, e.g. X-MTP-BF16.gguf")
    i.add_argument("--match", help="only list tensors whose name contains this regex")
    i.add_argument("--norms", action="store_true", help="read the norm gains; tell zero-centred from absolute")
    i.add_argument("--stats", metavar="REGEX", help="mean/std/min/max of tensors whose name full-matches REGEX")
    i.add_argument("--summary", action="store_true", help="no tensor table")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=handlers["inspect"])

    n = sub.add_parser("new", help="write a recipe for a finetune, extending the base recipe, and validate it")
    n.add_argument("name")
    n.add_argument("--body", required=True, help="model dir, or org/name[@revision]")
    n.add_argument("--mtp", required=True, help="GGUF path, org/name/FILE.gguf[@revision], a safetensors "
                   "dir/repo carrying mtp.* keys, or 'body' (the body's own head)")
    n.add_argument("--output", help="output directory of the build (default: build/NAME under the working dir)")
    n.add_argument("--base", help=f"recipe to extend (default: picked from the sources, else {DEFAULT_BASE})")
    n.add_argument("--dir", default="recipes", help="where to write NAME.yaml (default ./recipes)")
    n.add_argument("--out", help="exact recipe file to write (overrides --dir)")
    n.add_argument("--description")
    n.add_argument("--force", action="store_true", help="overwrite an existing recipe")
    n.add_argument("--no-validate", action="store_true", help="write without opening the sources")
    n.set_defaults(func=handlers["new"])

    lk = sub.add_parser("lock", help="record the sources' resolved commits and digests (<output>.lock.json)")
    lk.add_argument("recipe")
    lk.add_argument("--check", action="store_true", help="only compare the sources with the lock file")
    lk.add_argument("--lock", help="lock file path (default: <output dir>.lock.json)")
    lk.set_defaults(func=handlers["lock"])

    vf = sub.add_parser("verify", help="run a recipe's verify steps on an existing output directory")
    vf.add_argument("directory")
    vf.add_argument("--recipe", help="default: the recipe recorded in the directory's manifest")
    vf.add_argument("--json", action="store_true")
    vf.set_defaults(func=handlers["verify"])

    pb = sub.add_parser("publish", help="upload a verified build to the Hugging Face Hub")
    pb.add_argument("directory", help="a build's output directory")
    pb.add_argument("--repo", required=True, help="ORG/NAME on the Hub (created if missing)")
    pb.add_argument("--private", action="store_true", help="create the repo private")
    pb.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    pb.add_argument("--dry-run", action="store_true", help="list the files and the commit; upload nothing")
    pb.add_argument("--force", action="store_true", help="publish a changed or unverified build; the card says so")
    pb.set_defaults(func=handlers["publish"])

    c = sub.add_parser("cache", help="show (ls), prune (gc) or re-hash (verify) the object cache")
    c.add_argument("action", choices=["ls", "gc", "verify"])
    c.add_argument("--root", help="cache directory (default: the one builds use: "
                   "$FORGEKIT_CACHE, a checkout's cache/, else ~/.cache/forgekit)")
    c.add_argument("--older-than", type=float, metavar="DAYS", help="gc: also drop objects unused this long")
    c.add_argument("--dry-run", action="store_true", help="gc: only say what would go")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=handlers["cache"])
    return p
