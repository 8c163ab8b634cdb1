"""What dodo.py needs: doit config (xxh3 file checker, sqlite state in cache/) and a
task generator that turns user mistakes into one clear line and exit code 2."""

from __future__ import annotations

import os
import sys

from pathlib import Path

from doit.dependency import FileChangedChecker

from .cache import StatMemo, cache_root
from .errors import ForgeError


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


def doit_config(recipe_ref: str) -> dict:
    """DOIT_CONFIG for `recipe=...` (a recipe error is one line on stderr and exit code 2)."""
    try:
        path = state_file(recipe_ref)
    except ForgeError as exc:
        print(f"forgekit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return {**DOIT_CONFIG, "dep_file": str(path)}


def recipe_tasks(recipe_ref: str, locked: bool = False):
    from .tasks import build_tasks, plan_for

    try:
        tasks = list(build_tasks(recipe_ref))
        if locked:  # sources must be exactly those <output>.lock.json records (forgekit/lock.py)
            from .lock import check_lock

            check_lock(plan_for(recipe_ref))
    except ForgeError as exc:
        print(f"forgekit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    yield from tasks
