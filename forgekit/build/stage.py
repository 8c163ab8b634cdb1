"""Staging: the output assembled in `<out>.staging` from cache objects (hard links where
possible) and the meta files, with a record of what was put there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import settings
from ..errors import ForgeError
from ..faults import checkpoint
from ..fileio import atomic_write_bytes, atomic_write_json
from ..plan import BuildPlan
from . import outputs
from .keys import BuildKeys
from .shard import build_into_store
from .memo import StatMemo, hash_bytes
from .names import STAGING, sibling
from .ownership import check_staging
from .store import ObjectStore, place_file, read_manifest, references

STAGED = ".forgekit/staged.json"     # inside the staging dir: what stage put there


def staging_dir(out: Path) -> Path:
    return sibling(out, STAGING)


def staged(plan: BuildPlan, keys: BuildKeys) -> dict | None:
    """The staging dir's record, if it holds this build key."""
    staging = staging_dir(plan.recipe.output_dir())
    try:
        record = json.loads((staging / STAGED).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("build_key") != keys.build_key:
        return None
    files = record.get("files")
    if not isinstance(files, dict) or not all((staging / n).is_file() for n in files):
        return None
    return record


def ensure_staged(plan: BuildPlan, keys: BuildKeys, pool=None) -> dict:
    record = staged(plan, keys)
    if record is None:
        stage(plan, keys, pool)
        record = staged(plan, keys)
    if record is None:
        raise ForgeError(f"{staging_dir(plan.recipe.output_dir())}: staging failed to produce this build; "
                         "run the build again")
    return record


def inode_mates(store: ObjectStore, keys, refs: dict, exclude: Path | None = None) -> list[Path]:
    """Names that may share an inode with these objects: the objects and the published
    outputs (from the registry) that reference them. A link/unlink we make changes their
    ctime, not their bytes, so their stat-memo entries are carried over (StatMemo.preserving)."""
    paths = []
    for key in keys:
        paths.append(store.path(key))
        paths += [Path(r["dir"]) / r["file"] for r in refs.get(key, [])
                  if exclude is None or Path(r["dir"]) != exclude.resolve()]
    return paths


def _place_shards(plan: BuildPlan, keys: BuildKeys, staging: Path, pool) -> dict[str, str]:
    out = plan.recipe.output_dir()
    store = ObjectStore()
    memo = StatMemo()
    current = read_manifest(out) or {}
    refs = references()
    placed: dict[str, str] = {}
    for name, key in keys.file_keys.items():
        if not store.valid(key):  # vanished or was tampered with since the shard task ran
            print(f"  cache object for {name} is missing or corrupt: rebuilding it", flush=True)
            build_into_store(plan, keys, name, store, pool)
        digest = store.record(key)["digest"]
        published_copy = out / name
        checkpoint("stage.file")
        with memo.preserving(inode_mates(store, [key], refs) + [published_copy]):
            if current.get("files", {}).get(name) == digest and published_copy.is_file() \
                    and memo.lookup(published_copy) == digest:
                place_file(published_copy, staging / name, link=True)   # the same bytes are already out there
            else:
                place_file(store.path(key), staging / name, link=not settings.copy_outputs())
        placed[name] = digest
        store.touch(key)
    return placed


def stage(plan: BuildPlan, keys: BuildKeys, pool=None) -> None:
    out = plan.recipe.output_dir()
    staging = staging_dir(out)
    check_staging(staging)  # a symlink or a foreign dir there is refused, never followed nor emptied
    shutil.rmtree(staging, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    (staging / ".forgekit").mkdir()
    checkpoint("stage.begin")
    placed = _place_shards(plan, keys, staging, pool)
    config = (json.dumps(outputs.config_json(plan), indent=4) + "\n").encode()
    atomic_write_bytes(staging / "config.json", config)
    placed["config.json"] = hash_bytes(config)
    if plan.indexed_files:
        index = (json.dumps(outputs.index_json(plan), indent=2) + "\n").encode()
        atomic_write_bytes(staging / "model.safetensors.index.json", index)
        placed["model.safetensors.index.json"] = hash_bytes(index)
    memo = StatMemo()
    for name, src in outputs.copied_files(plan).items():
        place_file(src, staging / name, link=False)
        placed[name] = memo.digest(src)
    checkpoint("stage.recorded")
    atomic_write_json(staging / STAGED, {"build_key": keys.build_key, "files": placed,
                                         "objects": dict(keys.file_keys)})
