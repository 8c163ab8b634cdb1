"""Fault injection for the crash-safety tests: named checkpoints a test can turn into a crash.

    FORGEKIT_TEST_FAULT=<point>[:<n>[:<action>]]

`checkpoint(name)` is called at the points listed in POINTS. When FORGEKIT_TEST_FAULT names that
point, the n-th time (default 1) *this process* reaches it, the action happens:

    kill    SIGKILL this process (default)
    tree    SIGKILL this process's process group: the whole build, helpers included, when
            the build runs in its own session (as the tests start it)
    enospc  raise OSError(ENOSPC) here, as a full disk would

Helper processes (forgekit.build.pool) inherit the variable and count their own hits.
With `FORGEKIT_TEST_FAULT_LOG=<file>`, a line "<pid> <point> <n> <action>" is appended just before
the action, so a test can prove the fault fired where it asked.

When FORGEKIT_TEST_FAULT is unset, `checkpoint` is one comparison and a return (the variable is
read on the first checkpoint of a process).
"""

from __future__ import annotations

import errno
import functools
import os
import signal

from . import settings
from .errors import ForgeError

# Every checkpoint in the code, with where it sits (tests/test_faults.py kills at each).
POINTS = {
    "lock.held": "build.output_lock: the build lock is held, nothing planned yet",
    "download.chunk": "sources.remote_gguf: a downloaded range chunk written into the small GGUF's temp file",
    "cache.hash": "build.store.hash_file: a window/chunk of a file hashed (source fingerprints, objects, outputs)",
    "memo.remember": "build.store.StatMemo.remember: before a digest is recorded",
    "pool.hash": "build.pool._hash: a source file about to be hashed on the pool (parent or helper)",
    "plan.hashed": "build.keys.build_keys: sources hashed, keys not yet computed",
    "shard.begin": "doit.build_object: a shard task starts (n=2: between two shards)",
    "write.sized": "build.shard.write_shard: header written and file sized, no tensor data yet",
    "piece": "build.compute.run_job: the build process is about to compute a piece",
    "helper.piece": "build.compute.run_job: a helper process is about to compute a piece",
    "piece.partial": "build.compute.run_piece: first output part of a quantized piece written, the rest not",
    "copy.chunk": "build.compute.Workspace.copy_piece: a copied (not decoded) tensor about to be written",
    "write.pieces-done": "build.shard.write_shard: every piece written, file not hashed yet",
    "shard.written": "build.shard.build_into_store: temp object complete and hashed, not committed",
    "commit.renamed": "build.store.ObjectStore.commit: object renamed into the store, no record yet",
    "commit.recorded": "build.store.ObjectStore.commit: object and record in place, doit state not saved",
    "atomic.tmp-written": "fileio.atomic_write_bytes: temp file written, not renamed",
    "memo.tmp-written": "the same, for a memo that only saves work (plan.shapes, build.keys code fingerprints)",
    "place.tmp": "build.store.place_file: link/copy made under a temp name, not renamed",
    "stage.begin": "build.stage.stage: staging dir emptied, nothing placed",
    "stage.file": "build.stage.stage: one output file about to be placed",
    "stage.recorded": "build.stage.stage: every file staged, staging record not written",
    "verify.begin": "build.publish.run_verify: a verify step about to run (n = step index + 1)",
    "verify.done": "build.publish.run_verify: a verify step passed, its result not written",
    "publish.meta": "build.publish.publish: report, runtime file, model card staged; no manifest",
    "publish.manifest": "build.publish.publish: manifest staged, staging not swapped in",
    "swap.exchanged": "build.publish.swap: new output in place, the previous one not yet removed",
    "publish.swapped": "build.publish.publish: swapped, lock file / registry / stat memo not updated",
}


def _parse(value: str) -> tuple[str | None, int, str]:
    if not value:
        return None, 0, ""
    parts = value.split(":")
    point = parts[0]
    nth = int(parts[1]) if len(parts) > 1 and parts[1] else 1
    action = parts[2] if len(parts) > 2 and parts[2] else "kill"
    if action not in ("kill", "tree", "enospc"):
        raise ForgeError(f"FORGEKIT_TEST_FAULT={value!r}: unknown action {action!r} (kill, tree or enospc)")
    return point, nth, action


class _Fault:
    """The fault this process was asked for, and how often its point was reached."""

    def __init__(self, value: str):
        self.point, self.nth, self.action = _parse(value)
        self.hits = 0


@functools.cache
def _fault() -> _Fault:
    return _Fault(settings.fault())


def checkpoint(name: str) -> None:
    """A place where a crash must be survivable; see the module docstring."""
    fault = _fault()
    if name != fault.point:
        return
    fault.hits += 1
    if fault.hits != fault.nth:
        return
    log = settings.fault_log()
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {name} {fault.hits} {fault.action}\n")
    if fault.action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if fault.action == "tree":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
