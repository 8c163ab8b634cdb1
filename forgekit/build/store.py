"""The object store under cache/objects/ and the registry of published outputs.

- Objects are written to a temp name and renamed; each has a sidecar record of its
  digest, and a reused object is checked against it (via the stat memo) before use.
- Every published output is registered (cache/outputs.sqlite3); its manifest names the
  objects it was assembled from (`gc.py` keeps exactly the objects some registered,
  still-existing output references or a running build has leased).
- The store is listed, never globbed: a name read from disk is used only when it fully
  matches one of the exact patterns forgekit writes, only regular files are ever removed,
  and symlinks (to files or directories) are never followed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

from .. import settings
from ..faults import checkpoint
from ..fileio import atomic_write_json, file_mode, fsync_file, make_temp, stale_temp
from . import profile
from .memo import StatMemo, _sqlite, check_sqlite, warn
from .names import MANIFEST

FORMAT_VERSION = 2          # bump when the bytes a shard object holds change for the same plan
COPY_CHUNK = 8 * 2**20


# Exact names forgekit writes under cache/objects/; gc and verify touch nothing else.
SHARD_DIR_RE = re.compile(r"[0-9a-f]{2}")
KEY_RE = re.compile(r"[0-9a-f]{32}")                                   # xxh3_128 hex
STORE_FILE_RE = re.compile(r"(?P<key>[0-9a-f]{32})\.(?P<kind>safetensors|json)")
TEMP_FILE_RE = re.compile(r"\.(?P<key>[0-9a-f]{32})(?:\.json)?\.[0-9]+\.[a-z0-9_]+\.tmp")   # make_temp names
OBJECT_SUFFIX = "safetensors"


def _real_dir_fd(name, dir_fd: int | None = None) -> int | None:
    """A descriptor of the directory `name` if it is a real directory (a symlink is not opened)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None


def _valid_record(data) -> bool:
    """A record as commit writes it: a JSON object with a str digest, an int size, numeric times."""
    if not isinstance(data, dict) or not isinstance(data.get("digest"), str):
        return False
    if type(data.get("size")) is not int:
        return False
    return all(isinstance(data.get(k, 0.0), (int, float)) and not isinstance(data.get(k), bool)
               for k in ("created", "last_used"))


_WARNED: set[str] = set()


class ObjectStore:
    """cache/objects/<key[:2]>/<key>.<suffix> plus <key>.json = {digest, size, created, last_used, ...}."""

    def __init__(self, root: Path | None = None):
        self.base = root or settings.cache_root()
        self.root = self.base / "objects"
        self.memo = StatMemo(self.base)

    def path(self, key: str, suffix: str = OBJECT_SUFFIX) -> Path:
        return self.root / key[:2] / f"{key}.{suffix}"

    def record_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def _read_record(self, key: str) -> tuple[dict | None, bool]:
        """(record, corrupt): (None, False) when there is none, (None, True) when it cannot be used."""
        try:
            data = json.loads(self.record_path(key).read_bytes())
        except FileNotFoundError:
            return None, False
        except (OSError, ValueError):
            return None, True
        return (data, False) if _valid_record(data) else (None, True)

    def record(self, key: str) -> dict | None:
        return self._read_record(key)[0]

    def valid(self, key: str, suffix: str = OBJECT_SUFFIX) -> bool:
        """The object is a regular file whose bytes still hash to the recorded digest.

        A record that is not a valid record (not JSON, not an object, wrong field types) makes
        the object invalid: it is rebuilt and its record rewritten, with one warning line."""
        obj = self.path(key, suffix)
        record, corrupt = self._read_record(key)
        if corrupt and str(obj) not in _WARNED:
            _WARNED.add(str(obj))
            warn(f"{self.record_path(key)} is not a valid cache record; its object is rebuilt")
        try:
            st = os.lstat(obj)
        except OSError:
            return False
        if record is None or not stat.S_ISREG(st.st_mode):
            return False
        return st.st_size == record["size"] and self.memo.digest(obj) == record["digest"]

    def commit(self, key: str, tmp_file: Path, digest: str, suffix: str = OBJECT_SUFFIX, **info) -> Path:
        """Move a finished temp file into the store and record its digest."""
        obj = self.path(key, suffix)
        obj.parent.mkdir(parents=True, exist_ok=True)
        with profile.phase("fsync objects"):
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

    # -- listing and removing: only regular files with forgekit's names, never through a symlink

    def files(self, shard: str | None = None):
        """(shard dir name, file name, lstat) of every regular file in the real shard dirs.

        Shard dirs must be named like forgekit names them and be directories themselves: a
        symlink (to a directory or a file) is skipped, never followed."""
        root_fd = _real_dir_fd(self.root)
        if root_fd is None:
            return
        try:
            for d in [shard] if shard is not None else sorted(os.listdir(root_fd)):
                if not SHARD_DIR_RE.fullmatch(d):
                    continue
                fd = _real_dir_fd(d, dir_fd=root_fd)
                if fd is None:
                    continue
                try:
                    for name in sorted(os.listdir(fd)):
                        try:
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISREG(st.st_mode):
                            yield d, name, st
                finally:
                    os.close(fd)
        finally:
            os.close(root_fd)

    def unlink(self, shard: str, name: str) -> int:
        """Remove `objects/<shard>/<name>` if it is a regular file in a real shard dir; bytes freed."""
        root_fd = _real_dir_fd(self.root)
        if root_fd is None:
            return 0
        try:
            fd = _real_dir_fd(shard, dir_fd=root_fd)
            if fd is None:
                return 0
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    return 0
                os.unlink(name, dir_fd=fd)
                return st.st_size
            except OSError:
                return 0
            finally:
                os.close(fd)
        finally:
            os.close(root_fd)

    def temps(self, key: str | None = None) -> list[Path]:
        """Temp files of make_temp in the store (all of them, or those of one key)."""
        if key is None:
            pattern, shard = TEMP_FILE_RE, None
        else:
            pattern, shard = re.compile(rf"\.{re.escape(key)}(?:\.json)?\.[0-9]+\.[a-z0-9_]+\.tmp"), key[:2]
        return [self.root / d / name for d, name, _ in self.files(shard) if pattern.fullmatch(name)]

    def remove_stale_temps(self, key: str | None = None) -> int:
        """Delete temp files left by killed builds (writer pid gone); returns bytes freed."""
        return sum(self.unlink(p.parent.name, p.name) for p in self.temps(key) if stale_temp(p))

    def entries(self) -> list[tuple[str, dict | None]]:
        """(key, record) for every record file; record None when it is not a valid record."""
        out = []
        for d, name, _ in self.files():
            m = STORE_FILE_RE.fullmatch(name)
            if m and m["kind"] == "json" and name[:2] == d:
                out.append((m["key"], self.record(m["key"])))
        return out

    def objects(self) -> dict[str, os.stat_result]:
        """key -> lstat of every object file (regular, correctly named and placed)."""
        found = {}
        for d, name, st in self.files():
            m = STORE_FILE_RE.fullmatch(name)
            if m and m["kind"] == OBJECT_SUFFIX and name[:2] == d:
                found[m["key"]] = st
        return found

    def remove(self, key: str) -> int:
        """Remove an object and its record (regular files only); bytes freed."""
        if not KEY_RE.fullmatch(key):
            raise ValueError(f"not an object key: {key!r}")
        return self.unlink(key[:2], f"{key}.{OBJECT_SUFFIX}") + self.unlink(key[:2], f"{key}.json")


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
            shutil.copyfileobj(fi, fo, COPY_CHUNK)


# ---------------------------------------------------------------- outputs registry


class OutputRegistry:
    """Output directories published with this cache: dir -> (recipe, build key, time).

    A corrupt registry is refused with one line (CorruptStateFile), not silently replaced:
    it is what tells gc which objects published outputs use, so an empty one would make gc
    treat them all as unreferenced. The user decides to remove it."""

    SCHEMA = "CREATE TABLE IF NOT EXISTS outputs (dir TEXT PRIMARY KEY, recipe TEXT, build_key TEXT, published REAL)"
    REMEDY = ("remove it; each output registers again when it is next built (until then `forgekit cache gc` "
              "counts its objects as unreferenced)")

    def __init__(self, root: Path | None = None):
        root = root or settings.cache_root()
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "outputs.sqlite3"

    def check(self) -> None:
        check_sqlite(self.path, self.REMEDY)

    def add(self, directory: Path, recipe: str, build_key: str) -> None:
        with _sqlite(self.path, self.SCHEMA, self.REMEDY) as db:
            db.execute("INSERT OR REPLACE INTO outputs VALUES (?,?,?,?)",
                       (str(Path(directory).resolve()), recipe, build_key, time.time()))

    def remove(self, directory: Path) -> None:
        with _sqlite(self.path, self.SCHEMA, self.REMEDY) as db:
            db.execute("DELETE FROM outputs WHERE dir=?", (str(Path(directory).resolve()),))

    def all(self) -> list[dict]:
        with _sqlite(self.path, self.SCHEMA, self.REMEDY) as db:
            rows = db.execute("SELECT dir, recipe, build_key, published FROM outputs ORDER BY dir").fetchall()
        return [{"dir": r[0], "recipe": r[1], "build_key": r[2], "published": r[3]} for r in rows]


def read_manifest(directory: Path) -> dict | None:
    try:
        data = json.loads((Path(directory) / MANIFEST).read_bytes())
    except (OSError, ValueError):   # ValueError: not JSON, or not UTF-8
        return None
    return data if isinstance(data, dict) else None


def references(root: Path | None = None) -> dict[str, list[dict]]:
    """object key -> the registered outputs (that still exist) whose manifest lists it."""
    refs: dict[str, list[dict]] = {}
    for out in OutputRegistry(root).all():
        manifest = read_manifest(Path(out["dir"]))
        if manifest is None:
            continue
        objects = manifest.get("objects")
        for name, key in (objects.items() if isinstance(objects, dict) else ()):
            if isinstance(key, str):
                refs.setdefault(key, []).append({"dir": out["dir"], "recipe": manifest.get("recipe"), "file": name})
    return refs
