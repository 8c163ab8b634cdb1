"""BuildPlan -> doit tasks. Actions are module-level functions taking plain arguments
(picklable, so `doit -n 2 -P process` works too).

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
"""

from __future__ import annotations

import errno
import functools
import json
import os
import platform
import shutil
import time
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from . import __version__, meta
from .cache import (FORMAT_VERSION, MANIFEST, ObjectStore, OutputRegistry, StatMemo, atomic_write_bytes,
                    atomic_write_json, fsync_dir, fsync_file, hash_bytes, hash_file, key_of, lease_objects,
                    link_outputs, place_file, read_manifest, references)
from .errors import ForgeError
from .faults import checkpoint
from .ownership import STAGING, check_output_contents, check_staging, holds_manifest, sibling
from .plan import BuildPlan, make_plan
from .recipe import load_recipe

STAGED = ".forgekit/staged.json"     # inside the staging dir: what stage put there
_PLANS: dict[str, BuildPlan] = {}
_HERE = Path(__file__).resolve().parent


def library_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("mlx", "gguf", "safetensors", "numpy")}


def plan_for(recipe_ref: str) -> BuildPlan:
    """Load + plan once per process (actions in worker processes re-plan: it is pure)."""
    if recipe_ref not in _PLANS:
        plan = make_plan(load_recipe(recipe_ref))
        fingerprint(plan)
        _PLANS[recipe_ref] = plan
    return _PLANS[recipe_ref]


def code_digest() -> str:
    """Digest of the code that decides the non-tensor output (meta files, verification,
    staging/publishing): changing it re-runs stage/verify/publish, never the shards.
    Shard bytes are versioned by cache.FORMAT_VERSION instead (a rebuild costs real time)."""
    files = [_HERE / "meta.py", _HERE / "tasks.py", _HERE / "mtp_head.py", *sorted((_HERE / "verify").glob("*.py"))]
    return key_of({f.name: hash_file(f) for f in files if f.is_file()})


def fingerprint(plan: BuildPlan) -> None:
    """Source file digests (memoised by stat), the action key of every output file, the build key."""
    from . import parallel

    memo = StatMemo()
    used = {t.source_file for t in plan.tensors}
    digest_of = {f: memo.lookup(f) for f in used}
    unknown = [f for f, d in digest_of.items() if d is None]
    if sum(os.path.getsize(f) for f in unknown) > parallel.HASH_IN_POOL_BYTES:
        # New or changed sources: a build is coming. Hash them on the worker pool (one file per
        # process), which also starts the pool while the parent is otherwise idle.
        for f, (digest, unchanged) in parallel.hash_files(unknown).items():
            digest_of[f] = digest
            if unchanged:
                memo.remember(Path(f), digest)
    digest_of = {f: d if d is not None else memo.digest(Path(f)) for f, d in digest_of.items()}
    checkpoint("plan.hashed")
    plan.digests = {role: {str(f): digest_of[str(f)] for f in src.files if str(f) in used}
                    for role, src in plan.sources.items()}
    flat = {f: d for files in plan.digests.values() for f, d in files.items()}
    versions = library_versions()
    plan.file_keys = {}
    for name, entries in plan.files.items():
        # Exactly what determines the object's bytes; not its file name, recipe or output dir,
        # so recipes that share a body share its shard objects.
        plan.file_keys[name] = key_of({
            "forgekit_format": FORMAT_VERSION, "versions": versions, "metadata": {"format": "mlx"},
            "tensors": [{"key": t.key, "source": t.source_key, "source_digest": flat[t.source_file],
                         "stored_as": t.stored_as, "transforms": t.transforms, "dtype": t.dtype,
                         "shape": t.shape, "quant": t.quant.model_dump() if t.quant else None}
                        for t in entries],
        })
    copied = {n: memo.digest(p) for n, p in meta.copied_files(plan).items()}
    r = plan.recipe
    plan.build_key = key_of({
        "files": plan.file_keys, "copied": copied, "config": meta.config_json(plan),
        "index": meta.index_json(plan) if plan.indexed_files else None,
        "verify": [s.model_dump() for s in r.verify], "runtime": r.runtime,
        "provenance": plan.provenance, "description": r.description, "name": r.name,
        "recipe_files": [Path(f).name for f in r.recipe_files],  # the model card names them
        "code": code_digest(), "forgekit": __version__,
        "host": [platform.system(), platform.machine(), platform.python_version()],  # mtplx_runtime.json
    })


# A full disk / quota / file size limit / read-only file system: the user's to fix, so one line.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _disk_error(exc: OSError, what: str) -> ForgeError:
    where = exc.filename if exc.filename else what
    return ForgeError(f"cannot write {where}: {os.strerror(exc.errno)}")


def _forge_errors_fail_cleanly(fn):
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
            return TaskFailed(str(_disk_error(exc, f"the output of task {fn.__name__}")))

    return wrapper


def staging_dir(out: Path) -> Path:
    return sibling(out, STAGING)


# ---------------------------------------------------------------- shard objects


def _build(plan: BuildPlan, file: str, store: ObjectStore) -> None:
    """Compute one shard into the object store (temp file + rename)."""
    from .progress import StepProgress, human_bytes
    from .write import shard_source_bytes, write_shard

    key = plan.file_keys[file]
    entries = plan.files[file]
    total = shard_source_bytes(entries, plan.sources)
    tmp = store.temp_path(key)
    try:
        with StepProgress(file, total) as progress:
            start = time.time()
            digest = write_shard(tmp, entries, plan.sources, progress=progress.advance)
            size = tmp.stat().st_size
            progress.summary = (f"{len(entries)} tensors, {human_bytes(total)} -> {human_bytes(size)}, "
                                f"{write_shard.workers} worker{'s' if write_shard.workers > 1 else ''}")
            checkpoint("shard.written")
            store.commit(key, tmp, digest, file=file, recipe=plan.recipe.name, tensors=len(entries),
                         source_bytes=total, seconds=round(time.time() - start, 3))
    except OSError as exc:
        if exc.errno in DISK_ERRORS:  # the temp file is removed below; nothing is recorded
            raise _disk_error(exc, f"{file} into the cache ({store.root})") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _restore_from_output(plan: BuildPlan, file: str, store: ObjectStore) -> bool:
    """A gc'd object whose bytes the published output still holds: copy it back, checked."""
    key = plan.file_keys[file]
    out = plan.recipe.output_dir()
    manifest = read_manifest(out)
    if not manifest or manifest.get("objects", {}).get(file) != key:
        return False
    want = manifest.get("files", {}).get(file)
    src = out / file
    if not want or not src.is_file():
        return False
    tmp = store.temp_path(key)
    try:
        shutil.copyfile(src, tmp)
        digest = hash_file(tmp)
        if digest != want:
            return False
        store.commit(key, tmp, digest, file=file, recipe=plan.recipe.name, restored_from=str(out))
    finally:
        tmp.unlink(missing_ok=True)
    return True


@_forge_errors_fail_cleanly
def build_object(recipe_ref: str, file: str) -> None:
    checkpoint("shard.begin")
    plan = plan_for(recipe_ref)
    key = plan.file_keys[file]
    store = ObjectStore()
    if store.valid(key):
        store.touch(key)
        print(f"  cached {file} (object {key[:12]})", flush=True)
        return
    if _restore_from_output(plan, file, store):
        print(f"  restored {file} into the cache from {plan.recipe.output_dir()}", flush=True)
        return
    _build(plan, file, store)


def object_ready(recipe_ref: str, file: str) -> bool:
    plan = plan_for(recipe_ref)
    return ObjectStore().valid(plan.file_keys[file])


# ---------------------------------------------------------------- stage / verify / publish


def _staged(plan: BuildPlan) -> dict | None:
    """The staging dir's record, if it holds this build key."""
    staging = staging_dir(plan.recipe.output_dir())
    try:
        record = json.loads((staging / STAGED).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("build_key") != plan.build_key:
        return None
    files = record.get("files")
    if not isinstance(files, dict) or not all((staging / n).is_file() for n in files):
        return None
    return record


def _ensure_staged(plan: BuildPlan) -> dict:
    record = _staged(plan)
    if record is None:
        _stage(plan)
        record = _staged(plan)
    if record is None:
        raise ForgeError(f"{staging_dir(plan.recipe.output_dir())}: staging failed to produce this build; "
                         "run the build again")
    return record


def _inode_mates(store: ObjectStore, keys, refs: dict, exclude: Path | None = None) -> list[Path]:
    """Names that may share an inode with these objects: the objects and the published
    outputs (from the registry) that reference them. A link/unlink we make changes their
    ctime, not their bytes, so their stat-memo entries are carried over (StatMemo.preserving)."""
    paths = []
    for key in keys:
        paths.append(store.path(key))
        paths += [Path(r["dir"]) / r["file"] for r in refs.get(key, [])
                  if exclude is None or Path(r["dir"]) != exclude.resolve()]
    return paths


def _stage(plan: BuildPlan) -> None:
    out = plan.recipe.output_dir()
    staging = staging_dir(out)
    check_staging(staging)  # a symlink or a foreign dir there is refused, never followed nor emptied
    shutil.rmtree(staging, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    (staging / ".forgekit").mkdir()
    checkpoint("stage.begin")
    store = ObjectStore()
    memo = StatMemo()
    current = read_manifest(out) or {}
    refs = references()
    staged: dict[str, str] = {}
    for name, key in plan.file_keys.items():
        if not store.valid(key):  # vanished or was tampered with since the shard task ran
            print(f"  cache object for {name} is missing or corrupt: rebuilding it", flush=True)
            _build(plan, name, store)
        digest = store.record(key)["digest"]
        published_copy = out / name
        checkpoint("stage.file")
        with memo.preserving(_inode_mates(store, [key], refs) + [published_copy]):
            if current.get("files", {}).get(name) == digest and published_copy.is_file() \
                    and memo.lookup(published_copy) == digest:
                place_file(published_copy, staging / name, link=True)   # the same bytes are already out there
            else:
                place_file(store.path(key), staging / name, link=link_outputs())
        staged[name] = digest
        store.touch(key)
    config = (json.dumps(meta.config_json(plan), indent=4) + "\n").encode()
    atomic_write_bytes(staging / "config.json", config)
    staged["config.json"] = hash_bytes(config)
    if plan.indexed_files:
        index = (json.dumps(meta.index_json(plan), indent=2) + "\n").encode()
        atomic_write_bytes(staging / "model.safetensors.index.json", index)
        staged["model.safetensors.index.json"] = hash_bytes(index)
    for name, src in meta.copied_files(plan).items():
        place_file(src, staging / name, link=False)
        staged[name] = memo.digest(src)
    checkpoint("stage.recorded")
    atomic_write_json(staging / STAGED, {"build_key": plan.build_key, "files": staged,
                                         "objects": dict(plan.file_keys)})


@_forge_errors_fail_cleanly
def stage(recipe_ref: str) -> None:
    _stage(plan_for(recipe_ref))


def _run_verify(plan: BuildPlan, index: int) -> dict:
    from .verify import run_step

    step = plan.recipe.verify[index]
    staging = staging_dir(plan.recipe.output_dir())
    checkpoint("verify.begin")
    result = run_step(step, staging, plan)
    checkpoint("verify.done")
    atomic_write_json(staging / ".forgekit" / f"verify-{index}-{step.step}.json", result)
    print(f"  verify {step.step}: ok {json.dumps(result.get('summary', {}), sort_keys=True)}", flush=True)
    return result


@_forge_errors_fail_cleanly
def verify_step(recipe_ref: str, index: int) -> None:
    plan = plan_for(recipe_ref)
    _ensure_staged(plan)
    _run_verify(plan, index)


@_forge_errors_fail_cleanly
def publish(recipe_ref: str) -> None:
    plan = plan_for(recipe_ref)
    out = plan.recipe.output_dir()
    if _staged(plan) is None and published(recipe_ref):
        return  # nothing staged and <out> already is this build (e.g. only publish was forgotten)
    staged = _ensure_staged(plan)
    staging = staging_dir(out)
    results = []
    for i, step in enumerate(plan.recipe.verify):
        path = staging / ".forgekit" / f"verify-{i}-{step.step}.json"
        results.append(json.loads(path.read_text()) if path.is_file() else _run_verify(plan, i))
    verification = {
        "passed": all(r.get("passed") for r in results),
        "steps": [r["step"] for r in results],
        "summary": {r["step"]: r.get("summary", {}) for r in results},
        "results": results,
    }
    atomic_write_json(staging / "forgekit-report.json", verification)
    atomic_write_json(staging / "mtplx_runtime.json", meta.runtime_json(plan, verification))
    atomic_write_bytes(staging / "README.md", meta.model_card(plan, verification).encode())
    checkpoint("publish.meta")
    files = {}
    for p in sorted(staging.iterdir()):
        if p.is_file():
            known = staged["files"].get(p.name)
            files[p.name] = known if known is not None else hash_file(p)
    atomic_write_json(staging / MANIFEST, {"build_key": plan.build_key, "recipe": plan.recipe.name,
                                           "files": files, "objects": dict(plan.file_keys),
                                           "forgekit": __version__})
    checkpoint("publish.manifest")
    _make_durable(staging)
    keys = set(plan.file_keys.values()) | set((read_manifest(out) or {}).get("objects", {}).values())
    with StatMemo().preserving(_inode_mates(ObjectStore(), keys, references(), exclude=out)):
        _swap(staging, out)
    checkpoint("publish.swapped")
    from .lock import write_lock  # issue 5: record resolved sources in <out>.lock.json

    write_lock(plan)
    memo = StatMemo()
    for name, digest in files.items():
        memo.remember(out / name, digest)
    OutputRegistry().add(out, plan.recipe.name, plan.build_key)
    from .verify import report_table
    if results:
        print(report_table(results), flush=True)
    print(f"built {plan.recipe.name}: {out}", flush=True)


def _make_durable(staging: Path) -> None:
    """fsync every file and directory of the staging tree before the swap publishes it, so a
    power loss cannot leave `<out>` naming a file whose blocks never reached the disk."""
    for d in (staging / ".forgekit", staging):
        for p in d.iterdir():
            if p.is_file() and not p.is_symlink():
                fsync_file(p)
        fsync_dir(d)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False where that is not available (other OS, old kernel, a file system without it)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(staging: Path, out: Path) -> None:
    """Replace `out` by `staging`: at every instant `out` is the old artifact, whole, or the new one.

    Linux: one atomic exchange, then the old tree (now under the staging name) is removed.
    Elsewhere: `out` -> `out.old-<pid>`, staging -> `out` (a crash between the two leaves
    the old artifact under that name; the next publish removes it)."""
    from .cache import pid_alive

    for left in out.parent.glob(f"{out.name}.old-*"):  # a swap that was killed halfway
        pid = left.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)) and holds_manifest(left):
            shutil.rmtree(left, ignore_errors=True)
    # Re-checked at the last moment: what is at <out> is still ours to replace, the staging dir too.
    check_output_contents(out)
    check_staging(staging)
    if out.exists() and _exchange(staging, out):
        checkpoint("swap.exchanged")
        fsync_dir(out.parent)
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    checkpoint("swap.exchanged")
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def published(recipe_ref: str) -> bool:
    """<out> holds a build with this build key and every file still has its recorded digest."""
    plan = plan_for(recipe_ref)
    out = plan.recipe.output_dir()
    manifest = read_manifest(out)
    if manifest is None or manifest.get("build_key") != plan.build_key:
        return False
    memo = StatMemo()
    for name, digest in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file() or memo.digest(path) != digest:
            return False
    return True


# ---------------------------------------------------------------- task dicts


def build_tasks(recipe_ref: str):
    """doit task dicts (sub-tasks of `build`) for one recipe."""
    plan = plan_for(recipe_ref)
    lease_objects(plan.file_keys.values())  # gc keeps this build's objects while it runs
    shard_tasks = []
    for file, entries in plan.files.items():
        name = f"shard:{file}"
        shard_tasks.append(f"build:{name}")
        key = plan.file_keys[file]
        yield {"name": name, "actions": [(build_object, [recipe_ref, file])],
               "file_dep": sorted({t.source_file for t in entries}),
               "uptodate": [(object_ready, [recipe_ref, file]), config_changed(key)], "verbosity": 2,
               "doc": f"build {file} into the object cache (key {key[:12]})"}
    def done():
        return [(published, [recipe_ref]), config_changed(plan.build_key)]

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


def clean_output(recipe_ref: str) -> None:
    """`doit clean`: remove the output dir this recipe owns (only if forgekit made it)."""
    out = plan_for(recipe_ref).recipe.output_dir()
    keys = (read_manifest(out) or {}).get("objects", {}).values()
    with StatMemo().preserving(_inode_mates(ObjectStore(), keys, references(), exclude=out)):
        for d in (out, staging_dir(out)):
            if d.is_symlink():
                continue  # never followed; the ownership check at load time already refused it
            if holds_manifest(d) or (d.name.endswith(STAGING) and (d / ".forgekit").is_dir()):
                shutil.rmtree(d, ignore_errors=True)
                print(f"removed {d}")
    OutputRegistry().remove(out)
