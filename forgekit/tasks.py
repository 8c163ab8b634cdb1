"""BuildPlan -> doit tasks. Actions are module-level functions taking plain arguments.

Graph for one recipe:
    shard:<file>    one per output safetensors file -> a cache object keyed by its action key
    stage           copy objects + meta files into <out>.staging
    verify:<step>   one per recipe verify step, run on the staging dir
    publish         report, mtplx_runtime.json, model card, manifest; swap staging into <out>

Everything after the shards is up to date exactly when <out> already holds a
published build with the same build key, so a no-op build reads no tensor bytes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

from doit.exceptions import TaskFailed

from . import meta
from .cache import FORMAT_VERSION, ObjectStore, StatMemo, atomic_write_bytes, atomic_write_json, copy_atomic, key_of
from .errors import ForgeError
from .plan import BuildPlan, make_plan
from .recipe import load_recipe

MANIFEST = ".forgekit/manifest.json"
_PLANS: dict[str, BuildPlan] = {}


def library_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("mlx", "gguf", "safetensors")}


def plan_for(recipe_ref: str) -> BuildPlan:
    """Load + plan once per process (actions in worker processes re-plan: it is pure)."""
    if recipe_ref not in _PLANS:
        plan = make_plan(load_recipe(recipe_ref))
        fingerprint(plan)
        _PLANS[recipe_ref] = plan
    return _PLANS[recipe_ref]


def fingerprint(plan: BuildPlan) -> None:
    """Source file digests (memoised by stat) and the action key of every output file."""
    memo = StatMemo()
    used = {t.source_file for t in plan.tensors}
    plan.digests = {role: {str(f): memo.digest(f) for f in src.files if str(f) in used}
                    for role, src in plan.sources.items()}
    flat = {f: d for files in plan.digests.values() for f, d in files.items()}
    versions = library_versions()
    plan.file_keys = {}
    for name, entries in plan.files.items():
        plan.file_keys[name] = key_of({
            "forgekit_format": FORMAT_VERSION, "versions": versions,
            "tensors": [{"key": t.key, "source": t.source_key, "source_digest": flat[t.source_file],
                         "stored_as": t.stored_as, "transforms": t.transforms, "dtype": t.dtype,
                         "shape": t.shape, "quant": t.quant.model_dump() if t.quant else None}
                        for t in entries],
        })
    copied = {n: memo.digest(p) for n, p in meta.copied_files(plan).items()}
    plan.build_key = key_of({
        "files": plan.file_keys, "copied": copied, "config": meta.config_json(plan),
        "verify": [s.model_dump() for s in plan.recipe.verify], "runtime": plan.recipe.runtime,
        "provenance": plan.provenance, "description": plan.recipe.description,
    })


def _forge_errors_fail_cleanly(fn):
    """A ForgeError in an action becomes a one-line doit failure, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ForgeError as exc:
            return TaskFailed(str(exc))

    return wrapper


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".staging")


# ---------------------------------------------------------------- actions


@_forge_errors_fail_cleanly
def build_object(recipe_ref: str, file: str) -> None:
    plan = plan_for(recipe_ref)
    key = plan.file_keys[file]
    store = ObjectStore()
    if store.valid(key):
        return
    tmp = store.temp_path(key)
    try:
        start = time.time()
        digest = _write(plan, file, tmp)
        store.commit(key, tmp, digest, file=file, recipe=plan.recipe.name, seconds=round(time.time() - start, 3))
    finally:
        tmp.unlink(missing_ok=True)
    print(f"  built {file} ({len(plan.files[file])} tensors) in {time.time() - start:.1f}s", flush=True)


def _write(plan: BuildPlan, file: str, tmp: Path) -> str:
    from .write import write_shard

    return write_shard(tmp, plan.files[file], plan.sources)


def object_ready(recipe_ref: str, file: str) -> bool:
    plan = plan_for(recipe_ref)
    return ObjectStore().valid(plan.file_keys[file])


@_forge_errors_fail_cleanly
def stage(recipe_ref: str) -> None:
    plan = plan_for(recipe_ref)
    out = plan.recipe.output_dir()
    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    (staging / ".forgekit").mkdir(parents=True)
    store = ObjectStore()
    for name, key in plan.file_keys.items():
        if not store.valid(key):
            raise ForgeError(f"cache object for {name} ({key}) is missing or corrupt; run the build again")
        copy_atomic(store.path(key), staging / name)
    atomic_write_bytes(staging / "config.json", (json.dumps(meta.config_json(plan), indent=4) + "\n").encode())
    if plan.indexed_files:
        atomic_write_json(staging / "model.safetensors.index.json", meta.index_json(plan))
    for name, src in meta.copied_files(plan).items():
        copy_atomic(src, staging / name)


@_forge_errors_fail_cleanly
def verify_step(recipe_ref: str, index: int) -> None:
    from .verify import run_step

    plan = plan_for(recipe_ref)
    step = plan.recipe.verify[index]
    staging = staging_dir(plan.recipe.output_dir())
    result = run_step(step, staging, plan)
    atomic_write_json(staging / ".forgekit" / f"verify-{index}-{step.step}.json", result)
    print(f"  verify {step.step}: ok {json.dumps(result.get('summary', {}), sort_keys=True)}", flush=True)


@_forge_errors_fail_cleanly
def publish(recipe_ref: str) -> None:
    plan = plan_for(recipe_ref)
    out = plan.recipe.output_dir()
    staging = staging_dir(out)
    results = [json.loads(p.read_text()) for p in sorted((staging / ".forgekit").glob("verify-*.json"),
                                                          key=lambda p: int(p.name.split("-")[1]))]
    verification = {
        "passed": all(r.get("passed") for r in results),
        "steps": [r["step"] for r in results],
        "summary": {r["step"]: r.get("summary", {}) for r in results},
        "results": results,
    }
    atomic_write_json(staging / "forgekit-report.json", verification)
    atomic_write_json(staging / "mtplx_runtime.json", meta.runtime_json(plan, verification))
    atomic_write_bytes(staging / "README.md", meta.model_card(plan, verification).encode())
    memo = StatMemo()
    files = {p.name: memo.digest(p) for p in sorted(staging.iterdir()) if p.is_file()}
    atomic_write_json(staging / MANIFEST, {"build_key": plan.build_key, "recipe": plan.recipe.name, "files": files})
    _swap(staging, out)
    memo = StatMemo()
    for name, digest in files.items():
        memo.remember(out / name, digest)
    print(f"built {plan.recipe.name}: {out}", flush=True)


def _swap(staging: Path, out: Path) -> None:
    """Replace `out` by `staging`: the old artifact stays whole until the new one is in place."""
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def published(recipe_ref: str) -> bool:
    """<out> holds a build with this build key and every file still has its recorded digest."""
    plan = plan_for(recipe_ref)
    out = plan.recipe.output_dir()
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("build_key") != plan.build_key:
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
    shard_tasks = []
    for file in plan.files:
        name = f"shard:{file}"
        shard_tasks.append(f"build:{name}")
        yield {"name": name, "actions": [(build_object, [recipe_ref, file])],
               "uptodate": [(object_ready, [recipe_ref, file])], "verbosity": 2,
               "doc": f"build {file} into the object cache"}
    done = (published, [recipe_ref])
    yield {"name": "stage", "actions": [(stage, [recipe_ref])], "task_dep": shard_tasks,
           "uptodate": [done], "verbosity": 2, "doc": "assemble the output in a staging dir"}
    verify_tasks = []
    for i, step in enumerate(plan.recipe.verify):
        name = f"verify:{i}:{step.step}"
        verify_tasks.append(f"build:{name}")
        yield {"name": name, "actions": [(verify_step, [recipe_ref, i])], "task_dep": ["build:stage"],
               "uptodate": [done], "verbosity": 2, "doc": f"verification step {step.step}"}
    yield {"name": "publish", "actions": [(publish, [recipe_ref])],
           "task_dep": ["build:stage"] + verify_tasks, "uptodate": [done], "verbosity": 2,
           "doc": "write report + runtime file, then swap the staging dir into place",
           "clean": [(clean_output, [recipe_ref])]}


def clean_output(recipe_ref: str) -> None:
    """`doit clean`: remove the output dir this recipe owns (only if forgekit made it)."""
    out = plan_for(recipe_ref).recipe.output_dir()
    for d in (out, staging_dir(out)):
        if (d / MANIFEST).is_file() or d.name.endswith(".staging"):
            shutil.rmtree(d, ignore_errors=True)
            print(f"removed {d}")


def fail(message: str) -> None:
    print(f"forgekit: {message}", file=sys.stderr)
    raise SystemExit(2)
