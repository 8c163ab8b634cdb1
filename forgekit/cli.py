"""`forgekit` command line: build, validate, plan, inspect, new, lock, verify, cache, publish.

Every user-fixable problem is a ForgeError: one line `forgekit: ...` on stderr, exit 2.
`forgekit build` runs the doit task graph of dodo.py through doit's API (doit_main.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

from .errors import ForgeError




# ---------------------------------------------------------------- output helpers


def _console(stream=None):
    from rich.console import Console

    stream = stream or sys.stdout
    # A pipe or file gets whole rows (tables are as wide as their content); a terminal its width.
    width = None if stream.isatty() else 400
    return Console(file=stream, width=width, soft_wrap=False, highlight=False)


def _table(**kw):
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left", **kw)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _where(src: dict) -> str:
    if src.get("path"):
        return f"path {src['path']}"
    text = f"repo {src['repo']}@{src.get('revision', 'main')}"
    if src.get("commit"):
        text += f" (commit {src['commit'][:12]})"
    if src.get("file"):
        text += f" file {src['file']}"
    if src.get("fetch") == "ranges":
        text += " [byte ranges]"
    return text


# ---------------------------------------------------------------- plan / validate


def _plan(recipe_ref: str, locked: bool = False):
    from .plan import make_plan
    from .recipe import load_recipe

    plan = make_plan(load_recipe(recipe_ref))
    if locked:
        from .build.lock import check_lock

        check_lock(plan)
    return plan


def cmd_validate(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    result = {"valid": True, "recipe": recipe.name, "recipe_file": recipe.recipe_file,
              "recipe_chain": list(recipe.recipe_files), "output_dir": str(recipe.output_dir()),
              "checked": "schema" if args.schema_only else "schema+sources"}
    if not args.schema_only:
        from .plan.report import plan_report

        from .verify.prompts import check_prompts
        plan = _plan(args.recipe, args.locked)
        report, result["prompts_checked"] = plan_report(plan), check_prompts(plan)  # tokenizer covers prompts
        result.update({k: report[k] for k in ("sources", "files", "tensor_count", "total_bytes", "dropped", "warnings")})
    if args.json:
        _print_json(result)
        return 0
    chain = " -> ".join(Path(f).name for f in recipe.recipe_files)
    print(f"ok: recipe '{recipe.name}' is valid ({recipe.recipe_file})")
    print(f"  chain:   {chain}")
    print(f"  output:  {result['output_dir']}")
    if args.schema_only:
        print("  sources: not opened (--schema-only)")
        return 0
    for s in result["sources"]:
        print(f"  source {s['role']}: {_where(s)}: {s['tensors']} tensors, {s['mapped']} mapped, {s['dropped']} dropped")
    files = ", ".join(f"{n} ({f['tensors']} tensors, {human(f['bytes'])})" for n, f in result["files"].items())
    print(f"  output files: {files}")
    for w in result["warnings"]:
        print(f"  warning: {w}")
    return 0


def cmd_plan(args) -> int:
    from .plan.report import plan_report

    report = plan_report(_plan(args.recipe, args.locked))
    if args.json:
        _print_json(report)
        return 0
    con = _console()
    con.print(f"plan for recipe '{report['recipe']}' ({report['recipe_file']}) -> {report['output_dir']}")
    for s in report["sources"]:
        line = f"  source {s['role']}: {_where(s)}: {s['tensors']} tensors ({s['mapped']} mapped, {s['dropped']} dropped"
        dropped = report["dropped"].get(s["role"], {})
        if dropped:
            line += ": " + ", ".join(f"{n} by '{r}'" for r, n in sorted(dropped.items()))
        con.print(line + ")", markup=False)
        if s.get("remote", {}).get("header_bytes") is not None:
            r = s["remote"]
            con.print(f"    byte ranges: header {human(r['header_bytes'])} + {r['fetched_tensors']} tensors "
                      f"{human(r['fetched_bytes'])} of a {human(r['size'] or 0)} file", markup=False)
    if not args.summary:
        for name, info in report["files"].items():
            table = _table(title=f"{name}  ({info['tensors']} tensors, {human(info['bytes'])}"
                                 f"{', indexed' if info['indexed'] else ', sidecar: not in the index'})", show_footer=True)
            rows = [r for r in report["tensors"] if r["file"] == name]
            table.add_column("output tensor", footer="total", no_wrap=True)
            table.add_column("source", no_wrap=True)
            table.add_column("transforms")
            table.add_column("quantization")
            table.add_column("shape")
            table.add_column("bytes", justify="right", footer=str(info["bytes"]))
            for r in rows:
                src = r["source"] + (f" [{r['stored_as']}]" if r["stored_as"] else "")
                quant = r["quant"] if r["quant_rule"] in ("default", "not quantizable") else f"{r['quant']} ({r['quant_rule']})"
                table.add_row(r["output"], src, ", ".join(r["transforms"]) or "-", quant,
                              "x".join(map(str, r["shape"])), str(r["bytes"]))
            con.print(table, markup=False)
    totals = _table(title="totals per file", show_footer=True)
    totals.add_column("file", footer="all files")
    totals.add_column("tensors", justify="right", footer=str(report["tensor_count"]))
    totals.add_column("quantized", justify="right")
    totals.add_column("bytes", justify="right", footer=str(report["total_bytes"]))
    totals.add_column("size", justify="right", footer=human(report["total_bytes"]))
    totals.add_column("index")
    for name, info in report["files"].items():
        totals.add_row(name, str(info["tensors"]), str(info["quantized"]), str(info["bytes"]), human(info["bytes"]),
                       "indexed" if info["indexed"] else "sidecar")
    con.print(totals, markup=False)
    if report["warnings"]:
        con.print(f"warnings ({len(report['warnings'])}):")
        for w in report["warnings"]:
            con.print(f"  ! {w}", markup=False)
    else:
        con.print("warnings: none")
    return 0


# ---------------------------------------------------------------- inspect


def cmd_inspect(args) -> int:
    from .sources.inspect import inspect

    info = inspect(args.source, revision=args.revision, file=args.file, norms=args.norms, stats=args.stats)
    if args.json:
        _print_json(info)
        return 0
    con = _console()
    con.print(f"{info['source']}: {info['format']}, {len(info['files'])} file(s), {info['tensor_count']} tensors, "
              f"{human(info['total_bytes'])}", markup=False)
    if info["unread"]:
        con.print(f"  ({len(info['unread'])} more tensors listed in the index live in shards not downloaded)")
    con.print("metadata:")
    for k, v in info["metadata"].items():
        con.print(f"  {k} = {v}", markup=False)
    m = info["mtp"]
    if m.get("declared") or m.get("tensors"):
        where = f"block blk.{m['block']} " if "block" in m else ""
        types = f" ({', '.join(m['stored_as'])})" if m.get("stored_as") else ""
        con.print(f"MTP head: {where}{m['tensors']} tensors{types}", markup=False)
    else:
        con.print("MTP head: none declared")
    if m.get("note"):
        con.print(f"  ! {m['note']}", markup=False)
    if not args.summary:
        table = _table(show_footer=True)
        table.add_column("tensor", footer="total", no_wrap=True)
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("stored as")
        table.add_column("bytes", justify="right", footer=str(info["total_bytes"]))
        table.add_column("file")
        for t in info["tensors"]:
            if args.match and not re.search(args.match, t["name"]):
                continue
            table.add_row(t["name"], "x".join(map(str, t["shape"])), t["dtype"], t["stored_as"], str(t["bytes"]), t["file"])
        con.print(table, markup=False)
    if "norms" in info:
        n = info["norms"]
        block = info["mtp"].get("block")
        head_prefix = f"blk.{block}." if block is not None else "mtp."
        key = re.compile(rf"{re.escape(head_prefix)}.*|output_norm\.weight|(?:model\.language_model\.|language_model\.model\.|model\.)?norm\.weight")
        shown = {k: v for k, v in n["means"].items() if key.fullmatch(k)}
        con.print(f"norm gains (mean; head and final norm, all {len(n['means'])} with --json):")
        for k, v in shown.items():
            con.print(f"  {k} = {v}", markup=False)
        if "head" in n:
            h = n["head"]
            con.print(f"MTP head norms look {h['convention']}: max q/k norm mean {h['max_qk_norm_mean']}, "
                      f"min input/post/pre_fc mean {h['min_input_post_prefc_mean']}", markup=False)
        if "final_norm_mean" in n:
            con.print(f"final norm mean {n['final_norm_mean']}: {n['final_norm_convention']}", markup=False)
    for k, s in info.get("stats", {}).items():
        con.print(f"stats {k}: mean {s['mean']:.6g} std {s['std']:.6g} min {s['min']:.6g} max {s['max']:.6g}", markup=False)
    return 0


# ---------------------------------------------------------------- new


def cmd_new(args) -> int:
    from .new_recipe import new_recipe
    from .plan.report import plan_report

    if args.base is None:              # inspect the sources and pick the base (prints what it found)
        from .new_detect import pick_base
        args.base = pick_base(args.body, args.mtp)
    target, text, report = new_recipe(args, lambda path: plan_report(_plan(str(path))))
    print(f"wrote {target}")
    print(text.rstrip())
    if report is not None:
        print(f"validated: {report['tensor_count']} output tensors in {len(report['files'])} files "
              f"({human(report['total_bytes'])})")
    ref = args.name if target.parent == (Path.cwd() / "recipes").resolve() else str(target)
    print(f"build it: forgekit build {ref}")
    return 0


# ---------------------------------------------------------------- build


def cmd_build(args) -> int:
    from .doit_main import run_build

    extra = list(args.doit_args)
    locked = args.locked or "--locked" in extra
    return run_build(args.recipe, [a for a in extra if a != "--locked"], locked=locked)


# ---------------------------------------------------------------- lock


def cmd_lock(args) -> int:
    from .build.lock import check_lock, check_replaceable, lock_data, lock_path, write_lock
    from .plan import make_plan
    from .recipe import load_recipe

    plan = make_plan(load_recipe(args.recipe))
    path = Path(args.lock) if args.lock else lock_path(plan.recipe)
    if args.check:
        check_lock(plan, path)
        print(f"ok: sources match {path}")
        return 0
    check_replaceable(path)
    write_lock(plan, path)
    data = lock_data(plan)
    print(f"wrote {path}")
    for role, s in data["sources"].items():
        print(f"  {role}: {_where(s)}: {len(s['files'])} file(s)")
    return 0


def _existing_dir(name: str) -> Path:
    """The directory a command was given, or the one-line error if it is not one."""
    directory = Path(name)
    if not directory.is_dir():
        raise ForgeError(f"{directory}: not a directory")
    return directory


# ---------------------------------------------------------------- verify


def cmd_verify(args) -> int:
    from .build.published_dir import recorded_recipe
    from .verify import verify_directory

    directory = _existing_dir(args.directory)
    recipe = args.recipe or recorded_recipe(directory)
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        report = verify_directory(directory, recipe)
    if args.json:
        _print_json(report)
    else:
        passed = report.get("passed", True) if isinstance(report, dict) else True
        steps = ", ".join(report.get("steps", [])) if isinstance(report, dict) else ""
        print(f"{'ok' if passed else 'FAILED'}: {directory} verified against recipe {recipe} ({steps})")
    return 0


# ---------------------------------------------------------------- publish


def cmd_publish(args) -> int:
    from .hub_publish import prepare, publish, refusal

    directory = _existing_dir(args.directory)
    upload = prepare(directory, args.repo)
    if args.dry_run:
        verdict = "would publish" if not upload.problems else (
            "would publish with --force (card marked unverified)" if args.force else "would refuse")
        print(f"{verdict} {directory} to {args.repo}@{args.revision or 'main'}"
              f"{' (private)' if args.private else ''}: {len(upload.files)} file(s); commit '{upload.message}'")
        for name in upload.files:
            print(f"  {name}  {human((directory / name).stat().st_size)}")
        for problem in upload.problems:
            print(f"  ! {problem}")
        return 0 if not upload.problems or args.force else 2
    if upload.problems and not args.force:
        raise ForgeError(refusal(upload, directory))
    info = publish(upload, args.repo, private=args.private, revision=args.revision, force=args.force)
    print(f"published {directory} to {args.repo}@{args.revision or 'main'}: {len(upload.files)} file(s), "
          f"{getattr(info, 'commit_url', info)}")
    return 0


# ---------------------------------------------------------------- cache


def cmd_cache(args) -> int:
    from .build.gc import cache_gc, cache_ls, cache_verify

    root = Path(args.root) if args.root else None
    if args.action == "ls":
        rows = cache_ls(root)
        if args.json:
            _print_json(rows)
            return 0
        for r in rows:
            users = ", ".join(r["used_by"]) or "-"
            print(f"{r['key']}  {human(r['size']):>10}  {r['age_days']:6.1f}d  {r['file'] or '-':<36} "
                  f"built by {r['recipe'] or '-'}; used by {users}")
        print(f"{len(rows)} object(s), {human(sum(r['size'] for r in rows))}")
    elif args.action == "gc":
        result = cache_gc(root, older_than_days=args.older_than, dry_run=args.dry_run)
        if args.json:
            _print_json(result)
            return 0
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(result['removed'])} object(s), {human(result['freed_bytes'])}; "
              f"kept {result['kept']} ({result['leased']} leased by running builds); "
              f"temp files cleared: {result['temps_removed']}")
    else:
        bad = cache_verify(root)
        print(f"{len(bad)} corrupt object(s) removed" + (": " + ", ".join(bad) if bad else ""))
        return 1 if bad else 0
    return 0


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from .cli_parser import make_parser

    return make_parser({name[4:]: fn for name, fn in globals().items() if name.startswith("cmd_")})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from . import settings

        settings.check_all()
        return args.func(args) or 0
    except ForgeError as exc:
        print(f"forgekit: {exc}", file=sys.stderr)
        if getattr(args, "json", False) and args.command in ("validate", "plan"):
            _print_json({"valid": False, "error": str(exc), "error_type": type(exc).__name__})
        return 2
    except KeyboardInterrupt:
        print("forgekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
