"""The build lock: one process at a time works on an output directory."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from .. import settings
from ..errors import ForgeError
from ..faults import checkpoint
from .names import BUILD_LOCK, open_nofollow, sibling

# lock file -> descriptor, held until this process exits. Module state on purpose: the lock
# belongs to the process (the kernel drops it when the process ends), not to any object.
_HELD: dict[str, int] = {}


def lock_path(out: Path) -> Path:
    return sibling(out, BUILD_LOCK)


def hold_build_lock(out: Path) -> None:
    """Make this process the only one working on output dir `out` until it exits.

    An exclusive flock on `<out>.build-lock` (beside the output dir, so builds sharing an output
    exclude each other whatever cache they use; the file stays, it is never the lock itself that
    is removed). It is taken when the dodo loads the recipe, before anything is hashed or doit's
    state is read, and released by the kernel when the process ends, however it ends (SIGKILL
    included): there is no stale lock to clean up. doit's `-P process` workers are forked, so
    they share it. A second `doit build|clean|forget|list` of the same output waits for the
    first to finish (saying so on stderr), then finds the output up to date; with
    `FORGEKIT_LOCK_WAIT=<seconds>` it gives up after that long (0: at once) with one line and
    exit code 2.
    """
    path = lock_path(Path(out).resolve())
    if str(path) in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)   # a symlink planted there is refused, never followed
    try:
        _check_lock_content(fd, path)
        if not _try_lock(fd):
            limit = settings.lock_wait()
            deadline = None if limit is None else time.monotonic() + limit
            holder = _holder(fd)
            if deadline is not None and time.monotonic() >= deadline:
                raise ForgeError(f"{out}: another build is writing this output ({holder}); "
                                 f"run again when it has finished")
            print(f"forgekit: {out}: another build is writing this output ({holder}); waiting for it to finish",
                  file=sys.stderr, flush=True)
            while not _try_lock(fd):
                if deadline is not None and time.monotonic() >= deadline:
                    raise ForgeError(f"{out}: another build is still writing this output ({holder}) "
                                     f"after {limit} s; run again when it has finished")
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    _HELD[str(path)] = fd
    checkpoint("lock.held")


def _check_lock_content(fd: int, path: Path) -> None:
    """The lock file holds nothing or a pid; anything else is not ours to truncate."""
    text = os.pread(fd, 64, 0)
    if text.strip() and not text.strip().isdigit():
        raise ForgeError(f"{path} is not a forgekit build lock (it holds something other than a pid); "
                         f"remove it and run again")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {pid}" if pid.isdigit() else "another process"
