"""Content addressing: xxh3 fingerprints, a stat memo, the object store under cache/,
the registry of published outputs, and `cache ls` / `cache gc`.

- File digests are memoised by (path, size, mtime_ns, ctime_ns, inode): an unchanged
  source is never re-read to decide that nothing changed, and an edited file is re-hashed
  even if its size and mtime were put back (ctime cannot be set by a user). Our own hard
  links change ctime without changing bytes: `StatMemo.preserving` carries the digests of
  the paths involved across those operations (only entries valid before the operation).
  `cache_verify` re-hashes every object regardless.
- Objects are written to a temp name and renamed; each has a sidecar record of its
  digest, and a reused object is checked against it (via the stat memo) before use.
- Every published output is registered (cache/outputs.sqlite3); its manifest names the
  objects it was assembled from. `cache_gc` keeps exactly the objects some registered,
  still-existing output references (see its docstring).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import xxhash

from .faults import checkpoint
from .ownership import MANIFEST  # inside a published output dir

FORMAT_VERSION = 2          # bump when the bytes a shard object holds change for the same plan
READ_CHUNK = 8 * 2**20


@functools.cache
def file_mode() -> int:
    """0o666 minus the process umask (read once, on first use: os.umask can only be read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
STALE_TEMP_SECONDS = 24 * 3600         # gc removes temp files older than this even if their pid is alive


def make_temp(directory: Path, name: str) -> Path:
    """A fresh temp file next to its final place, with normal (umask) permissions.

    The name carries the writer's pid (`.<name>.<pid>.<random>.tmp`) so that files left
    by a killed build can be recognised and removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.{os.getpid()}.", suffix=".tmp")
    os.fchmod(fd, file_mode())
    os.close(fd)
    return Path(tmp)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_owner(path: Path) -> int | None:
    """pid encoded in a make_temp name, or None."""
    parts = path.name.split(".")
    # ['', name..., pid, random, 'tmp']
    if len(parts) >= 5 and parts[-1] == "tmp" and parts[-3].isdigit():
        return int(parts[-3])
    return None


def stale_temp(path: Path, now: float | None = None) -> bool:
    """A temp file whose writer is gone (or which is older than a day)."""
    pid = _temp_owner(path)
    if pid == os.getpid():
        return False
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    if age > STALE_TEMP_SECONDS:
        return True
    return pid is not None and not pid_alive(pid)


def cache_root() -> Path:
    return Path(os.environ.get("FORGEKIT_CACHE", "cache")).resolve()


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def key_of(obj) -> str:
    """Action key: xxh3_128 of canonical JSON."""
    return xxhash.xxh3_128_hexdigest(canonical(obj))


def hash_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


HASH_WINDOW = 64 * 2**20


def hash_file(path: Path) -> str:
    """xxh3_128 of a file's bytes.

    Large files are hashed through 64 MiB memory-map windows (about twice as fast as read():
    no copy out of the page cache; resident memory stays one window), small ones with read().
    """
    import mmap

    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        if size >= HASH_WINDOW:
            try:
                while offset < size:
                    n = min(HASH_WINDOW, size - offset)
                    with mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=offset) as m:
                        h.update(m)
                    offset += n
                    checkpoint("cache.hash")
            except (OSError, ValueError):
                pass  # fall back to read() from where we are
        f.seek(offset)
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(view):
            h.update(view[:n])
            checkpoint("cache.hash")
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@contextmanager
def _sqlite(path: Path, schema: str):
    db = sqlite3.connect(path, timeout=60)
    try:
        db.execute(schema)
        yield db
        db.commit()
    finally:
        db.close()


class StatMemo:
    """(path, size, mtime_ns, ctime_ns, inode) -> digest, in one sqlite file (safe across processes)."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS memo2 (path TEXT PRIMARY KEY, size INT, mtime INT, ctime INT, "
              "inode INT, digest TEXT)")

    def __init__(self, root: Path | None = None):
        root = root or cache_root()
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "stat-memo.sqlite3"

    def _db(self):
        return _sqlite(self.path, self.SCHEMA)

    def lookup(self, path: Path, st: os.stat_result | None = None) -> str | None:
        """The memoised digest if the file is unchanged since it was recorded, else None."""
        path = Path(path).resolve()
        st = st or path.stat()
        with self._db() as db:
            row = db.execute("SELECT size, mtime, ctime, inode, digest FROM memo2 WHERE path=?",
                             (str(path),)).fetchone()
        if row and tuple(row[:4]) == _stat_key(st):
            return row[4]
        return None

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        known = self.lookup(path, st)
        if known is not None:
            return known
        digest = hash_file(path)
        after = path.stat()
        if _stat_key(after) == _stat_key(st):  # not modified while we read it
            self.remember(path, digest, after)
        return digest

    def remember(self, path: Path, digest: str, st: os.stat_result | None = None) -> None:
        path = Path(path).resolve()
        st = st or path.stat()
        checkpoint("memo.remember")
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO memo2 VALUES (?,?,?,?,?,?)", (str(path), *_stat_key(st), digest))

    @contextmanager
    def preserving(self, paths):
        """Keep the memo entries of `paths` across a link/unlink we make (it changes ctime, not bytes).

        Only entries that are valid before the operation are carried over, so a file that was
        modified earlier is still re-hashed.
        """
        before = {}
        for p in paths:
            try:
                digest = self.lookup(p)
            except OSError:
                continue
            if digest is not None:
                before[Path(p)] = digest
        yield
        for p, digest in before.items():
            try:
                self.remember(p, digest)
            except OSError:
                pass

    def forget(self, path: Path) -> None:
        with self._db() as db:
            db.execute("DELETE FROM memo2 WHERE path=?", (str(Path(path).resolve()),))


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it survives a power loss once this returns)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # no directory fds here (not POSIX); the rename is as durable as the OS makes it
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot sync a dir
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = make_temp(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        checkpoint("atomic.tmp-written")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno:  # name the file (e.g. disk full)
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


class ObjectStore:
    """cache/objects/<key[:2]>/<key>.<suffix> plus <key>.json = {digest, size, created, last_used, ...}."""

    def __init__(self, root: Path | None = None):
        self.base = root or cache_root()
        self.root = self.base / "objects"
        self.memo = StatMemo(self.base)

    def path(self, key: str, suffix: str = "safetensors") -> Path:
        return self.root / key[:2] / f"{key}.{suffix}"

    def record_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def record(self, key: str) -> dict | None:
        try:
            return json.loads(self.record_path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def valid(self, key: str, suffix: str = "safetensors") -> bool:
        """The object exists and its bytes still hash to the recorded digest."""
        obj = self.path(key, suffix)
        record = self.record(key)
        if record is None or not obj.is_file():
            return False
        return obj.stat().st_size == record.get("size") and self.memo.digest(obj) == record.get("digest")

    def commit(self, key: str, tmp_file: Path, digest: str, suffix: str = "safetensors", **info) -> Path:
        """Move a finished temp file into the store and record its digest."""
        obj = self.path(key, suffix)
        obj.parent.mkdir(parents=True, exist_ok=True)
        fsync_file(tmp_file)   # the data is on disk before the name says it is there
        os.replace(tmp_file, obj)
        checkpoint("commit.renamed")
        try:
            self.memo.remember(obj, digest)
            now = time.time()
            atomic_write_json(self.record_path(key), {"digest": digest, "size": obj.stat().st_size,
                                                      "created": now, "last_used": now, **info})
            # (atomic_write_json fsyncs the object's directory: the object's rename and its record)
        except BaseException:
            obj.unlink(missing_ok=True)  # never leave an object without its record (e.g. disk full)
            raise
        checkpoint("commit.recorded")
        return obj

    def touch(self, key: str) -> None:
        """Record a use (gc's age is the time since the last build that wrote or staged it)."""
        record = self.record(key)
        if record is not None and time.time() - record.get("last_used", 0) > 60:
            record["last_used"] = time.time()
            try:
                atomic_write_json(self.record_path(key), record)
            except OSError:
                pass

    def temp_path(self, key: str) -> Path:
        self.remove_stale_temps(key)
        return make_temp(self.root / key[:2], key)

    def temps(self, key: str | None = None) -> list[Path]:
        pattern = f"{key[:2]}/.{key}.*.tmp" if key else "*/.*.tmp"
        return sorted(self.root.glob(pattern))

    def remove_stale_temps(self, key: str | None = None) -> int:
        """Delete temp files left by killed builds (writer pid gone); returns bytes freed."""
        freed = 0
        for p in self.temps(key):
            if stale_temp(p):
                try:
                    freed += p.stat().st_size
                    p.unlink()
                except OSError:
                    pass
        return freed

    def entries(self) -> list[tuple[str, dict]]:
        out = []
        for rec in sorted(self.root.glob("*/*.json")):
            try:
                out.append((rec.stem, json.loads(rec.read_text())))
            except (OSError, json.JSONDecodeError):
                out.append((rec.stem, {}))
        return out

    def remove(self, key: str) -> None:
        for p in self.root.glob(f"{key[:2]}/{key}.*"):
            p.unlink(missing_ok=True)


def place_file(src: Path, dst: Path, link: bool = True) -> str:
    """Put `src`'s bytes at `dst` (replacing it atomically); returns "link" or "copy".

    A hard link when `link` and possible (same file system): the output file then shares
    its inode with `src`, which costs no time and no disk. Editing such a file in place also
    changes the other name; for a cache object that is detected before the object is ever
    reused (size/mtime/ctime no longer match the stat memo, so it is re-hashed against its
    record) and the object is rebuilt, never served. Callers wrap this in
    `StatMemo.preserving` for the names that share the inode.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.place.tmp")
    tmp.unlink(missing_ok=True)
    how = "copy"
    if link:
        try:
            os.link(src, tmp)
            how = "link"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
    if how == "copy":
        _copy_file(src, tmp)
        fsync_file(tmp)
    checkpoint("place.tmp")
    os.replace(tmp, dst)
    return how


def _copy_file(src: Path, dst: Path) -> None:
    """In-kernel copy (reflink where the file system supports it), else a plain copy.

    `dst` is created exclusively and never through a symlink (a name planted there is an error)."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode())
    with open(src, "rb") as fi, open(fd, "wb") as fo:
        left = os.fstat(fi.fileno()).st_size
        if hasattr(os, "copy_file_range"):
            try:
                while left > 0:
                    n = os.copy_file_range(fi.fileno(), fo.fileno(), min(left, 2**30))
                    if n == 0:
                        break
                    left -= n
            except OSError:
                pass
        if left:
            fi.seek(0)
            fo.seek(0)
            fo.truncate(0)
            shutil.copyfileobj(fi, fo, READ_CHUNK)


def link_outputs() -> bool:
    """Whether outputs may share inodes with cache objects (FORGEKIT_COPY_OUTPUTS=1: never)."""
    return os.environ.get("FORGEKIT_COPY_OUTPUTS", "") in ("", "0")


# ---------------------------------------------------------------- outputs registry


class OutputRegistry:
    """Output directories published with this cache: dir -> (recipe, build key, time)."""

    SCHEMA = "CREATE TABLE IF NOT EXISTS outputs (dir TEXT PRIMARY KEY, recipe TEXT, build_key TEXT, published REAL)"

    def __init__(self, root: Path | None = None):
        root = root or cache_root()
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "outputs.sqlite3"

    def add(self, directory: Path, recipe: str, build_key: str) -> None:
        with _sqlite(self.path, self.SCHEMA) as db:
            db.execute("INSERT OR REPLACE INTO outputs VALUES (?,?,?,?)",
                       (str(Path(directory).resolve()), recipe, build_key, time.time()))

    def remove(self, directory: Path) -> None:
        with _sqlite(self.path, self.SCHEMA) as db:
            db.execute("DELETE FROM outputs WHERE dir=?", (str(Path(directory).resolve()),))

    def all(self) -> list[dict]:
        with _sqlite(self.path, self.SCHEMA) as db:
            rows = db.execute("SELECT dir, recipe, build_key, published FROM outputs ORDER BY dir").fetchall()
        return [{"dir": r[0], "recipe": r[1], "build_key": r[2], "published": r[3]} for r in rows]


def read_manifest(directory: Path) -> dict | None:
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def references(root: Path | None = None) -> dict[str, list[dict]]:
    """object key -> the registered outputs (that still exist) whose manifest lists it."""
    refs: dict[str, list[dict]] = {}
    for out in OutputRegistry(root).all():
        manifest = read_manifest(Path(out["dir"]))
        if manifest is None:
            continue
        for name, key in manifest.get("objects", {}).items():
            refs.setdefault(key, []).append({"dir": out["dir"], "recipe": manifest.get("recipe"), "file": name})
    return refs


# ---------------------------------------------------------------- cache ls / gc


def cache_ls(root: Path | None = None) -> list[dict]:
    """One row per cached object, newest use first.

    Keys: key, file (output file name it was built as), recipe (recipe that built it),
    used_by (recipe names of registered outputs referencing it), size (bytes),
    created / last_used (unix time), age_days (since last use), referenced (bool),
    path (the object file).
    """
    root = Path(root).resolve() if root else cache_root()
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
    root = Path(root).resolve() if root else cache_root()
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
    root = Path(root).resolve() if root else cache_root()
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
