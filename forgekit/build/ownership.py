"""What a build may write or delete: `<out>` only when it is forgekit's, and the names beside it
(`<out>.staging`, `<out>.build-lock`, `<out>.lock.json`) only when they hold forgekit's own files.

The publish step replaces `<out>` wholesale, so before any work (when the dodo loads the recipe)
and again right before the swap, `<out>` must be absent, an empty directory, or a directory holding
a forgekit manifest (and it must not be a protected place: plan/location.py). Sibling names are
inspected with `lstat` and never followed: a symlink, or a file forgekit did not make, at one of
them is refused with one line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import OwnershipError
from ..plan.location import check_output_location, where_output_is_decided
from .lock import read_lock
from .names import BUILD_LOCK, SOURCES_LOCK, STAGING, holds_manifest, lstat_or_none, real_dir, sibling


def not_ours(out: Path) -> str:
    return f"{out} exists and is not a forgekit output; choose another output.dir or remove it"


def check_output_contents(out: Path) -> None:
    """`<out>` is absent, an empty directory, or a forgekit output (never followed if a symlink)."""
    st = lstat_or_none(out)
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


def check_siblings(out: Path) -> None:
    """`<out>.staging`, `<out>.build-lock`, `<out>.lock.json`: absent or forgekit's, never symlinks."""
    for suffix in (STAGING, BUILD_LOCK, SOURCES_LOCK):
        path = sibling(out, suffix)
        st = lstat_or_none(path)
        if st is None:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise OwnershipError(f"{path} is a symlink; forgekit never writes through one: remove it and run again")
        if suffix == STAGING:
            check_staging(path)
        elif not stat.S_ISREG(st.st_mode):
            raise OwnershipError(f"{path} exists and is not a forgekit file; remove it and run again")
        elif suffix == SOURCES_LOCK:
            read_lock(path)


def check_staging(staging: Path) -> None:
    """A staging dir forgekit made (it has `.forgekit/`), an empty one, or nothing."""
    st = lstat_or_none(staging)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OwnershipError(f"{staging} is a symlink; forgekit never writes through one: remove it and run again")
    if stat.S_ISDIR(st.st_mode) and (real_dir(staging / ".forgekit") or not any(os.scandir(staging))):
        return
    raise OwnershipError(f"{staging} exists and is not a forgekit staging dir; remove it and run again")


def check_output(recipe) -> Path:
    """Everything a build checks before any work: location, `<out>` itself, its sibling names."""
    out = check_output_location(recipe)
    try:
        check_output_contents(out)
    except OwnershipError as exc:
        raise OwnershipError(f"{where_output_is_decided(recipe)}: {exc}") from None
    check_siblings(out)
    return out
