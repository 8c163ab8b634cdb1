"""Every FORGEKIT_* environment variable, read here and nowhere else.

Each knob is read when it is asked for (so a test or a shell may change it between two
calls) and validated: a bad value is one ForgeError line naming the variable, never a
traceback. Knobs that exist only so the test suite can drive corner cases are named
FORGEKIT_TEST_*; users never need them.

    FORGEKIT_CACHE                  cache root (default: see cache_root)
    FORGEKIT_JOBS                   processes working on a shard, parent included (default: cores, at most 8)
    FORGEKIT_LOCK_WAIT              seconds to wait for another build of the same output (default: forever)
    FORGEKIT_COPY_OUTPUTS           1: outputs never share inodes with cache objects (default 0)
    FORGEKIT_PROFILE                file to append per-phase build timings to (bench/run_bench.py; default off)
    FORGEKIT_TEST_POOL_MIN_BYTES    shards with less work run in the parent alone (default 256 MiB)
    FORGEKIT_TEST_JOB_BYTES         source bytes batched into one job (default 32 MiB)
    FORGEKIT_TEST_HASH_IN_POOL_BYTES  new sources totalling more are hashed on the pool (default 1 GiB)
    FORGEKIT_TEST_PIECE_DELAY       seconds to sleep before each piece (interrupt a build on purpose)
    FORGEKIT_TEST_FAULT             <point>[:<n>[:<action>]]: crash at a checkpoint (forgekit/faults.py)
    FORGEKIT_TEST_FAULT_LOG         file the fault injector appends a line to before it acts
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ForgeError

def _raw(name: str) -> str:
    return os.environ.get(name, "")


def _number(name: str, default, kind=int, minimum=0):
    raw = _raw(name)
    if raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ForgeError(f"environment variable {name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ForgeError(f"environment variable {name} must be at least {minimum}, got {raw!r}")
    return value


def _flag(name: str) -> bool:
    raw = _raw(name)
    if raw not in ("", "0", "1"):
        raise ForgeError(f"environment variable {name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def checkout_root() -> Path | None:
    """The source checkout forgekit runs from (the directory holding dodo.py, pyproject.toml and
    this package), or None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "dodo.py").is_file() and (root / "pyproject.toml").is_file() else None


def cache_root() -> Path:
    """The cache directory, the same wherever a command runs (not created here: whoever writes
    into it creates it): FORGEKIT_CACHE; else `cache/` of the source checkout forgekit runs
    from; else the user's cache directory, $XDG_CACHE_HOME/forgekit (default ~/.cache/forgekit)."""
    if _raw("FORGEKIT_CACHE"):
        return Path(_raw("FORGEKIT_CACHE")).expanduser().resolve()
    checkout = checkout_root()
    if checkout is not None:
        return checkout / "cache"
    return Path(_raw("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser().resolve() / "forgekit"


def jobs() -> int | None:
    """FORGEKIT_JOBS, or None for the default (usable cores)."""
    return _number("FORGEKIT_JOBS", None, minimum=1)


def lock_wait() -> float | None:
    return _number("FORGEKIT_LOCK_WAIT", None, float)


def copy_outputs() -> bool:
    return _flag("FORGEKIT_COPY_OUTPUTS")


def profile_file() -> str:
    return _raw("FORGEKIT_PROFILE")


def pool_min_bytes() -> int:
    return _number("FORGEKIT_TEST_POOL_MIN_BYTES", 256 * 2**20)


def job_bytes() -> int:
    return _number("FORGEKIT_TEST_JOB_BYTES", 32 * 2**20)


def hash_in_pool_bytes() -> int:
    return _number("FORGEKIT_TEST_HASH_IN_POOL_BYTES", 2**30)


def piece_delay() -> float:
    return _number("FORGEKIT_TEST_PIECE_DELAY", 0.0, float)


def fault() -> str:
    return _raw("FORGEKIT_TEST_FAULT")


def fault_log() -> str:
    return _raw("FORGEKIT_TEST_FAULT_LOG")


def check_all() -> None:
    """Read every knob once, so a bad value is reported before any work starts."""
    for read in (cache_root, jobs, lock_wait, copy_outputs, pool_min_bytes, job_bytes, hash_in_pool_bytes,
                 piece_delay):
        read()
