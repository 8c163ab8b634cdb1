"""Content addressing: xxh3 fingerprints, a stat memo, and the object store under cache/.

- File digests are memoised by (path, size, mtime_ns, inode): an unchanged source is
  never re-read to decide that nothing changed.
- Objects are written to a temp name and renamed; each has a sidecar record of its
  digest, and a reused object is checked against it (via the stat memo) before use.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import xxhash

FORMAT_VERSION = 1
READ_CHUNK = 8 * 2**20
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def make_temp(directory: Path, name: str) -> Path:
    """A fresh temp file next to its final place, with normal (umask) permissions."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return Path(tmp)


def cache_root() -> Path:
    return Path(os.environ.get("FORGEKIT_CACHE", "cache")).resolve()


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def key_of(obj) -> str:
    """Action key: xxh3_128 of canonical JSON."""
    return xxhash.xxh3_128_hexdigest(canonical(obj))


def hash_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class StatMemo:
    """(path, size, mtime_ns, inode) -> digest, in one sqlite file (safe across processes)."""

    def __init__(self, root: Path | None = None):
        root = root or cache_root()
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "stat-memo.sqlite3"

    @contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=60)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS memo (path TEXT PRIMARY KEY, size INT, mtime INT, inode INT, digest TEXT)")
            yield db
            db.commit()
        finally:
            db.close()

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        with self._db() as db:
            row = db.execute("SELECT size, mtime, inode, digest FROM memo WHERE path=?", (str(path),)).fetchone()
            if row and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ino):
                return row[3]
        digest = hash_file(path)
        self.remember(path, digest, st)
        return digest

    def remember(self, path: Path, digest: str, st: os.stat_result | None = None) -> None:
        path = Path(path).resolve()
        st = st or path.stat()
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO memo VALUES (?,?,?,?,?)",
                       (str(path), st.st_size, st.st_mtime_ns, st.st_ino, digest))

    def forget(self, path: Path) -> None:
        with self._db() as db:
            db.execute("DELETE FROM memo WHERE path=?", (str(Path(path).resolve()),))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = make_temp(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


class ObjectStore:
    """cache/objects/<key[:2]>/<key>.<suffix> plus <key>.json = {digest, size, created}."""

    def __init__(self, root: Path | None = None):
        self.root = (root or cache_root()) / "objects"
        self.memo = StatMemo(root or cache_root())

    def path(self, key: str, suffix: str = "safetensors") -> Path:
        return self.root / key[:2] / f"{key}.{suffix}"

    def record_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def valid(self, key: str, suffix: str = "safetensors") -> bool:
        """The object exists and its bytes still hash to the recorded digest."""
        obj, rec = self.path(key, suffix), self.record_path(key)
        if not obj.is_file() or not rec.is_file():
            return False
        try:
            record = json.loads(rec.read_text())
        except json.JSONDecodeError:
            return False
        return obj.stat().st_size == record.get("size") and self.memo.digest(obj) == record.get("digest")

    def commit(self, key: str, tmp_file: Path, digest: str, suffix: str = "safetensors", **info) -> Path:
        """Move a finished temp file into the store and record its digest."""
        obj = self.path(key, suffix)
        obj.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_file, obj)
        self.memo.remember(obj, digest)
        atomic_write_json(self.record_path(key), {"digest": digest, "size": obj.stat().st_size,
                                                  "created": time.time(), **info})
        return obj

    def temp_path(self, key: str) -> Path:
        return make_temp(self.root, key)

    def entries(self) -> list[tuple[str, dict]]:
        out = []
        for rec in sorted(self.root.glob("*/*.json")):
            try:
                out.append((rec.stem, json.loads(rec.read_text())))
            except json.JSONDecodeError:
                out.append((rec.stem, {}))
        return out

    def remove(self, key: str) -> None:
        for p in self.root.glob(f"{key[:2]}/{key}.*"):
            p.unlink(missing_ok=True)


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy an object into an output dir via temp + rename.

    A copy, not a hard link: editing an output file must never reach into the cache.
    """
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
