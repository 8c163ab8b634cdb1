"""Verify the staged output, write its report and runtime files, and swap it into place.

At every instant `<out>` is the previous artifact, whole, or the new one: the staging dir
is exchanged with it in one atomic step (Linux renameat2 RENAME_EXCHANGE), or, elsewhere,
renamed over it after the old one is moved aside.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from .. import __version__
from ..faults import checkpoint
from ..fileio import atomic_write_bytes, atomic_write_json, fsync_dir, fsync_file, pid_alive
from ..plan import BuildPlan
from ..verify import report_table, run_step, warnings_of
from ..verify.where import verified_where
from . import card, outputs
from .keys import BuildKeys
from .lock import write_lock
from .stage import ensure_staged, inode_mates, staged, staging_dir
from .memo import StatMemo, hash_file
from .names import MANIFEST, STAGING, holds_manifest
from .ownership import check_output_contents, check_staging
from .store import ObjectStore, OutputRegistry, read_manifest, references


def run_verify(plan: BuildPlan, index: int, bodies=None) -> dict:
    """Run verify step `index` on the staging dir; its result is kept there for publish."""
    step = plan.recipe.verify[index]
    staging = staging_dir(plan.recipe.output_dir())
    checkpoint("verify.begin")
    result = run_step(step, staging, plan, bodies)
    checkpoint("verify.done")
    atomic_write_json(staging / ".forgekit" / f"verify-{index}-{step.step}.json", result)
    print(f"  verify {step.step}: ok {json.dumps(result.get('summary', {}), sort_keys=True)}", flush=True)
    for warning in result.get("warnings", []):
        print(f"  verify {step.step}: WARNING: {warning}", flush=True)
    return result


def _verification(plan: BuildPlan, staging: Path, bodies) -> dict:
    results = []
    for i, step in enumerate(plan.recipe.verify):
        path = staging / ".forgekit" / f"verify-{i}-{step.step}.json"
        results.append(json.loads(path.read_text()) if path.is_file() else run_verify(plan, i, bodies))
    return {"passed": all(r.get("passed") for r in results), "steps": [r["step"] for r in results],
            "summary": {r["step"]: r.get("summary", {}) for r in results}, "results": results,
            "verified_on": verified_where(plan), "warnings": warnings_of(results)}


def _write_manifest(plan: BuildPlan, keys: BuildKeys, staging: Path, record: dict) -> dict[str, str]:
    files = {}
    for p in sorted(staging.iterdir()):
        if p.is_file():
            known = record["files"].get(p.name)
            files[p.name] = known if known is not None else hash_file(p)
    atomic_write_json(staging / MANIFEST, {"build_key": keys.build_key, "recipe": plan.recipe.name,
                                           # relative to the output dir, so the bytes do not depend on
                                           # where it was built (`forgekit verify DIR` reads it back)
                                           "recipe_file": os.path.relpath(plan.recipe.recipe_file,
                                                                          plan.recipe.output_dir().resolve()),
                                           "files": files, "objects": dict(keys.file_keys),
                                           "forgekit": __version__})
    return files


def publish(plan: BuildPlan, keys: BuildKeys, pool=None, bodies=None) -> None:
    """Report, runtime file, model card and manifest into staging; then swap it into `<out>`."""
    out = plan.recipe.output_dir()
    if staged(plan, keys) is None and published(plan, keys):
        return  # nothing staged and <out> already is this build (e.g. only publish was forgotten)
    record = ensure_staged(plan, keys, pool)
    staging = staging_dir(out)
    verification = _verification(plan, staging, bodies)
    atomic_write_json(staging / "forgekit-report.json", {**verification, "mtp_head": outputs.head_summary(plan)})
    atomic_write_json(staging / "mtplx_runtime.json", outputs.runtime_json(plan, keys.digests, verification))
    sizes = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file() and p.name != "README.md"}
    text = card.model_card(plan, outputs.config_json(plan), keys.digests, verification, sizes,
                           outputs.verification_status(verification))
    atomic_write_bytes(staging / "README.md", text.encode())
    checkpoint("publish.meta")
    files = _write_manifest(plan, keys, staging, record)
    checkpoint("publish.manifest")
    _make_durable(staging)
    objects = set(keys.file_keys.values()) | set((read_manifest(out) or {}).get("objects", {}).values())
    with StatMemo().preserving(inode_mates(ObjectStore(), objects, references(), exclude=out)):
        swap(staging, out)
    checkpoint("publish.swapped")
    write_lock(plan)  # resolved sources in <out>.lock.json
    memo = StatMemo()
    for name, digest in files.items():
        memo.remember(out / name, digest)
    OutputRegistry().add(out, plan.recipe.name, keys.build_key)
    if verification["results"]:
        print(report_table(verification["results"]), flush=True)
    head = outputs.head_summary(plan)
    if head:
        print(f"MTP head: {head['sidecar']}, {head['source']}", flush=True)
    print(f"built {plan.recipe.name}: {out}", flush=True)


def _make_durable(staging: Path) -> None:
    """fsync every file and directory of the staging tree before the swap publishes it, so a
    power loss cannot leave `<out>` naming a file whose blocks never reached the disk."""
    for d in (staging / ".forgekit", staging):
        for p in d.iterdir():
            if p.is_file() and not p.is_symlink():
                fsync_file(p)
        fsync_dir(d)


def published(plan: BuildPlan, keys: BuildKeys) -> bool:
    """<out> holds a build with this build key and every file still has its recorded digest."""
    out = plan.recipe.output_dir()
    manifest = read_manifest(out)
    if manifest is None or manifest.get("build_key") != keys.build_key:
        return False
    memo = StatMemo()
    for name, digest in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file() or memo.digest(path) != digest:
            return False
    return True


def clean_output(plan: BuildPlan) -> None:
    """`doit clean`: remove the output dir this recipe owns (only if forgekit made it)."""
    out = plan.recipe.output_dir()
    objects = (read_manifest(out) or {}).get("objects", {}).values()
    with StatMemo().preserving(inode_mates(ObjectStore(), objects, references(), exclude=out)):
        for d in (out, staging_dir(out)):
            if d.is_symlink():
                continue  # never followed; the ownership check at load time already refused it
            if holds_manifest(d) or (d.name.endswith(STAGING) and (d / ".forgekit").is_dir()):
                shutil.rmtree(d, ignore_errors=True)
                print(f"removed {d}")
    OutputRegistry().remove(out)


# ---------------------------------------------------------------- the swap


def exchange(a: Path, b: Path) -> bool:
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


def swap(staging: Path, out: Path) -> None:
    """Replace `out` by `staging`: at every instant `out` is the old artifact, whole, or the new one.

    Linux: one atomic exchange, then the old tree (now under the staging name) is removed.
    Elsewhere: `out` -> `out.old-<pid>`, staging -> `out` (a crash between the two leaves
    the old artifact under that name; the next publish removes it)."""
    for left in out.parent.glob(f"{out.name}.old-*"):  # a swap that was killed halfway
        pid = left.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)) and holds_manifest(left):
            shutil.rmtree(left, ignore_errors=True)
    # Re-checked at the last moment: what is at <out> is still ours to replace, the staging dir too.
    check_output_contents(out)
    check_staging(staging)
    if out.exists() and exchange(staging, out):
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
