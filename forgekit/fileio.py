"""Low-level file writing shared by every room: temp files named by their writer's pid,
atomic replace, and telling a dead writer's leftovers from a live one's."""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
import time
from pathlib import Path

from .errors import ForgeError
from .faults import checkpoint

STALE_TEMP_SECONDS = 24 * 3600         # temp files older than this are stale even if their pid is alive


@functools.cache
def file_mode() -> int:
    """0o666 minus the process umask (read once, on first use: os.umask can only be read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def make_temp(directory: Path, name: str) -> Path:
    """A fresh temp file next to its final place, with normal (umask) permissions.

    The name carries the writer's pid (`.<name>.<pid>.<random>.tmp`) so that files left
    by a killed build can be recognised and removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.{os.getpid()}.", suffix=".tmp")
    os.fchmod(fd, file_mode())
    os.close(fd)
    return Path(tmp)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_owner(path: Path) -> int | None:
    """pid encoded in a make_temp name, or None."""
    parts = path.name.split(".")
    # ['', name..., pid, random, 'tmp']
    if len(parts) >= 5 and parts[-1] == "tmp" and parts[-3].isdigit():
        return int(parts[-3])
    return None


def stale_temp(path: Path, now: float | None = None) -> bool:
    """A temp file whose writer is gone (or which is older than a day)."""
    pid = _temp_owner(path)
    if pid == os.getpid():
        return False
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    if age > STALE_TEMP_SECONDS:
        return True
    return pid is not None and not pid_alive(pid)


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it survives a power loss once this returns)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # no directory fds here (not POSIX); the rename is as durable as the OS makes it
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot sync a dir
            raise
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> int:
    """Remove the make_temp files of `path` whose writer is gone (a build killed mid-write):
    regular files named exactly `.<name>.<pid>.<random>.tmp` next to it, never through a link."""
    removed = 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        if (entry.name.startswith(f".{path.name}.") and entry.name.endswith(".tmp")
                and _temp_owner(Path(entry.path)) is not None and entry.is_file(follow_symlinks=False)
                and stale_temp(Path(entry.path))):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def atomic_write_bytes(path: Path, data: bytes, memo: bool = False) -> None:
    """Write `path` whole or not at all (temp file, fsync, rename, fsync of the directory).
    `memo`: a file that only saves work, with a fault checkpoint of its own (forgekit/faults.py);
    the temp files a killed writer of it left are removed first (nothing else sweeps the cache root)."""
    if memo:
        remove_stale_temps(path)
    tmp = make_temp(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        checkpoint("memo.tmp-written" if memo else "atomic.tmp-written")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno:  # name the file (e.g. disk full)
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise


def atomic_write_json(path: Path, obj, memo: bool = False) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), memo)


# A full disk / quota / file size limit / read-only file system: the user's to fix, so one line.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def disk_error(exc: OSError, what: str) -> ForgeError:
    """The one-line error for a disk error (DISK_ERRORS) met while writing `what`."""
    where = exc.filename if exc.filename else what
    return ForgeError(f"cannot write {where}: {os.strerror(exc.errno)}")
