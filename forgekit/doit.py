"""doit glue: DOIT_CONFIG (xxh3 file checker, sqlite state under the cache), the task dicts of
one recipe, and the one per-process cache of plans, keys and workers the actions share.

Graph for one recipe:
    shard:<file>    one per output safetensors file -> a cache object keyed by its action key
    stage           link/copy objects + meta files into <out>.staging
    verify:<i>:<step>  one per recipe verify step, run on the staging dir
    publish         report, mtplx_runtime.json, model card, manifest; swap staging into <out>

Up-to-date rules (doit `uptodate`, no timestamps involved):
    shard:<file>    its cache object exists and still hashes to its record, and doit's state
                    (one sqlite file per output dir) holds the same action key
    stage/verify/publish
                    <out> holds a published build with this build key whose files still
                    have their recorded digests, and doit's state holds the same build key
So a no-op build reads no tensor bytes, and `doit forget` makes doit run the tasks again
(a shard whose object is still valid is then served from the cache, not recomputed).
Actions are module-level functions taking plain arguments (picklable, so `doit -n 2 -P
process` works too; worker processes re-plan: planning is pure).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from doit.dependency import FileChangedChecker
from doit.exceptions import TaskFailed
from doit.tools import config_changed

from . import settings
from .build import publish as publishing
from .build import stage as staging
from .build.keys import BuildKeys, build_keys
from .build import profile
from .build.output_lock import hold_build_lock
from .build.ownership import check_output
from .build.pool import WorkerPool
from .build.shard import build_into_store, restore_from_output
from .build.leases import lease_objects
from .build.memo import CorruptStateFile, StatMemo, check_sqlite
from .build.store import ObjectStore, OutputRegistry
from .errors import ForgeError
from .faults import checkpoint
from .fileio import DISK_ERRORS, disk_error
from .plan import BuildPlan, make_plan
from .recipe import load_recipe


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


@dataclass
class Session:
    """What the actions of one doit process share: each recipe planned and keyed once, the
    helper processes, and the last loaded model (verify steps of one build load it once)."""

    plans: dict[str, tuple[BuildPlan, BuildKeys]] = field(default_factory=dict)
    pool: WorkerPool = field(default_factory=WorkerPool)
    loaded_bodies: object = None   # verify.load.BodyCache, made on first use
    recipes: dict = field(default_factory=dict)

    def recipe(self, recipe_ref: str):
        """The recipe, loaded once per process (doit's config, the task list and the plan all
        need it; the file is read when the build starts)."""
        if recipe_ref not in self.recipes:
            self.recipes[recipe_ref] = load_recipe(recipe_ref)
        return self.recipes[recipe_ref]

    def bodies(self, plan: BuildPlan):
        """The model cache of the verify steps; None when the recipe has none. Imported here, not
        at module level: verify.load pulls in mlx_lm and transformers (seconds of start-up that
        a no-op build or a build without verify steps never needs)."""
        if not plan.recipe.verify:
            return None
        if self.loaded_bodies is None:
            from .verify.load import BodyCache

            self.loaded_bodies = BodyCache()
        return self.loaded_bodies

    def planned(self, recipe_ref: str) -> tuple[BuildPlan, BuildKeys]:
        if recipe_ref not in self.plans:
            with profile.phase("task: plan"):
                plan = make_plan(self.recipe(recipe_ref))
            with profile.phase("task: keys (source digests)"):
                self.plans[recipe_ref] = (plan, build_keys(plan, self.pool))
        return self.plans[recipe_ref]


_SESSION = Session()   # the one plan cache of this process


def planned(recipe_ref: str) -> tuple[BuildPlan, BuildKeys]:
    """(plan, keys) of a recipe, planned and hashed once per process."""
    return _SESSION.planned(recipe_ref)


# ---------------------------------------------------------------- config


def state_file(recipe_ref: str) -> Path:
    """doit's state for one output dir: cache/state/<dir name>-<xxh3 of its path>.sqlite3.

    One state file per output keeps task names short (`build:shard:model.safetensors`)
    while recipes sharing a cache never overwrite each other's recorded keys.
    """
    import xxhash

    out = _SESSION.recipe(recipe_ref).output_dir().resolve()
    return settings.cache_root() / "state" / f"{out.name}-{xxhash.xxh3_64_hexdigest(str(out).encode())}.sqlite3"


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
    """DOIT_CONFIG for `recipe=...` (a bad setting, a recipe error or a corrupt state file is one
    line on stderr and exit code 2, checked here because doit opens its state right after)."""
    exit_cleanly_on_interrupt()
    profile.started()
    try:
        settings.check_all()
        path = state_file(recipe_ref)
        check_state_files(path)
    except ForgeError as exc:
        print(f"forgekit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return {"default_tasks": ["build"], "backend": "sqlite3", "dep_file": str(path),
            "check_file_uptodate": XXH3Checker, "verbosity": 2}


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


# ---------------------------------------------------------------- actions


def _fail_cleanly(fn):
    """A ForgeError (or a full disk) in an action becomes a one-line doit failure, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ForgeError as exc:
            return TaskFailed(str(exc))
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                raise
            return TaskFailed(str(disk_error(exc, f"the output of task {fn.__name__}")))

    return wrapper


@_fail_cleanly
def build_object(recipe_ref: str, file: str) -> None:
    checkpoint("shard.begin")
    plan, keys = planned(recipe_ref)
    with profile.phase("task: shard"):
        _build_object(plan, keys, file)


def _build_object(plan: BuildPlan, keys: BuildKeys, file: str) -> None:
    key = keys.file_keys[file]
    store = ObjectStore()
    if store.valid(key):
        store.touch(key)
        print(f"  cached {file} (object {key[:12]})", flush=True)
        return
    if restore_from_output(plan, keys, file, store):
        print(f"  restored {file} into the cache from {plan.recipe.output_dir()}", flush=True)
        return
    build_into_store(plan, keys, file, store, _SESSION.pool)


def object_ready(recipe_ref: str, file: str) -> bool:
    return ObjectStore().valid(planned(recipe_ref)[1].file_keys[file])


@_fail_cleanly
def stage(recipe_ref: str) -> None:
    with profile.phase("task: stage"):
        staging.stage(*planned(recipe_ref), _SESSION.pool)


@_fail_cleanly
def verify_step(recipe_ref: str, index: int) -> None:
    plan, keys = planned(recipe_ref)
    staging.ensure_staged(plan, keys, _SESSION.pool)
    bodies = _SESSION.bodies(plan)
    bodies.source_digests = keys.digests       # parity's cached source reference is keyed by them
    publishing.run_verify(plan, index, bodies)


@_fail_cleanly
def publish(recipe_ref: str) -> None:
    with profile.phase("task: publish"):
        plan, keys = planned(recipe_ref)
        publishing.publish(plan, keys, _SESSION.pool, _SESSION.bodies(plan))


def published(recipe_ref: str) -> bool:
    return publishing.published(*planned(recipe_ref))


def clean_output(recipe_ref: str) -> None:
    publishing.clean_output(planned(recipe_ref)[0])


# ---------------------------------------------------------------- task dicts


def build_tasks(recipe_ref: str):
    """doit task dicts (sub-tasks of `build`) for one recipe."""
    plan, keys = planned(recipe_ref)
    lease_objects(keys.file_keys.values())  # gc keeps this build's objects while it runs
    shard_tasks = []
    for file, entries in plan.files.items():
        name = f"shard:{file}"
        shard_tasks.append(f"build:{name}")
        key = keys.file_keys[file]
        yield {"name": name, "actions": [(build_object, [recipe_ref, file])],
               "file_dep": sorted({f for t in entries for f in t.source_files()}),
               "uptodate": [(object_ready, [recipe_ref, file]), config_changed(key)], "verbosity": 2,
               "doc": f"build {file} into the object cache (key {key[:12]})"}

    def done():
        return [(published, [recipe_ref]), config_changed(keys.build_key)]

    yield {"name": "stage", "actions": [(stage, [recipe_ref])], "task_dep": shard_tasks,
           "uptodate": done(), "verbosity": 2, "doc": "assemble the output in a staging dir"}
    verify_tasks = []
    for i, step in enumerate(plan.recipe.verify):
        name = f"verify:{i}:{step.step}"
        verify_tasks.append(f"build:{name}")
        yield {"name": name, "actions": [(verify_step, [recipe_ref, i])], "task_dep": ["build:stage"],
               "uptodate": done(), "verbosity": 2, "doc": f"verification step {step.step}"}
    yield {"name": "publish", "actions": [(publish, [recipe_ref])],
           "task_dep": ["build:stage"] + verify_tasks, "uptodate": done(), "verbosity": 2,
           "doc": "write report + runtime file, then swap the staging dir into place",
           "clean": [(clean_output, [recipe_ref])]}


def recipe_tasks(recipe_ref: str, locked: bool = False):
    """The build's tasks, after taking the output's build lock; user mistakes are one line, exit 2."""
    try:
        hold_build_lock(check_output(_SESSION.recipe(recipe_ref)))
        tasks = list(build_tasks(recipe_ref))
        if locked:  # sources must be exactly those <output>.lock.json records (build/lock.py)
            from .build.lock import check_lock

            check_lock(planned(recipe_ref)[0])
    except ForgeError as exc:
        print(f"forgekit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    yield from tasks
