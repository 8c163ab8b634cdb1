"""What a build may write or delete: `<out>` only when it is forgekit's, and the names beside it
(`<out>.staging`, `<out>.build-lock`, `<out>.lock.json`) only when they hold forgekit's own files.

The publish step replaces `<out>` wholesale, so before any work (when the dodo loads the recipe)
and again right before the swap, `<out>` must be absent, an empty directory, or a directory holding
a forgekit manifest. It must also never be, contain, or (for the cache and source directories) lie
inside a place a build must not replace: `/`, the home directory, the cache, a local source, the
recipe's directory. Sibling names are inspected with `lstat` and never followed: a symlink, or a
file forgekit did not make, at one of them is refused with one line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import ForgeError

STAGING, BUILD_LOCK, SOURCES_LOCK = ".staging", ".build-lock", ".lock.json"
MANIFEST = ".forgekit/manifest.json"   # inside a published output dir (also cache.MANIFEST)


class OwnershipError(ForgeError):
    """A path the build would write or delete is not forgekit's."""


def sibling(out: Path, suffix: str) -> Path:
    """`<out><suffix>`, beside the output dir."""
    out = Path(out)
    return out.with_name(out.name + suffix)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _real_dir(path: Path) -> bool:
    st = _lstat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def holds_manifest(directory: Path) -> bool:
    """A real directory whose `.forgekit/manifest.json` is a regular file holding a JSON object."""
    manifest = Path(directory) / MANIFEST
    st = _lstat(manifest)
    if not (_real_dir(directory) and _real_dir(manifest.parent) and st is not None and stat.S_ISREG(st.st_mode)):
        return False
    try:
        return isinstance(json.loads(manifest.read_bytes()), dict)
    except (OSError, ValueError):
        return False


def not_ours(out: Path) -> str:
    return f"{out} exists and is not a forgekit output; choose another output.dir or remove it"


def check_output_contents(out: Path) -> None:
    """`<out>` is absent, an empty directory, or a forgekit output (never followed if a symlink)."""
    st = _lstat(out)
    if st is None:
        parent = next(p for p in Path(out).parents if os.path.lexists(p))
        if not os.path.isdir(parent):
            raise OwnershipError(f"{out} cannot be created: {parent} is not a directory; choose another output.dir")
        return
    if stat.S_ISLNK(st.st_mode):
        raise OwnershipError(f"{out} is a symlink; forgekit does not write through links: "
                             f"choose another output.dir or remove it")
    if not stat.S_ISDIR(st.st_mode):
        raise OwnershipError(not_ours(out))
    if holds_manifest(out):
        return
    try:
        empty = not any(os.scandir(out))
    except OSError as exc:
        raise OwnershipError(f"{out}: cannot read the output dir ({exc.strerror})") from None
    if not empty:
        raise OwnershipError(not_ours(out))


def _protected(recipe) -> list[tuple[str, Path, bool]]:
    """(what, path, output may not lie inside it) for every place the output dir must keep clear of."""
    from .cache import cache_root

    places = [("the file system root", Path("/"), False), ("your home directory", Path.home(), False)]
    places += [(f"source '{role}'", Path(spec.path), True) for role, spec in recipe.sources.items()
               if spec.path is not None]
    places.append(("the forgekit cache", cache_root(), True))
    for f in recipe.recipe_files or ((recipe.recipe_file,) if recipe.recipe_file else ()):
        places.append(("the recipe's directory", Path(f).parent, False))
    return places


def _where(recipe) -> str:
    """'file:line: key' of what decides the output dir (output.dir, else name)."""
    from .recipe import recipe_line

    key = ("output", "dir") if recipe.output.dir else ("name",)
    label = "output.dir" if recipe.output.dir else "name (output dir build/<name>)"
    if not recipe.recipe_file:
        return label
    try:
        return f"{recipe_line(recipe, *key)}: {label}"
    except ForgeError:
        return f"{recipe.recipe_file}: {label}"


def check_output_location(recipe) -> Path:
    """The resolved output dir, unless it is or holds a protected place (or lies in the cache or a source).

    The build replaces its output dir wholesale, so this runs before any work (and at plan time)."""
    out = recipe.output_dir().resolve()
    for what, place, not_inside in _protected(recipe):
        place = place.resolve()
        if what.startswith("source ") and (out == place or out in place.parents or place in out.parents):
            problem = f"overlaps {what} ({place})"
        elif out == place:
            problem = f"is {what}"
        elif out in place.parents:
            problem = f"contains {what} ({place})"
        elif not_inside and place in out.parents:
            problem = f"lies inside {what} ({place})"
        else:
            continue
        raise OwnershipError(f"{_where(recipe)} {out} {problem}; the build replaces its output dir, "
                             f"so choose another output.dir")
    return out


def check_siblings(out: Path) -> None:
    """`<out>.staging`, `<out>.build-lock`, `<out>.lock.json`: absent or forgekit's, never symlinks."""
    for suffix in (STAGING, BUILD_LOCK, SOURCES_LOCK):
        path = sibling(out, suffix)
        st = _lstat(path)
        if st is None:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise OwnershipError(f"{path} is a symlink; forgekit never writes through one: remove it and run again")
        if suffix == STAGING:
            check_staging(path)
        elif not stat.S_ISREG(st.st_mode):
            raise OwnershipError(f"{path} exists and is not a forgekit file; remove it and run again")
        elif suffix == SOURCES_LOCK:
            from .lock import read_lock

            read_lock(path)


def check_staging(staging: Path) -> None:
    """A staging dir forgekit made (it has `.forgekit/`), an empty one, or nothing."""
    st = _lstat(staging)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OwnershipError(f"{staging} is a symlink; forgekit never writes through one: remove it and run again")
    if stat.S_ISDIR(st.st_mode) and (_real_dir(staging / ".forgekit") or not any(os.scandir(staging))):
        return
    raise OwnershipError(f"{staging} exists and is not a forgekit staging dir; remove it and run again")


def check_output(recipe) -> Path:
    """Everything a build checks before any work: location, `<out>` itself, its sibling names."""
    out = check_output_location(recipe)
    try:
        check_output_contents(out)
    except OwnershipError as exc:
        raise OwnershipError(f"{_where(recipe)}: {exc}") from None
    check_siblings(out)
    return out


def open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    """os.open that refuses a symlink or a non-regular file at `path` (one line, never followed)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as exc:
        if _lstat(path) is not None and stat.S_ISLNK(os.lstat(path).st_mode):
            raise OwnershipError(f"{path} is a symlink; forgekit never writes through one: "
                                 f"remove it and run again") from None
        if isinstance(exc, IsADirectoryError):
            raise OwnershipError(f"{path} exists and is not a forgekit file; remove it and run again") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OwnershipError(f"{path} exists and is not a forgekit file; remove it and run again")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return fd
