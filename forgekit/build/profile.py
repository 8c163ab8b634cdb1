"""Where a build's time goes: wall seconds, calls and bytes per phase, per process.

Off unless FORGEKIT_PROFILE names a file (then `phase` costs two clock reads; off, one
comparison). Each process appends one JSON line per flush to that file:
    {"pid": ..., "role": "parent"|"helper", "phases": {name: [seconds, calls, bytes]}}
The parent flushes when it exits, helpers after every job (they are terminated, not
exited, so nothing later would run). bench/run_bench.py sums the lines into its profile
table; tests use the counts (e.g. a no-op build makes no "hash" call).

Phases are not exclusive across processes (the parent and the helpers overlap in time),
but within one process they do not nest, except "wait helpers", which is the parent's
idle time while only helpers work.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from contextlib import contextmanager

from .. import settings

_TOTALS: dict[str, list] = {}
_FILE: str | None = None
_ROLE = "parent"
_ENABLED: bool | None = None


def enabled() -> bool:
    global _ENABLED, _FILE
    if _ENABLED is None:
        _FILE = settings.profile_file() or None
        _ENABLED = _FILE is not None
        if _ENABLED and _ROLE == "parent":
            atexit.register(_at_exit)
    return _ENABLED


def add(name: str, seconds: float, nbytes: int = 0, calls: int = 1) -> None:
    if not enabled():
        return
    row = _TOTALS.setdefault(name, [0.0, 0, 0])
    row[0] += seconds
    row[1] += calls
    row[2] += nbytes


@contextmanager
def phase(name: str, nbytes: int = 0):
    """Account the wall time of the block to `name` (with `nbytes` processed)."""
    if not enabled():
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - start, nbytes)


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def started(name: str = "start-up (interpreter, imports)") -> None:
    """Account the time from process start until now (call once, when start-up is over)."""
    if enabled():
        age = process_age()
        if age is not None:
            add(name, age)


def _at_exit() -> None:
    started("process lifetime")
    flush()


def as_helper() -> None:
    """Mark this process a pool helper (flushes after each job instead of at exit)."""
    global _ROLE
    _ROLE = "helper"


def flush() -> None:
    """Append this process's totals as one line and reset them."""
    if not enabled() or not _TOTALS:
        return
    line = json.dumps({"pid": os.getpid(), "role": _ROLE,
                       "phases": {k: [round(v[0], 4), v[1], v[2]] for k, v in _TOTALS.items()}})
    _TOTALS.clear()
    fd = os.open(_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read(path) -> dict[str, dict[str, list]]:
    """Sum a profile file: role -> phase -> [seconds, calls, bytes]."""
    out: dict[str, dict[str, list]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            role = out.setdefault(rec["role"], {})
            for name, (s, c, b) in rec["phases"].items():
                row = role.setdefault(name, [0.0, 0, 0])
                row[0] += s
                row[1] += c
                row[2] += b
    return out
