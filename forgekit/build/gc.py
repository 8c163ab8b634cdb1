"""`forgekit cache ls|gc|verify`: what the object store holds, and removing what no build needs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .. import settings
from ..fileio import stale_temp
from .leases import leased_keys
from .memo import hash_file
from .store import ObjectStore, OutputRegistry, read_manifest, references



def cache_ls(root: Path | None = None) -> list[dict]:
    """One row per cached object record, newest use first.

    Keys: key, file (output file name it was built as), recipe (recipe that built it),
    used_by (recipe names of registered outputs referencing it), size (bytes),
    created / last_used (unix time), age_days (since last use), referenced (bool),
    missing (no object file), bad_record (the record is not a valid record: the object
    is never served), path (the object file).
    """
    root = Path(root).resolve() if root else settings.cache_root()
    store = ObjectStore(root)
    refs = references(root)
    objects = store.objects()
    now = time.time()
    rows = []
    for key, rec in store.entries():
        st = objects.get(key)
        info = rec or {}
        last = info.get("last_used", info.get("created", 0.0))
        rows.append({
            "key": key, "file": str(info.get("file", "")), "recipe": str(info.get("recipe", "")),
            "used_by": sorted({str(r["recipe"] or "") for r in refs.get(key, [])}),
            "size": st.st_size if st is not None else 0, "created": info.get("created"), "last_used": last,
            "age_days": round((now - last) / 86400, 3), "referenced": key in refs,
            "missing": st is None, "bad_record": rec is None, "path": str(store.path(key)),
        })
    rows.sort(key=lambda r: -(r["last_used"] or 0))
    return rows


def cache_verify(root: Path | None = None, remove: bool = True) -> list[str]:
    """Re-hash every object (ignoring the stat memo); return (and by default remove) the bad ones.

    Bad: the record is not a valid record, the object file is missing or not a regular file,
    or its size or bytes differ from the record. Removing one deletes exactly
    `objects/<key[:2]>/<key>.safetensors` and `<key>.json` when they are regular files."""
    root = Path(root).resolve() if root else settings.cache_root()
    store = ObjectStore(root)
    objects = store.objects()
    bad = []
    for key, rec in store.entries():
        path = store.path(key)
        st = objects.get(key)
        ok = (rec is not None and st is not None and st.st_size == rec["size"]
              and hash_file(path) == rec["digest"])
        if not ok:
            bad.append(key)
            if remove:
                store.remove(key)
                store.memo.forget(path)
        else:
            store.memo.remember(path, rec["digest"])
    return bad


def cache_gc(root: Path | None = None, older_than_days: float | None = None, keep_unreferenced: bool = False,
             dry_run: bool = False) -> dict:
    """Remove cache objects that no build needs.

    An object is *referenced* when the manifest of a registered output directory (one that
    `doit build` published with this cache and that still exists) lists it, and *leased*
    when a running build's lease (cache/leases/<pid>.json, see lease_objects) names it.
    Leased objects are always kept. Otherwise gc removes:
      - every unreferenced object (unless keep_unreferenced=True), and
      - with older_than_days=N, also every object last used more than N days ago, even if
        referenced (the published output keeps its own copy; a later rebuild restores the
        object from that output when it still matches, or recomputes it);
      - objects whose record is not a valid record (never served), and records without an object;
      - temp files of interrupted builds (writer process gone, or older than a day), objects
        without a record renamed over a minute ago (a build killed before recording it),
        leases of dead processes, and registry entries of outputs that no longer exist.
    Only regular files named exactly as forgekit names them, found by listing the real (not
    symlinked) shard directories under cache/objects/, are ever removed.
    Returns {"removed": [rows as in cache_ls], "freed_bytes", "kept", "leased", "temps_removed", "dry_run"}.
    """
    root = Path(root).resolve() if root else settings.cache_root()
    store = ObjectStore(root)
    registry = OutputRegistry(root)
    if not dry_run:
        for out in registry.all():
            if read_manifest(Path(out["dir"])) is None:
                registry.remove(Path(out["dir"]))
    removed, kept, leased, freed = [], 0, 0, 0
    now = time.time()
    rows = cache_ls(root)
    protected = leased_keys(root, remove_stale=not dry_run)   # read after listing: see lease_objects
    for row in rows:
        if row["key"] in protected:
            kept += 1
            leased += 1
            continue
        too_old = older_than_days is not None and (now - (row["last_used"] or 0)) / 86400 > older_than_days
        unreferenced = not row["referenced"] and not keep_unreferenced
        if too_old or unreferenced or row["missing"] or row["bad_record"]:
            removed.append(row)
            freed += row["size"]
            if not dry_run:
                store.remove(row["key"])
                store.memo.forget(Path(row["path"]))
        else:
            kept += 1
    temps = _strays(store, protected, now)
    freed += _remove(store, temps, dry_run)
    return {"removed": removed, "freed_bytes": freed, "kept": kept, "leased": leased,
            "temps_removed": len(temps), "dry_run": dry_run}


def _strays(store: ObjectStore, protected: set[str], now: float) -> list[Path]:
    """Temp files of interrupted builds, and objects without a record: a build killed between
    rename and record (never served: valid() needs the record). Only objects renamed over a
    minute ago, so a build committing now keeps its own."""
    temps = [p for p in store.temps() if stale_temp(p)]
    recorded = {key for key, _ in store.entries()}
    temps += [store.path(key) for key, st in store.objects().items()
              if key not in recorded and key not in protected and now - st.st_ctime > 60]
    return temps


def _remove(store: ObjectStore, paths: list[Path], dry_run: bool) -> int:
    """Remove (or, dry run, just size) store files; bytes freed."""
    freed = 0
    for p in paths:
        if dry_run:
            try:
                freed += os.lstat(p).st_size
            except OSError:
                pass
        else:
            freed += store.unlink(p.parent.name, p.name)
    return freed
