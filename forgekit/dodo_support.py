"""What dodo.py needs: doit config (xxh3 file checker, sqlite state in cache/) and a
task generator that turns user mistakes into one clear line and exit code 2."""

from __future__ import annotations

import sys

import os

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


def recipe_tasks(recipe_ref: str):
    from .tasks import build_tasks

    try:
        tasks = list(build_tasks(recipe_ref))
    except ForgeError as exc:
        print(f"forgekit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    yield from tasks
