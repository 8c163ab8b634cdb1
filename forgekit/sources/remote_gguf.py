"""A GGUF file in a Hugging Face repo, read by HTTP byte range.

For an MTP head only the GGUF header and the ~15 head tensors are needed (~0.5 GB of
an ~18 GB file for a 9B model). This module:

1. resolves the revision to a commit with one HEAD request (huggingface_hub's
   `get_hf_file_metadata`, so HF_ENDPOINT, tokens and offline mode apply);
2. uses the full file instead when huggingface_hub's cache already holds it;
3. reads the header with ranged GETs of growing size (at most 25% + 64 KiB more than
   the header itself), parses the tensor table, asks the plan's `keep(name,
   placeholders)` which tensors it needs (`{mtp_block}` comes from the header), plus
   `output_norm.weight` (a few KB: the evidence of the file's norm convention);
4. fetches just those byte ranges (adjacent tensors coalesced into one request) and
   writes a small, valid GGUF holding the original key/value metadata verbatim and
   only those tensors, which the ordinary `GGUFSource` opens. The other tensors are
   listed as `unread`, so the plan still accounts for every tensor of the file;
5. falls back to a full `hf_hub_download` when the server ignores `Range` (HTTP 200).

Everything is cached under `<forgekit cache>/remote-gguf/models--org--name/`:
`refs/<revision>` (for offline use), and per commit the raw header and the small GGUFs
(one per set of tensors, named by a hash of the set). Requests go to the `resolve` URL
pinned at the commit, so a branch that moves mid-build cannot mix two files.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import xxhash

from ..errors import SourceError
from ..faults import checkpoint
from .gguf_file import GGUFSource

MIN_CHUNK = 64 * 1024            # first header request; later ones grow with what was read
MERGE_GAP = 64 * 1024            # tensors closer than this are fetched in one request
STREAM_CHUNK = 4 * 2**20
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# Fetched even when the plan drops them: a few KB that prove the file's norm convention (the
# norms verify step compares the GGUF's output_norm with the body's final norm, REFERENCE §2).
EVIDENCE = ("output_norm.weight",)

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class RangesRefused(Exception):
    """The server does not honour byte ranges (or the file is not something we can slice)."""


# ---------------------------------------------------------------- header parsing


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dims: tuple[int, ...]   # GGUF `ne` order, as stored
    ggml_type: int
    offset: int             # relative to the data section
    nbytes: int


@dataclass
class Header:
    version: int
    kv_count: int
    kv_end: int             # absolute offset where the tensor infos start
    data_start: int         # absolute offset of the (aligned) data section
    alignment: int
    metadata: dict          # scalar and string key/values (arrays skipped)
    tensors: list[TensorEntry]
    raw: bytes              # the file's first `data_start` bytes

    def mtp_block(self) -> int | None:
        arch = self.metadata.get("general.architecture")
        count = self.metadata.get(f"{arch}.block_count")
        nextn = self.metadata.get(f"{arch}.nextn_predict_layers")
        if isinstance(count, int) and isinstance(nextn, int) and nextn >= 1:
            return count - nextn
        return None


class _Cursor:
    """Sequential reads over a prefix of the file that grows on demand through `fetch(start, end)`."""

    def __init__(self, fetch: Callable[[int, int], bytes], size: int | None):
        self.fetch, self.size = fetch, size
        self.buf = bytearray()
        self.pos = 0

    def _ensure(self, end: int) -> None:
        if end <= len(self.buf):
            return
        want = max(end, len(self.buf) + max(MIN_CHUNK, len(self.buf) // 4))
        if self.size is not None:
            if end > self.size:
                raise SourceError("GGUF header runs past the end of the file (truncated or not a GGUF)")
            want = min(want, self.size)
        data = self.fetch(len(self.buf), want)
        if len(data) != want - len(self.buf):
            raise SourceError(f"short read: asked for bytes {len(self.buf)}-{want - 1}, got {len(data)} bytes")
        self.buf += data

    def take(self, n: int) -> bytes:
        self._ensure(self.pos + n)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 2**30:
            raise SourceError(f"GGUF string of {n} bytes: not a GGUF header")
        return self.take(n).decode("utf-8", "replace")


def _value(cur: _Cursor, vtype: int):
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype])
    if vtype == _STRING:
        return cur.string()
    if vtype == _ARRAY:
        etype, count = cur.unpack("<I"), cur.unpack("<Q")
        if etype in _SCALARS:
            cur.take(struct.calcsize(_SCALARS[etype]) * count)  # skipped in one read
        else:
            for _ in range(count):
                _value(cur, etype)
        return None
    raise SourceError(f"GGUF value type {vtype} is unknown: not a GGUF header")


def parse_header(fetch: Callable[[int, int], bytes], size: int | None = None,
                 file_size: int | None = None) -> Header:
    """Parse magic, key/values and the tensor table, reading only as far as needed.

    `size`: how many bytes `fetch` can serve; `file_size`: the whole file's size (default
    `size`), against which every tensor's data range is checked.
    """
    file_size = size if file_size is None else file_size
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(fetch, size)
    if cur.take(4) != b"GGUF":
        raise SourceError("not a GGUF file (bad magic)")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise RangesRefused(f"GGUF version {version} (or big-endian file) is not read by range")
    n_tensors, kv_count = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict = {}
    for _ in range(kv_count):
        key = cur.string()
        vtype = cur.unpack("<I")
        value = _value(cur, vtype)
        if value is not None:
            metadata[key] = value
    kv_end = cur.pos
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= 2**16:
        raise SourceError(f"GGUF general.alignment {alignment!r} is not a positive integer up to 65536")
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
        ggml_type = cur.unpack("<I")
        offset = cur.unpack("<Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise SourceError(f"GGUF tensor '{name}' has unknown ggml type {ggml_type}") from None
        n = 1
        for d in dims:
            n *= d
        tensors.append(TensorEntry(name, dims, ggml_type, offset, n // block * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    if size is not None and size == file_size:
        data_start = min(data_start, size)
    cur.take(data_start - cur.pos)  # the padding before the data section
    raw = bytes(cur.buf[:data_start])
    for t in tensors:
        if file_size is not None and data_start + t.offset + t.nbytes > file_size:
            raise SourceError(f"GGUF tensor '{t.name}' data runs past the end of the {file_size}-byte file")
    return Header(version, kv_count, kv_end, data_start, alignment, metadata, tensors, raw)


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def compact_layout(header: Header, keep: list[TensorEntry]) -> tuple[bytes, dict[str, int]]:
    """Header bytes of a GGUF holding the same key/values and only `keep`; new absolute offsets."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", header.version, len(keep), header.kv_count))
    out += header.raw[24:header.kv_end]
    offsets, rel = {}, 0
    infos = bytearray()
    for t in keep:
        rel = _align(rel, header.alignment)
        infos += _pack_string(t.name) + struct.pack("<I", len(t.dims))
        infos += struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", t.ggml_type, rel)
        offsets[t.name] = rel
        rel += t.nbytes
    out += infos
    data_start = _align(len(out), header.alignment)
    out += b"\0" * (data_start - len(out))
    return bytes(out), {name: data_start + off for name, off in offsets.items()}


def ranges_for(header: Header, keep: list[TensorEntry], gap: int = MERGE_GAP) -> list[tuple[int, int, list[TensorEntry]]]:
    """Absolute [start, end) byte ranges covering `keep`, adjacent tensors merged."""
    groups: list[tuple[int, int, list[TensorEntry]]] = []
    for t in sorted(keep, key=lambda t: t.offset):
        start, end = header.data_start + t.offset, header.data_start + t.offset + t.nbytes
        if groups and start - groups[-1][1] <= gap:
            s, _, members = groups[-1]
            groups[-1] = (s, max(end, groups[-1][1]), members + [t])
        else:
            groups.append((start, end, [t]))
    return groups


# ---------------------------------------------------------------- HTTP


class RemoteFile:
    """Ranged GETs against one resolve URL through huggingface_hub's session (headers, token, retries)."""

    def __init__(self, url: str):
        self.url = url
        self.bytes_fetched = 0
        self.requests = 0

    def stream(self, start: int, end: int, sink: Callable[[int, bytes], None]) -> None:
        """Call sink(absolute_offset, chunk) for bytes [start, end); RangesRefused on a 200 reply."""
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        headers = build_hf_headers()
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"
        self.requests += 1
        with http_stream_backoff("GET", self.url, headers=headers) as response:
            if response.status_code == 200:
                raise RangesRefused(f"{self.url} answered a range request with the whole file (HTTP 200)")
            if response.status_code != 206:
                response.read()
                hf_raise_for_status(response)
                raise RangesRefused(f"{self.url}: HTTP {response.status_code} to a range request")
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                raise RangesRefused(f"{self.url}: asked for bytes {start}-{end - 1}, got '{content_range}'")
            pos = start
            for chunk in response.iter_bytes(STREAM_CHUNK):
                if pos + len(chunk) > end:
                    chunk = chunk[: end - pos]
                sink(pos, chunk)
                pos += len(chunk)
                self.bytes_fetched += len(chunk)
                if pos >= end:
                    break
            if pos != end:
                raise SourceError(f"{self.url}: range {start}-{end - 1} ended after {pos - start} bytes")

    def read(self, start: int, end: int) -> bytes:
        parts = []
        self.stream(start, end, lambda _, chunk: parts.append(chunk))
        return b"".join(parts)


# ---------------------------------------------------------------- cache + opening


@dataclass
class _Paths:
    root: Path
    repo: str
    file: str

    def ref(self, revision: str) -> Path:
        return self.root / "refs" / quote(revision, safe="")

    def commit_dir(self, commit: str) -> Path:
        return self.root / commit

    def header(self, commit: str) -> Path:
        return self.commit_dir(commit) / (quote(self.file, safe="") + ".header")

    def info(self, commit: str) -> Path:
        return self.commit_dir(commit) / (quote(self.file, safe="") + ".json")

    def compact(self, commit: str, names: list[str]) -> Path:
        tag = xxhash.xxh3_64_hexdigest("\n".join(sorted(names)).encode())
        return self.commit_dir(commit) / f"{quote(self.file, safe='')}.{tag}.gguf"


def _paths(repo: str, file: str) -> _Paths:
    from ..cache import cache_root

    return _Paths(cache_root() / "remote-gguf" / ("models--" + repo.replace("/", "--")), repo, file)


def _write_atomic(path: Path, data: bytes) -> None:
    from ..cache import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check()) if check else bool(constants.HF_HUB_OFFLINE)


def _cached_full_file(repo: str, file: str, revision: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, file, revision=revision)
    except Exception:  # a malformed cache is not our problem here: fall through to ranges
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


@dataclass
class Resolved:
    commit: str
    size: int | None = None
    etag: str | None = None
    remote: RemoteFile | None = None
    notes: list[str] = field(default_factory=list)


def _resolve(repo: str, file: str, revision: str, paths: _Paths) -> Resolved:
    """Revision -> commit: a HEAD request online, the recorded ref offline."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from .hub import _hub_error

    if _offline():
        if COMMIT_RE.fullmatch(revision):
            commit = revision
        elif paths.ref(revision).is_file():
            commit = paths.ref(revision).read_text().strip()
        else:
            raise SourceError(f"hub source {repo}@{revision}: cannot resolve (offline, and the GGUF header of "
                              f"'{file}' was never fetched)")
        info = json.loads(paths.info(commit).read_text()) if paths.info(commit).is_file() else {}
        return Resolved(commit, info.get("size"), info.get("etag"))
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, file, revision=revision))
    except Exception as exc:
        raise _hub_error(repo, revision, exc) from None
    commit = meta.commit_hash or (revision if COMMIT_RE.fullmatch(revision) else None)
    if commit is None:
        raise SourceError(f"hub source {repo}@{revision}: the server named no commit for '{file}'")
    _write_atomic(paths.ref(revision), commit.encode())
    remote = RemoteFile(hf_hub_url(repo, file, revision=commit))
    return Resolved(commit, meta.size, meta.etag, remote)


def _header(paths: _Paths, res: Resolved) -> Header:
    cached = paths.header(res.commit)
    if cached.is_file():
        data = cached.read_bytes()
        return parse_header(lambda a, b: data[a:b], len(data), res.size)
    if res.remote is None:
        raise SourceError("cannot resolve (offline, and its GGUF header was never fetched)")
    header = parse_header(res.remote.read, res.size)
    _write_atomic(cached, header.raw)
    _write_atomic(paths.info(res.commit), (json.dumps({"size": res.size, "etag": res.etag,
                                                       "data_start": header.data_start}) + "\n").encode())
    return header


def _materialize(path: Path, header: Header, keep: list[TensorEntry], remote: RemoteFile) -> None:
    """Write the small GGUF: header bytes, then each needed tensor's bytes from its range."""
    from ..cache import make_temp, stale_temp

    head_bytes, new_offsets = compact_layout(header, keep)
    total = max([new_offsets[t.name] + t.nbytes for t in keep], default=len(head_bytes))
    for left in path.parent.glob(f".{path.name}.*.tmp"):  # a fetch that was killed (its pid is gone)
        if stale_temp(left):
            left.unlink(missing_ok=True)
    tmp = make_temp(path.parent, path.name)
    try:
        with open(tmp, "r+b") as f:
            f.write(head_bytes)
            f.truncate(total)
            for start, end, members in ranges_for(header, keep):
                def sink(pos: int, chunk: bytes, members=members) -> None:
                    stop = pos + len(chunk)
                    for t in members:
                        lo = header.data_start + t.offset
                        hi = lo + t.nbytes
                        a, b = max(pos, lo), min(stop, hi)
                        if a < b:
                            f.seek(new_offsets[t.name] + (a - lo))
                            f.write(chunk[a - pos:b - pos])
                    checkpoint("download.chunk")
                remote.stream(start, end, sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def open_remote_gguf(role: str, repo: str, file: str, revision: str | None,
                     keep: Callable[..., bool], fetch: str | None = None) -> tuple[GGUFSource, dict]:
    """Open `file` of `repo` as a GGUFSource holding just the tensors `keep` asks for.

    `fetch="full"` downloads the whole file; otherwise a cached full copy is used if
    there is one, else byte ranges, falling back to a full download if refused.
    """
    from . import hub

    revision = revision or "main"
    prov = {"role": role, "repo": repo, "revision": revision, "file": file}
    paths = _paths(repo, file)

    def full(commit_or_revision: str) -> tuple[GGUFSource, dict]:
        local = hub.fetch_file(repo, commit_or_revision, file)
        source = GGUFSource(role, local)
        return source, {**prov, "commit": _snapshot_commit(local, file)}

    if fetch == "full":
        return full(revision)
    if _offline():
        local = _cached_full_file(repo, file, revision)
        if local is not None:
            return GGUFSource(role, local), {**prov, "commit": _snapshot_commit(local, file)}
    res = _resolve(repo, file, revision, paths)
    local = _cached_full_file(repo, file, res.commit)
    if local is not None:
        return GGUFSource(role, local), {**prov, "commit": res.commit}
    try:
        header = _header(paths, res)
    except RangesRefused:
        return full(res.commit)
    except SourceError as exc:
        raise SourceError(f"hub source {repo}@{revision}: {file}: {exc}") from None
    except Exception as exc:  # HTTP and network errors from huggingface_hub / httpx
        raise hub._hub_error(repo, revision, exc) from None
    block = header.mtp_block()
    placeholders = {"mtp_block": str(block)} if block is not None else {}
    needed = [t for t in header.tensors if keep(t.name, placeholders) or t.name in EVIDENCE]
    compact = paths.compact(res.commit, [t.name for t in needed])
    if not compact.is_file():
        if res.remote is None:
            raise SourceError(f"hub source {repo}@{revision}: cannot resolve (offline, and tensors of '{file}' "
                              f"this recipe needs were never fetched)")
        try:
            _materialize(compact, header, needed, res.remote)
        except RangesRefused:
            return full(res.commit)
        except SourceError as exc:
            raise SourceError(f"hub source {repo}@{revision}: {file}: {exc}") from None
        except Exception as exc:
            raise hub._hub_error(repo, revision, exc) from None
    source = GGUFSource(role, compact)
    wanted = {t.name for t in needed}
    source.unread = [t.name for t in header.tensors if t.name not in wanted]
    source.remote = {"file": file, "size": res.size, "etag": res.etag, "fetched_tensors": len(needed),
                     "fetched_bytes": sum(t.nbytes for t in needed), "header_bytes": header.data_start,
                     "requests": res.remote.requests if res.remote else 0,
                     "bytes_downloaded": res.remote.bytes_fetched if res.remote else 0}
    return source, {**prov, "commit": res.commit, "fetch": "ranges",
                    "remote": {"size": res.size, "etag": res.etag, "tensors": len(needed)}}


def _snapshot_commit(local: Path, file: str) -> str:
    """huggingface_hub's snapshot dir (named by commit) that holds `file`."""
    snap = local
    for _ in Path(file).parts:
        snap = snap.parent
    return snap.name
