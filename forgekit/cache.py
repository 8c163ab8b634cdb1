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
  still-existing output references or a running build has leased (see its docstring).
- gc and verify find files by listing the store, never by globbing: a name read from disk
  is used only when it fully matches one of the exact patterns forgekit writes, only
  regular files are ever removed, and symlinks (to files or directories) are never followed.
"""

from __future__ import annotations

import atexit
import errno
import functools
import json
import os
import re
import shutil
import sqlite3
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import xxhash

from .errors import ForgeError
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


class CorruptStateFile(ForgeError):
    """A state file under the cache (sqlite db, cache record) that cannot be read; the message
    names it and says how to recover."""

    def __init__(self, path: Path, cause: str, remedy: str):
        super().__init__(f"{path} is corrupt ({cause}); {remedy}")
        self.path = Path(path)
        self.cause = cause


def corrupt_sqlite(exc: BaseException) -> bool:
    """A sqlite error that means the file is damaged or not a database (not: busy, locked, missing)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.DatabaseError) and code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return type(exc) is sqlite3.DatabaseError  # older Pythons: no code, but "not a database" is this exact type


def check_sqlite(path: Path, remedy: str) -> None:
    """Raise CorruptStateFile unless the sqlite file at `path` is absent or passes `PRAGMA quick_check`."""
    if not Path(path).exists():
        return
    try:
        db = sqlite3.connect(path, timeout=60)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if corrupt_sqlite(exc):
            raise CorruptStateFile(path, str(exc), remedy) from None
        raise
    if rows != [("ok",)]:
        raise CorruptStateFile(path, str(rows[0][0]) if rows else "quick_check failed", remedy)


@contextmanager
def _sqlite(path: Path, schema: str, remedy: str):
    try:
        db = sqlite3.connect(path, timeout=60)
        try:
            db.execute(schema)
            yield db
            db.commit()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if corrupt_sqlite(exc):
            raise CorruptStateFile(path, str(exc), remedy) from None
        raise


def warn(message: str) -> None:
    print(f"forgekit: warning: {message}", file=sys.stderr, flush=True)


class StatMemo:
    """(path, size, mtime_ns, ctime_ns, inode) -> digest, in one sqlite file (safe across processes).

    A corrupt memo file is replaced by an empty one with a warning line, not refused: it is a
    pure cache (an entry is only used while the file's size, mtime, ctime and inode are
    unchanged), so losing it costs re-hashing, never a wrong answer.
    """

    SCHEMA = ("CREATE TABLE IF NOT EXISTS memo2 (path TEXT PRIMARY KEY, size INT, mtime INT, ctime INT, "
              "inode INT, digest TEXT)")

    def __init__(self, root: Path | None = None):
        root = root or cache_root()
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "stat-memo.sqlite3"

    def _run(self, sql: str, params: tuple = ()) -> list:
        """One statement on the memo; a corrupt memo file is replaced and the statement retried once."""
        for attempt in (1, 2):
            try:
                with _sqlite(self.path, self.SCHEMA, "remove it") as db:
                    return db.execute(sql, params).fetchall()
            except CorruptStateFile as exc:
                if attempt == 2:
                    raise
                self._reset(exc)
        return []

    def check(self) -> None:
        """Replace the memo now if it is corrupt (a build calls this before it starts)."""
        try:
            check_sqlite(self.path, "remove it")
        except CorruptStateFile as exc:
            self._reset(exc)

    def _reset(self, exc: CorruptStateFile) -> None:
        warn(f"{self.path} is corrupt ({exc.cause}); replaced it by an empty stat memo (it only saves re-hashing)")
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def lookup(self, path: Path, st: os.stat_result | None = None) -> str | None:
        """The memoised digest if the file is unchanged since it was recorded, else None."""
        path = Path(path).resolve()
        st = st or path.stat()
        rows = self._run("SELECT size, mtime, ctime, inode, digest FROM memo2 WHERE path=?", (str(path),))
        row = rows[0] if rows else None
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
        self._run("INSERT OR REPLACE INTO memo2 VALUES (?,?,?,?,?,?)", (str(path), *_stat_key(st), digest))

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
        self._run("DELETE FROM memo2 WHERE path=?", (str(Path(path).resolve()),))


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
        self.base = root or cache_root()
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


# ---------------------------------------------------------------- leases of running builds


LEASE_NAME_RE = re.compile(r"(?P<pid>[0-9]{1,10})\.json")
_LEASED: dict[Path, set[str]] = {}     # this process's leases: directory -> keys
_LEASE_PID: list[int] = []             # the pid whose exit removes them (a forked child leases anew)


def lease_dir(root: Path | None = None) -> Path:
    return (Path(root).resolve() if root else cache_root()) / "leases"


def lease_objects(keys, root: Path | None = None) -> Path:
    """Tell gc that this process's build needs the objects `keys` (cache/leases/<pid>.json).

    A build writes its lease when it plans its tasks, before any object is built, so gc keeps
    both the objects it reuses and the ones it has built but not yet published. The file is
    removed when the process exits; a lease left by a killed build names a dead pid and gc
    ignores (and removes) it."""
    directory = lease_dir(root)
    keys = {k for k in keys if KEY_RE.fullmatch(k)}
    if _LEASE_PID != [os.getpid()]:
        _LEASE_PID[:] = [os.getpid()]
        _LEASED.clear()
        atexit.register(_drop_leases, os.getpid())
    held = _LEASED.setdefault(directory, set())
    held |= keys
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{os.getpid()}.json"
    atomic_write_json(path, {"pid": os.getpid(), "keys": sorted(held), "created": time.time()})
    return path


def _drop_leases(pid: int) -> None:
    if os.getpid() != pid:  # a forked helper exiting: the lease is its parent's
        return
    for directory in _LEASED:
        (directory / f"{pid}.json").unlink(missing_ok=True)


def leased_keys(root: Path | None = None, remove_stale: bool = True) -> set[str]:
    """Keys named by the leases of live processes; leases of dead pids are ignored (and removed).

    A lease of a live pid that cannot be read is one line (CorruptStateFile): gc cannot know
    what that build needs. A pid reused by an unrelated process keeps the objects a little
    longer, never less."""
    directory = lease_dir(root)
    fd = _real_dir_fd(directory)
    if fd is None:
        return set()
    try:
        names = sorted(os.listdir(fd))
        keys: set[str] = set()
        for name in names:
            m = LEASE_NAME_RE.fullmatch(name)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if not m or not stat.S_ISREG(st.st_mode):
                continue
            if not pid_alive(int(m["pid"])):
                if remove_stale:
                    try:
                        os.unlink(name, dir_fd=fd)
                    except OSError:
                        pass
                continue
            path = directory / name
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                data = None
            listed = data.get("keys") if isinstance(data, dict) else None
            if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
                raise CorruptStateFile(path, "not a lease record", f"remove it if process {m['pid']} is not a "
                                       "forgekit build")
            keys |= {k for k in listed if KEY_RE.fullmatch(k)}
        return keys
    finally:
        os.close(fd)


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
    """Output directories published with this cache: dir -> (recipe, build key, time).

    A corrupt registry is refused with one line (CorruptStateFile), not silently replaced:
    it is what tells gc which objects published outputs use, so an empty one would make gc
    treat them all as unreferenced. The user decides to remove it."""

    SCHEMA = "CREATE TABLE IF NOT EXISTS outputs (dir TEXT PRIMARY KEY, recipe TEXT, build_key TEXT, published REAL)"
    REMEDY = ("remove it; each output registers again when it is next built (until then `forgekit cache gc` "
              "counts its objects as unreferenced)")

    def __init__(self, root: Path | None = None):
        root = root or cache_root()
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


# ---------------------------------------------------------------- cache ls / gc


def cache_ls(root: Path | None = None) -> list[dict]:
    """One row per cached object record, newest use first.

    Keys: key, file (output file name it was built as), recipe (recipe that built it),
    used_by (recipe names of registered outputs referencing it), size (bytes),
    created / last_used (unix time), age_days (since last use), referenced (bool),
    missing (no object file), bad_record (the record is not a valid record: the object
    is never served), path (the object file).
    """
    root = Path(root).resolve() if root else cache_root()
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
    root = Path(root).resolve() if root else cache_root()
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
    root = Path(root).resolve() if root else cache_root()
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
    temps = [p for p in store.temps() if stale_temp(p)]
    # Objects without a record: a build killed between rename and record (never served: valid()
    # needs the record). Only ones renamed over a minute ago, so a build committing now keeps its own.
    recorded = {key for key, _ in store.entries()}
    temps += [store.path(key) for key, st in store.objects().items()
              if key not in recorded and key not in protected and now - st.st_ctime > 60]
    for p in temps:
        if dry_run:
            try:
                freed += os.lstat(p).st_size
            except OSError:
                pass
        else:
            freed += store.unlink(p.parent.name, p.name)
    return {"removed": removed, "freed_bytes": freed, "kept": kept, "leased": leased,
            "temps_removed": len(temps), "dry_run": dry_run}
