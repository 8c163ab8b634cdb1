"""Lock file: what a recipe's sources resolved to, so a later build can insist on the same.

Location: `<output dir>.lock.json`, next to the output directory (for `output.dir:
../build/qwythos-9b` that is `build/qwythos-9b.lock.json`). It sits beside the artifact it
describes, survives the output swap of every rebuild, and never writes into a recipes
directory (which may be read-only or shared by several machines). Copy it next to the
recipe if you want to version it; `forgekit lock RECIPE --check` / `locked=1` read it from
the output side.

Content (JSON, stable key order, no timestamps, so an unchanged build rewrites nothing):

    {"lock_version": 1, "recipe": NAME,
     "sources": {ROLE: {"repo"|"path": ..., "revision", "commit", "file", "fetch",
                        "remote": {"size", "etag"},          # byte-range GGUF only
                        "files": {NAME: {"xxh3": ..., "size": ...}}}}}

`files` lists every file the source contributes (weight files opened, and for the body
its config.json and the copied tokenizer files), with xxh3_128 digests (memoised by stat,
so this costs nothing for an unchanged source).

`check_lock(plan)` (used by `doit build recipe=X locked=1` and `forgekit ... --locked`)
refuses when the sources moved: a hub revision now resolves to another commit, a recipe
names another repo/file/path, or a local source file's digest changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ForgeError, OwnershipError
from ..fileio import atomic_write_bytes
from .memo import StatMemo
from .names import SOURCES_LOCK, sibling
from .outputs import copied_files

LOCK_VERSION = 1
LOCATION_KEYS = ("repo", "path", "file", "revision")
RECOVER = "remove it and build once without --locked (or run `forgekit lock RECIPE`) to record the sources again"


class LockError(ForgeError):
    """The sources differ from the lock file (or there is no lock file to compare with)."""


def lock_path(recipe) -> Path:
    return sibling(recipe.output_dir(), SOURCES_LOCK)


def _source_files(plan, role: str, source) -> dict[str, Path]:
    """name -> path of every file this source contributes to the build."""
    root = source.root
    files: dict[str, Path] = {}
    for f in source.files:
        f = Path(f)
        name = f.relative_to(root).as_posix() if root is not None and f.is_relative_to(root) else f.name
        files[name] = f
    if role == "body":
        if root is not None and (root / "config.json").is_file():
            files["config.json"] = root / "config.json"
        files.update(copied_files(plan))
    return dict(sorted(files.items()))


def lock_data(plan) -> dict:
    """The lock content for a plan whose sources are open."""
    memo = StatMemo()
    provenance = {p["role"]: p for p in plan.provenance}
    sources = {}
    for role, source in plan.sources.items():
        prov = provenance.get(role, {})
        entry = {k: prov[k] for k in ("repo", "path", "revision", "commit", "file", "fetch") if k in prov}
        if "remote" in prov:
            entry["remote"] = {k: prov["remote"][k] for k in ("size", "etag") if k in prov["remote"]}
        entry["files"] = {name: {"xxh3": memo.digest(p), "size": p.stat().st_size}
                          for name, p in _source_files(plan, role, source).items()}
        sources[role] = entry
    return {"lock_version": LOCK_VERSION, "recipe": plan.recipe.name, "sources": sources}


def _dumps(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_lock(plan, path: Path | None = None) -> Path:
    """Record the plan's sources; leaves an identical lock file untouched."""
    path = path or lock_path(plan.recipe)
    data = _dumps(lock_data(plan))
    if path.is_symlink():  # atomic_write_bytes would replace the link, but a planted link is refused
        raise OwnershipError(f"{path} is a symlink; forgekit never writes through one: remove it and run again")
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def read_lock(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LockError(f"no lock file {path}: build once without --locked (or run `forgekit lock RECIPE`) "
                        f"to record the sources") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise LockError(f"{path}: not a readable lock file ({reason}); {RECOVER}") from None
    if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION or not isinstance(data.get("sources"), dict):
        raise LockError(f"{path}: not a forgekit lock file (version {LOCK_VERSION}); {RECOVER}")
    return data


def check_replaceable(path: Path) -> None:
    """`forgekit lock` replaces only a forgekit lock file, and never follows a link at its name."""
    if path.is_symlink():
        raise OwnershipError(f"{path} is a symlink; forgekit never writes through one: remove it and run again")
    if path.exists():
        read_lock(path)


def _short(sha: str | None) -> str:
    return (sha or "?")[:12]


def lock_differences(locked: dict, current: dict) -> list[str]:
    """Human-readable reasons why `current` sources differ from `locked` ones (empty: same)."""
    diffs = []
    old_sources, new_sources = locked.get("sources", {}), current.get("sources", {})
    for role in sorted(set(old_sources) | set(new_sources)):
        old, new = old_sources.get(role), new_sources.get(role)
        if old is None or new is None:
            diffs.append(f"source '{role}' is {'new' if old is None else 'no longer in the recipe'}")
            continue
        moved_location = [k for k in LOCATION_KEYS if old.get(k) != new.get(k)]
        if moved_location:
            k = moved_location[0]
            diffs.append(f"{role}: {k} is now {new.get(k)!r}, the lock has {old.get(k)!r}")
            continue
        if "repo" in new:
            where = f"{new['repo']}@{new.get('revision', 'main')}"
            if old.get("commit") != new.get("commit"):
                diffs.append(f"{role}: {where} now resolves to commit {_short(new.get('commit'))}, "
                             f"the lock has {_short(old.get('commit'))}")
                continue
            if old.get("remote", {}).get("etag") and new.get("remote", {}).get("etag") and \
                    old["remote"]["etag"] != new["remote"]["etag"]:
                diffs.append(f"{role}: {new.get('file')} has etag {_short(new['remote']['etag'])}, "
                             f"the lock has {_short(old['remote']['etag'])}")
                continue
            # Same commit: the content is the same by construction; compare files both sides hold
            # (a cached copy that no longer hashes to the lock's digest is corrupt).
            names = sorted(set(old.get("files", {})) & set(new.get("files", {})))
        else:
            names = sorted(set(old.get("files", {})) | set(new.get("files", {})))
        for name in names:
            a, b = old.get("files", {}).get(name), new.get("files", {}).get(name)
            if a is None:
                diffs.append(f"{role}: file {name} is new (not in the lock)")
            elif b is None:
                diffs.append(f"{role}: file {name} is in the lock but no longer in the source")
            elif a.get("xxh3") != b.get("xxh3"):
                diffs.append(f"{role}: file {name} changed (xxh3 {_short(b.get('xxh3'))}, "
                             f"the lock has {_short(a.get('xxh3'))})")
    return diffs


def check_lock(plan, path: Path | None = None) -> Path:
    """Raise LockError unless the plan's sources are exactly those the lock records."""
    path = path or lock_path(plan.recipe)
    diffs = lock_differences(read_lock(path), lock_data(plan))
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise LockError(f"sources moved since {path} was written: {shown} (--locked refuses to build; "
                        f"rebuild without it to accept the new sources, or pin 'revision:' to a commit)")
    return path
