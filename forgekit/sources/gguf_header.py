"""A GGUF file's header (key/values and tensor table) parsed from a prefix of its bytes
that grows on demand, and the header of a smaller GGUF holding a subset of its tensors:
what reading a remote GGUF by byte range needs (sources/remote_gguf.py), and the bounded walk a
local GGUF's header gets before gguf-py reads it (sources/gguf_file.py)."""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Callable


from ..errors import SourceError

MIN_CHUNK = 64 * 1024            # first header request; later ones grow with what was read


@functools.cache
def _scalars() -> dict:
    """GGUF scalar value type -> struct format (gguf is imported on first use: it takes a while)."""
    from gguf.constants import GGUFValueType as T

    return {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
            T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}


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
    from gguf.constants import GGUFValueType

    scalars = _scalars()
    if vtype in scalars:
        return cur.unpack(scalars[vtype])
    if vtype == GGUFValueType.STRING:
        return cur.string()
    if vtype == GGUFValueType.ARRAY:
        etype, count = cur.unpack("<I"), cur.unpack("<Q")
        if etype in scalars:
            cur.take(struct.calcsize(scalars[etype]) * count)  # skipped in one read
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
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    file_size = size if file_size is None else file_size
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
        if dims and dims[0] % block:
            raise SourceError(f"GGUF tensor '{name}' ({GGMLQuantizationType(ggml_type).name}) has rows of {dims[0]} "
                              f"values, not whole {block}-value blocks (corrupt tensor info)")
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
            raise SourceError(f"GGUF tensor '{t.name}' ({GGMLQuantizationType(t.ggml_type).name}) data runs past "
                              f"the end of the {file_size}-byte file (truncated)")
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
