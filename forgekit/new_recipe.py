"""`forgekit new`: write a recipe for a finetune from two source arguments (paths or hub ids)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from .errors import ForgeError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# org/name[/file.gguf][@revision]
HUB_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[^@]+))?(?:@(?P<rev>[\w./-]+))?")


def _source_spec(value: str, role: str) -> dict:
    """A CLI source argument -> a recipe source mapping."""
    path = Path(value).expanduser()
    if path.exists():
        return {"path": str(path.resolve())}
    m = HUB_RE.fullmatch(value)
    if m:
        spec = {"repo": m.group("repo"), "revision": m.group("rev") or "main"}
        if m.group("file"):
            spec["file"] = m.group("file")
        return spec
    raise ForgeError(f"--{role} {value}: neither an existing path nor an HF repo (org/name[/file.gguf][@revision])")


def _is_gguf(spec: dict) -> bool:
    return (spec.get("path") or spec.get("file") or "").endswith(".gguf")


def _flow(spec: dict) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in spec.items()) + "}"


def recipe_text(name: str, base: str, body: dict, mtp: dict, output: str | None, description: str) -> str:
    lines = ["# Recipe written by `forgekit new`. Check it with `forgekit validate` / `forgekit plan`,",
             f"# build it with `forgekit build {name}`. Everything not named here comes from {base}.",
             f"extends: {base}", f"name: {name}"]
    if description:
        lines.append(f"description: {json.dumps(description)}")
    lines += ["sources:", f"  body: {_flow(body)}",
              f"  mtp:  {_flow(mtp)}" + ("" if _is_gguf(mtp) else "   # head in HF convention (mtp.* keys)")]
    if output:
        lines.append(f"output: {{dir: {json.dumps(output)}}}")
    return "\n".join(lines) + "\n"


def new_recipe(args, validate) -> tuple[Path, str, dict | None]:
    """Write the recipe `args` describe; `validate(path)` plans it first (its report is returned).
    Nothing is written under the final name unless it validates (or validation is off)."""
    if not NAME_RE.fullmatch(args.name):
        raise ForgeError(f"recipe name '{args.name}' must be letters, digits, '.', '_' or '-' (it names the file)")
    body = _source_spec(args.body, "body")
    mtp = dict(body) if args.mtp == "body" else _source_spec(args.mtp, "mtp")
    if not _is_gguf(mtp):
        mtp["table"] = "mtp_hf"
    if "file" in body:
        raise ForgeError(f"--body {args.body}: the body is a model repo or directory, not a single file")
    target = (Path(args.out) if args.out else Path(args.dir) / f"{args.name}.yaml").resolve()
    if target.exists() and not args.force:
        raise ForgeError(f"{target} already exists (use --force to overwrite)")
    output = str(Path(args.output).expanduser().resolve()) if args.output else None
    text = recipe_text(args.name, args.base, body, mtp, output, args.description or "")
    created = _missing_dirs(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.stem}.new-{os.getpid()}.yaml"  # validated before it takes the name
    report = None
    done = False
    try:
        tmp.write_text(text)
        if not args.no_validate:
            try:
                report = validate(tmp)
            except ForgeError as exc:
                msg = str(exc).replace(str(tmp), str(target))
                raise type(exc)(f"{msg} [recipe not written; fix the sources or pass --no-validate]") from None
        os.replace(tmp, target)
        done = True
    finally:
        tmp.unlink(missing_ok=True)
        for d in created if not done else ():  # a refused recipe leaves no empty recipes/ behind
            with contextlib.suppress(OSError):
                d.rmdir()
    return target, text, report


def _missing_dirs(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing
