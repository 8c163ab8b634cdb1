"""`forgekit cache ls|gc|verify`: what the object store holds, and removing what no build needs."""

from __future__ import annotations

import time
from pathlib import Path

from .. import settings
from ..fileio import stale_temp
from .store import ObjectStore, OutputRegistry, hash_file, read_manifest, references


def cache_ls(root: Path | None = None) -> list[dict]:
    """One row per cached object, newest use first.

    Keys: key, file (output file name it was built as), recipe (recipe that built it),
    used_by (recipe names of registered outputs referencing it), size (bytes),
    created / last_used (unix time), age_days (since last use), referenced (bool),
    path (the object file).
    """
    root = Path(root).resolve() if root else settings.cache_root()
    store = ObjectStore(root)
    refs = references(root)
    now = time.time()
    rows = []
    for key, rec in store.entries():
        path = store.path(key)
        try:
            size = path.stat().st_size
        except OSError:
            size = None
        last = rec.get("last_used", rec.get("created", 0.0))
        rows.append({
            "key": key, "file": rec.get("file", ""), "recipe": rec.get("recipe", ""),
            "used_by": sorted({r["recipe"] or "" for r in refs.get(key, [])}),
            "size": size if size is not None else 0, "created": rec.get("created"), "last_used": last,
            "age_days": round((now - last) / 86400, 3), "referenced": key in refs,
            "missing": size is None, "path": str(path),
        })
    rows.sort(key=lambda r: -(r["last_used"] or 0))
    return rows


def cache_verify(root: Path | None = None, remove: bool = True) -> list[str]:
    """Re-hash every object (ignoring the stat memo); return (and by default remove) the bad ones."""
    root = Path(root).resolve() if root else settings.cache_root()
    store = ObjectStore(root)
    bad = []
    for key, rec in store.entries():
        path = store.path(key)
        ok = path.is_file() and path.stat().st_size == rec.get("size") and hash_file(path) == rec.get("digest")
        if not ok:
            bad.append(key)
            if remove:
                store.remove(key)
                store.memo.forget(path)
        else:
            store.memo.remember(path, rec["digest"])
    return bad


def _age(path: Path, now: float) -> float:
    """Seconds since the file's inode last changed (a rename counts); 0 if it is gone."""
    try:
        return now - path.stat().st_ctime
    except OSError:
        return 0.0


def cache_gc(root: Path | None = None, older_than_days: float | None = None, keep_unreferenced: bool = False,
             dry_run: bool = False) -> dict:
    """Remove cache objects that no build needs.

    An object is *referenced* when the manifest of a registered output directory (one that
    `doit build` published with this cache and that still exists) lists it. gc removes:
      - every unreferenced object (unless keep_unreferenced=True), and
      - with older_than_days=N, also every object last used more than N days ago, even if
        referenced (the published output keeps its own copy; a later rebuild restores the
        object from that output when it still matches, or recomputes it);
      - temp files of interrupted builds (writer process gone, or older than a day),
        records without an object, and registry entries of outputs that no longer exist.
    Returns {"removed": [rows as in cache_ls], "freed_bytes", "kept", "temps_removed", "dry_run"}.
    """
    root = Path(root).resolve() if root else settings.cache_root()
    store = ObjectStore(root)
    registry = OutputRegistry(root)
    if not dry_run:
        for out in registry.all():
            if read_manifest(Path(out["dir"])) is None:
                registry.remove(Path(out["dir"]))
    removed, kept, freed = [], 0, 0
    now = time.time()
    for row in cache_ls(root):
        too_old = older_than_days is not None and (now - (row["last_used"] or 0)) / 86400 > older_than_days
        unreferenced = not row["referenced"] and not keep_unreferenced
        if too_old or unreferenced or row["missing"]:
            removed.append(row)
            freed += row["size"]
            if not dry_run:
                store.remove(row["key"])
                store.memo.forget(Path(row["path"]))
        else:
            kept += 1
    temps = [p for p in store.temps() if stale_temp(p)]
    # Objects without a record: a build killed between rename and record (never served: valid()
    # needs the record). Only ones renamed over a minute ago, so a build committing now keeps its own.
    temps += [p for p in store.root.glob("*/*.safetensors")
              if not store.record_path(p.name.split(".")[0]).is_file() and _age(p, now) > 60]
    for p in temps:
        try:
            freed += p.stat().st_size
            if not dry_run:
                p.unlink()
        except OSError:
            pass
    return {"removed": removed, "freed_bytes": freed, "kept": kept, "temps_removed": len(temps), "dry_run": dry_run}
