"""Fault injection for the crash-safety tests: named checkpoints a test can turn into a crash.

    FORGEKIT_FAULT=<point>[:<n>[:<action>]]

`checkpoint(name)` is called at the points listed in POINTS. When FORGEKIT_FAULT names that
point, the n-th time (default 1) *this process* reaches it, the action happens:

    kill    SIGKILL this process (default)
    tree    SIGKILL this process's process group: the whole build, helpers included, when
            the build runs in its own session (as the tests start it)
    enospc  raise OSError(ENOSPC) here, as a full disk would

Helper processes (forgekit.parallel) inherit the variable and count their own hits.
With `FORGEKIT_FAULT_LOG=<file>`, a line "<pid> <point> <n> <action>" is appended just before
the action, so a test can prove the fault fired where it asked.

When FORGEKIT_FAULT is unset, `checkpoint` is one comparison and a return.
"""

from __future__ import annotations

import errno
import os
import signal

# Every checkpoint in the code, with where it sits (tests/test_faults.py kills at each).
POINTS = {
    "lock.held": "dodo_support: the build lock is held, nothing planned yet",
    "download.chunk": "sources.remote_gguf: a downloaded range chunk written into the small GGUF's temp file",
    "cache.hash": "cache.hash_file: a window/chunk of a file hashed (source fingerprints, objects, outputs)",
    "memo.remember": "cache.StatMemo.remember: before a digest is recorded",
    "pool.hash": "parallel._hash: a source file about to be hashed on the pool (parent or helper)",
    "plan.hashed": "tasks.fingerprint: sources hashed, keys not yet computed",
    "shard.begin": "tasks.build_object: a shard task starts (n=2: between two shards)",
    "write.sized": "write.write_shard: header written and file sized, no tensor data yet",
    "piece": "parallel.run_job: the build process is about to compute a piece",
    "helper.piece": "parallel.run_job: a helper process is about to compute a piece",
    "piece.partial": "parallel.run_piece: first output part of a quantized piece written, the rest not",
    "copy.chunk": "parallel.copy_piece: a copied (not decoded) tensor about to be written",
    "write.pieces-done": "write.write_shard: every piece written, file not hashed yet",
    "shard.written": "tasks._build: temp object complete and hashed, not committed",
    "commit.renamed": "cache.ObjectStore.commit: object renamed into the store, no record yet",
    "commit.recorded": "cache.ObjectStore.commit: object and record in place, doit state not saved",
    "atomic.tmp-written": "cache.atomic_write_bytes: temp file written, not renamed",
    "place.tmp": "cache.place_file: link/copy made under a temp name, not renamed",
    "stage.begin": "tasks._stage: staging dir emptied, nothing placed",
    "stage.file": "tasks._stage: one output file about to be placed",
    "stage.recorded": "tasks._stage: every file staged, staging record not written",
    "verify.begin": "tasks._run_verify: a verify step about to run (n = step index + 1)",
    "verify.done": "tasks._run_verify: a verify step passed, its result not written",
    "publish.meta": "tasks.publish: report, runtime file, model card staged; no manifest",
    "publish.manifest": "tasks.publish: manifest staged, staging not swapped in",
    "swap.exchanged": "tasks._swap: new output in place, the previous one not yet removed",
    "publish.swapped": "tasks.publish: swapped, lock file / registry / stat memo not updated",
}


def _parse(value: str) -> tuple[str | None, int, str]:
    if not value:
        return None, 0, ""
    parts = value.split(":")
    point = parts[0]
    nth = int(parts[1]) if len(parts) > 1 and parts[1] else 1
    action = parts[2] if len(parts) > 2 and parts[2] else "kill"
    if action not in ("kill", "tree", "enospc"):
        raise ValueError(f"FORGEKIT_FAULT={value!r}: unknown action {action!r} (kill, tree or enospc)")
    return point, nth, action


_POINT, _NTH, _ACTION = _parse(os.environ.get("FORGEKIT_FAULT", ""))
_hits = 0


def checkpoint(name: str) -> None:
    """A place where a crash must be survivable; see the module docstring."""
    if name != _POINT:
        return
    global _hits
    _hits += 1
    if _hits != _NTH:
        return
    log = os.environ.get("FORGEKIT_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {name} {_hits} {_ACTION}\n")
    if _ACTION == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if _ACTION == "tree":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
