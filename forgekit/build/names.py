"""The names a build owns beside and inside its output dir, and telling forgekit's own files from
anything else without following a link: `<out>.staging`, `<out>.build-lock`, `<out>.lock.json`,
and `<out>/.forgekit/manifest.json`."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import OwnershipError

STAGING, BUILD_LOCK, SOURCES_LOCK = ".staging", ".build-lock", ".lock.json"
MANIFEST = ".forgekit/manifest.json"   # inside a published output dir


def sibling(out: Path, suffix: str) -> Path:
    """`<out><suffix>`, beside the output dir."""
    out = Path(out)
    return out.with_name(out.name + suffix)


def lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def real_dir(path: Path) -> bool:
    st = lstat_or_none(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def holds_manifest(directory: Path) -> bool:
    """A real directory whose `.forgekit/manifest.json` is a regular file holding a JSON object."""
    manifest = Path(directory) / MANIFEST
    st = lstat_or_none(manifest)
    if not (real_dir(directory) and real_dir(manifest.parent) and st is not None and stat.S_ISREG(st.st_mode)):
        return False
    try:
        return isinstance(json.loads(manifest.read_bytes()), dict)
    except (OSError, ValueError):
        return False


def open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    """os.open that refuses a symlink or a non-regular file at `path` (one line, never followed)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as exc:
        if lstat_or_none(path) is not None and stat.S_ISLNK(os.lstat(path).st_mode):
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
