"""What dodo.py needs: doit config (xxh3 file checker, sqlite state in cache/), the build
lock, and a task generator that turns user mistakes into one clear line and exit code 2."""

from __future__ import annotations

import fcntl
import os
import sys
import time

from pathlib import Path

from doit.dependency import FileChangedChecker

from .cache import CorruptStateFile, OutputRegistry, StatMemo, cache_root, check_sqlite
from .errors import ForgeError, env_number
from .ownership import open_nofollow


class XXH3Checker(FileChangedChecker):
    """doit file_dep checker: unchanged (mtime, size) means unchanged; otherwise xxh3 decides."""

    def check_modified(self, file_path, file_stat, state):
        mtime, size, digest = state
        if (file_stat.st_mtime_ns, file_stat.st_size) == (mtime, size):
            return False
        return file_stat.st_size != size or StatMemo().digest(file_path) != digest

    def get_state(self, dep, current_state):
        st = os.stat(dep)
        if current_state and tuple(current_state[:2]) == (st.st_mtime_ns, st.st_size):
            return None
        return (st.st_mtime_ns, st.st_size, StatMemo().digest(dep))


cache_root().mkdir(parents=True, exist_ok=True)
DOIT_CONFIG = {
    "default_tasks": ["build"],
    "backend": "sqlite3",
    "dep_file": str(cache_root() / "doit-state.sqlite3"),
    "check_file_uptodate": XXH3Checker,
    "verbosity": 2,
}


def state_file(recipe_ref: str) -> Path:
    """doit's state for one output dir: cache/state/<dir name>-<xxh3 of its path>.sqlite3.

    One state file per output keeps task names short (`build:shard:model.safetensors`)
    while recipes sharing a cache never overwrite each other's recorded keys.
    """
    import xxhash

    from .recipe import load_recipe

    out = load_recipe(recipe_ref).output_dir().resolve()
    return cache_root() / "state" / f"{out.name}-{xxhash.xxh3_64_hexdigest(str(out).encode())}.sqlite3"


INTERRUPTED = ("forgekit: interrupted; the output dir is untouched (still the previous build, or already "
               "the complete new one); run again to resume\n")


def exit_cleanly_on_interrupt() -> None:
    """Ctrl-C: one line and exit code 130 instead of a KeyboardInterrupt traceback from doit.

    The process ends at once, as if killed: every step that can be interrupted is already safe
    against SIGKILL (temp names, records after renames, the atomic swap; tests/test_faults.py),
    and a rerun resumes from the cache. doit's forked `-P process` workers, which get the same
    signal from the terminal, end silently; the helper pool ignores SIGINT and exits with its parent.
    """
    import signal

    main = os.getpid()

    def interrupted(signum, frame):
        if os.getpid() == main:
            os.write(2, INTERRUPTED.encode())
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


def doit_config(recipe_ref: str) -> dict:
    """DOIT_CONFIG for `recipe=...` (a recipe error or a corrupt state file is one line on
    stderr and exit code 2, checked here because doit opens its state right after)."""
    exit_cleanly_on_interrupt()
    try:
        path = state_file(recipe_ref)
        check_state_files(path)
    except ForgeError as exc:
        print(f"forgekit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return {**DOIT_CONFIG, "dep_file": str(path)}


DOIT_STATE_REMEDY = "remove it (the next build runs its tasks again and reuses the valid cache objects)"


def check_state_files(doit_state: Path) -> None:
    """Before doit opens anything: the stat memo (replaced with a warning if corrupt: it only
    saves re-hashing), the outputs registry and doit's own state (refused with one line naming
    the file: the first is what gc trusts, the second is doit's file, so the user removes them)."""
    StatMemo().check()
    OutputRegistry().check()
    check_sqlite(doit_state, DOIT_STATE_REMEDY)
    _check_doit_rows(doit_state)


def _check_doit_rows(path: Path) -> None:
    """doit decodes every row of its state as JSON when it reads it; a row that is not JSON
    would be a traceback inside doit."""
    import json
    import sqlite3

    if not path.exists():
        return
    db = sqlite3.connect(path, timeout=60)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='doit'").fetchone():
            return
        for task_id, data in db.execute("SELECT task_id, CAST(task_data AS BLOB) FROM doit"):
            try:
                json.loads(data)
            except (TypeError, ValueError):
                raise CorruptStateFile(path, f"the state of task {task_id} is not JSON", DOIT_STATE_REMEDY) from None
    finally:
        db.close()


_HELD: dict[str, int] = {}   # lock file -> descriptor, held until this process exits


def lock_path(out: Path) -> Path:
    from .ownership import BUILD_LOCK, sibling

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
            limit = env_number("FORGEKIT_LOCK_WAIT", None, float)
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
    from .faults import checkpoint

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


def recipe_tasks(recipe_ref: str, locked: bool = False):
    from .ownership import check_output
    from .recipe import load_recipe
    from .tasks import build_tasks, plan_for

    try:
        hold_build_lock(check_output(load_recipe(recipe_ref)))
        tasks = list(build_tasks(recipe_ref))
        if locked:  # sources must be exactly those <output>.lock.json records (forgekit/lock.py)
            from .lock import check_lock

            check_lock(plan_for(recipe_ref))
    except ForgeError as exc:
        print(f"forgekit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    yield from tasks
