"""Leases: a running build tells gc which objects it needs (cache/leases/<pid>.json)."""

from __future__ import annotations

import atexit
import json
import os
import re
import stat
import time
from pathlib import Path

from .. import settings
from ..fileio import DISK_ERRORS, atomic_write_json, disk_error, pid_alive
from .memo import CorruptStateFile
from .store import KEY_RE, _real_dir_fd



LEASE_NAME_RE = re.compile(r"(?P<pid>[0-9]{1,10})\.json")
# This process's leases (directory -> keys) and the pid whose exit removes them: module state
# on purpose, a lease belongs to the process (removed at its exit), not to any object.
_LEASED: dict[Path, set[str]] = {}
_LEASE_PID: list[int] = []             # the pid whose exit removes them (a forked child leases anew)


def lease_dir(root: Path | None = None) -> Path:
    return (Path(root).resolve() if root else settings.cache_root()) / "leases"


def lease_objects(keys, root: Path | None = None) -> Path:
    """Tell gc that this process's build needs the objects `keys` (cache/leases/<pid>.json).

    A build writes its lease when it plans its tasks, before any object is built, so gc keeps
    both the objects it reuses and the ones it has built but not yet published. The file is
    removed when the process exits; a lease left by a killed build names a dead pid and gc
    ignores (and removes) it."""
    directory = lease_dir(root)
    keys = {k for k in keys if KEY_RE.fullmatch(k)}
    if _LEASE_PID != [os.getpid()]:
        _LEASE_PID[:] = [os.getpid()]
        _LEASED.clear()
        atexit.register(_drop_leases, os.getpid())
    held = _LEASED.setdefault(directory, set())
    held |= keys
    path = directory / f"{os.getpid()}.json"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"pid": os.getpid(), "keys": sorted(held), "created": time.time()})
    except OSError as exc:                 # a full disk is one line, like every other write
        if exc.errno in DISK_ERRORS:
            raise disk_error(exc, str(path)) from None
        raise
    return path


def _drop_leases(pid: int) -> None:
    if os.getpid() != pid:  # a forked helper exiting: the lease is its parent's
        return
    for directory in _LEASED:
        (directory / f"{pid}.json").unlink(missing_ok=True)


def leased_keys(root: Path | None = None, remove_stale: bool = True) -> set[str]:
    """Keys named by the leases of live processes; leases of dead pids are ignored (and removed).

    A lease of a live pid that cannot be read is one line (CorruptStateFile): gc cannot know
    what that build needs. A pid reused by an unrelated process keeps the objects a little
    longer, never less."""
    directory = lease_dir(root)
    fd = _real_dir_fd(directory)
    if fd is None:
        return set()
    try:
        names = sorted(os.listdir(fd))
        keys: set[str] = set()
        for name in names:
            m = LEASE_NAME_RE.fullmatch(name)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if not m or not stat.S_ISREG(st.st_mode):
                continue
            if not pid_alive(int(m["pid"])):
                if remove_stale:
                    try:
                        os.unlink(name, dir_fd=fd)
                    except OSError:
                        pass
                continue
            path = directory / name
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                data = None
            listed = data.get("keys") if isinstance(data, dict) else None
            if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
                raise CorruptStateFile(path, "not a lease record", f"remove it if process {m['pid']} is not a "
                                       "forgekit build")
            keys |= {k for k in listed if KEY_RE.fullmatch(k)}
        return keys
    finally:
        os.close(fd)
