"""The worker pool: shard pieces (and new source files to hash) run on all cores.

The parent works on the items itself and shares them with `jobs - 1` helper processes (so
it never waits for helpers to start). Helpers are spawned (not forked: the parent has mlx
loaded) and are not threads: measured, mlx's CPU quantize does not run two threads in
parallel. Helpers import only numpy, mlx and forgekit's build modules, and exit when their
parent dies. Sizes: settings.jobs() (FORGEKIT_JOBS), settings.pool_min_bytes().
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from .. import settings
from ..errors import ForgeError
from ..faults import checkpoint
from .compute import Job, Workspace, run_job
from . import profile
from .memo import hash_file

# The one piece of state a helper process keeps for its lifetime: its descriptors and
# buffers. multiprocessing.Pool calls plain functions, so it cannot be passed in.
_HELPER_WORKSPACE: Workspace | None = None

# mlx's buffer cache per build process while shards are computed. mx.quantize of a 32 MiB bf16
# row chunk needs between 96 and 128 MiB of temporaries; with a smaller cache they go back to the
# OS after every piece and are faulted in again (measured at 64 MiB: 27x the page faults and a
# 20-30% slower quantize). At 256 MiB the whole build's peak RSS stayed ~360 MiB (buffers reused).
MLX_CACHE_BYTES = 256 * 2**20


def worker_count() -> int:
    """Processes to use: FORGEKIT_JOBS, else the usable cores (at most 8).

    Inside a multiprocessing child (our own worker, or a doit `-n N -P process` task
    runner, which already runs shards side by side) it is 1: no nested pools.
    """
    if multiprocessing.parent_process() is not None:
        return 1
    env = settings.jobs()
    if env is not None:
        return env
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _init_helper(parent: int) -> None:
    import signal

    global _HELPER_WORKSPACE
    profile.as_helper()
    _HELPER_WORKSPACE = Workspace()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle

    def watch() -> None:  # exit when the parent is gone (e.g. the build was killed)
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    import mlx.core as mx

    mx.set_cache_limit(MLX_CACHE_BYTES)
    profile.started("helper start-up (spawn, imports)")


def _helper_job(job: Job, delay: float) -> int:
    try:
        return run_job(job, _HELPER_WORKSPACE, delay, helper=True)
    finally:
        profile.flush()


def _hash(path: str) -> tuple[str, str, bool]:
    before = os.stat(path)
    checkpoint("pool.hash")
    try:
        digest = hash_file(Path(path))
    finally:
        profile.flush()   # helpers are terminated, never exit: flush per item (lines are summed)
    after = os.stat(path)
    same = (before.st_size, before.st_mtime_ns, before.st_ino) == (after.st_size, after.st_mtime_ns, after.st_ino)
    return path, digest, same


def _spawn_pool(n: int):
    """A spawn-context Pool of n helpers whose children do not re-import `__main__`.

    Reason for the temporary patch of multiprocessing.spawn.get_preparation_data: workers
    need nothing from `__main__`, which may be '<stdin>', a notebook, or a script without a
    `__main__` guard, and the standard library offers no switch to skip it.
    """
    import multiprocessing.spawn as spawn

    ctx = multiprocessing.get_context("spawn")
    original = spawn.get_preparation_data

    def without_main(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = without_main
    try:
        return ctx.Pool(n, initializer=_init_helper, initargs=(os.getpid(),))
    finally:
        spawn.get_preparation_data = original


class WorkerPool:
    """Helper processes shared by the shards of one build process (started on first need)."""

    def __init__(self):
        self._pool = None
        self._size = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._pool is not None

    def _get(self, n: int):
        with self._lock:
            if self._pool is None or self._size != n:
                if self._pool is not None:
                    self._pool.terminate()
                self._pool = _spawn_pool(n)
                self._size = n
            return self._pool

    def prestart(self) -> bool:
        """Start the helpers now (they import while the parent keeps working). The parent is
        always one of the workers, so `worker_count() - 1` helpers are started."""
        n = worker_count()
        if n <= 1:
            return False
        self._get(n - 1)
        return True

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.terminate()
                self._pool.join()
                self._pool = None

    def _helper_pids(self) -> set[int]:
        return {p.pid for p in list(getattr(self._pool, "_pool", None) or [])}

    def _dead_helper(self, started: set[int]) -> str | None:
        """A helper that exited (multiprocessing.Pool replaces dead workers silently, and the
        item a dead worker held is never answered)."""
        procs = list(getattr(self._pool, "_pool", None) or [])
        for p in procs:
            if p.exitcode is not None:
                return f"pid {p.pid}, exit code {p.exitcode}"
        gone = started - {p.pid for p in procs}
        return f"pid {min(gone)}" if gone else None

    def share(self, local: Callable, remote: Callable, args: tuple, items: list, on_result: Callable,
              prefetch: int = 2) -> int:
        """Run `local(item)` in the parent and `remote(item, *args)` on the helpers over items;
        returns the processes used.

        The parent takes items from the front, helpers from the back (at most `prefetch` queued
        per helper), so the parent starts at once (no wait for helpers to spawn) and the two
        ends meet without a straggler. Exceptions from any side propagate; a helper that dies
        (killed, out of memory) fails the call instead of leaving its item waiting forever.
        """
        helpers = self._size if self._pool is not None else 0
        pending = deque(items)
        inflight: list = []
        started = self._helper_pids()
        while pending or inflight:
            inflight = self._collect(inflight, on_result, started, block=False)
            while helpers and pending and len(inflight) < helpers * prefetch:
                inflight.append(self._pool.apply_async(remote, (pending.pop(), *args)))
            if pending:
                on_result(local(pending.popleft()))
            else:
                inflight = self._collect(inflight, on_result, started, block=True)
        return 1 + helpers

    def _collect(self, inflight: list, on_result: Callable, started: set[int], block: bool) -> list:
        if block and inflight and not any(r.ready() for r in inflight):
            with profile.phase("wait helpers"):
                inflight[0].wait(0.05)
            dead = self._dead_helper(started)
            if dead:
                self.shutdown()
                raise ForgeError(f"a helper process of this build died ({dead}) while working on it; "
                                 f"nothing it wrote is kept, run the build again")
        keep = []
        for r in inflight:
            if r.ready():
                on_result(r.get())
            else:
                keep.append(r)
        return keep

    def hash_files(self, paths: list[str]) -> dict[str, tuple[str, bool]]:
        """xxh3 digests of several files, hashed side by side by the parent and the helpers.

        Returns path -> (digest, unchanged while hashed)."""
        out: dict[str, tuple[str, bool]] = {}

        def keep(result) -> None:
            path, digest, same = result
            out[path] = (digest, same)

        self.prestart()
        self.share(_hash, _hash, (), sorted(paths, key=lambda p: -os.path.getsize(p)), keep, prefetch=1)
        return out

    def run_jobs(self, jobs: list[Job], on_done: Callable[[int], None] | None = None) -> int:
        """Run a shard's jobs on the parent plus the helpers (the parent alone for small shards,
        unless the helpers are already up); returns the processes used."""
        import mlx.core as mx

        work = sum(p.work for j in jobs for p in j.pieces)
        n = min(worker_count(), len(jobs))
        if n > 1 and (work >= settings.pool_min_bytes() or self._pool is not None):
            self.prestart()
        delay = settings.piece_delay()
        ws = Workspace()
        on_done = on_done or (lambda done: None)
        previous = mx.set_cache_limit(MLX_CACHE_BYTES)  # the parent's own mlx cache, restored below
        try:
            local = lambda job: run_job(job, ws, delay)  # noqa: E731
            if n > 1:
                return self.share(local, _helper_job, (delay,), jobs, on_done)
            for job in jobs:
                on_done(local(job))
            return 1
        finally:
            ws.close()
            mx.set_cache_limit(previous)
            mx.clear_cache()
