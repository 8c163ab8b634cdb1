"""Writers: safetensors shards, computed in parallel pieces into a preallocated file.

A shard's header fixes the byte range of every output tensor before any tensor is
computed. The writer writes the header, sizes the file, splits every tensor into row
chunks (`parallel.Piece`: large tensors are quantized in row chunks, which gives the
same bytes as whole-tensor quantization), runs the pieces on the worker pool, each
writing its bytes at their known offsets, then hashes the finished file. Memory stays
bounded by one row chunk per worker; the caller renames the temp file into place, so an
interrupted write never leaves a file under its final name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache import hash_file
from .errors import env_number
from .faults import checkpoint
from .parallel import GGML_PREFIX, STORAGE, Job, Piece, RawRef, check_cast, host_view, nonfinite, run_jobs
from .plan import ITEMSIZE, TensorPlan
from .quant import ROW_CHUNK_BYTES, row_chunks
from .sources import TensorSource
from .sources.gguf_file import GGUFSource
from .transforms import DTYPES, TRANSFORMS

ST_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32", "float64": "F64",
            "int64": "I64", "int32": "I32"}
JOB_BYTES = ROW_CHUNK_BYTES   # small tensors are batched into jobs of about this many source bytes


def layout(entries: list[TensorPlan], metadata: dict) -> tuple[bytes, list[list[tuple[int, int]]]]:
    """The header bytes and, per entry, (offset in the data section, nbytes) of each output part."""
    header: dict = {"__metadata__": metadata}
    offsets: list[list[tuple[int, int]]] = []
    offset = 0
    for t in entries:
        parts = []
        for name, dtype, shape in t.outputs():
            n = ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            parts.append((offset, n))
            offset += n
        offsets.append(parts)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


# ---------------------------------------------------------------- raw source locations

def raw_ref(source: TensorSource, key: str) -> RawRef | None:
    """Where the bytes of `key` sit on disk, for sources read by offset; None: use source.read."""
    where = source.location(key)
    if where is None:
        return None
    file, offset, stored = where
    info = source.info(key)
    shape = tuple(info.shape)
    rows = shape[0] if shape else 1
    if isinstance(source, GGUFSource):
        stored = stored if stored in ("F32", "F16", "BF16") else GGML_PREFIX + stored
    elif stored not in STORAGE:
        return None
    return RawRef(file, offset, shape, stored, info.nbytes // max(rows, 1))


def _source_itemsize(ref: RawRef | None, info_dtype: str) -> int:
    if ref is not None and ref.storage in STORAGE:
        return np.dtype(STORAGE[ref.storage][0]).itemsize
    return max(ITEMSIZE.get(info_dtype, 4), 4)


def pieces_of(t: TensorPlan, source: TensorSource, ref: RawRef | None, base: int,
              parts: list[tuple[int, int]]) -> list[Piece]:
    """Row-chunk pieces of one output entry; `parts` are its (offset, nbytes) in the data section."""
    shape = tuple(source.info(t.source_key).shape)
    quant = (t.quant.bits, t.quant.group_size, t.quant.mode) if t.quant else None
    if ref is None:
        ref = RawRef("", 0, shape, "", 0)  # read through source.read in the parent
    # Stored exactly as written: an in-kernel copy, no decoding (e.g. the bf16 matrices of the head).
    copy = (quant is None and not t.transforms and ref.storage == ST_CODES.get(t.dtype)
            and tuple(t.shape) == shape)
    if len(shape) < 2:
        return [Piece(ref, None, t.transforms, t.dtype, quant, tuple((base + o, n) for o, n in parts), copy,
                      t.source_key)]
    rows = shape[0]
    itemsize = max(_source_itemsize(ref, t.source_dtype), ITEMSIZE[t.dtype])
    per_row = [n // rows for _, n in parts]
    pieces = []
    for s in row_chunks(shape, itemsize):
        dest = tuple((base + o + s.start * r, (s.stop - s.start) * r) for (o, _), r in zip(parts, per_row))
        pieces.append(Piece(ref, (s.start, s.stop), t.transforms, t.dtype, quant, dest, copy, t.source_key))
    return pieces


def _batch(dest: str, pieces: list[Piece]) -> list[Job]:
    limit = env_number("FORGEKIT_JOB_BYTES", JOB_BYTES)  # tests: many small jobs on tiny shards
    jobs, current, size = [], [], 0
    for p in pieces:
        if current and size + p.source_bytes > limit:
            jobs.append(Job(dest, tuple(current)))
            current, size = [], 0
        current.append(p)
        size += p.source_bytes
    if current:
        jobs.append(Job(dest, tuple(current)))
    return jobs


class _SourcePieces:
    """Pieces whose source has no raw location: computed in the parent via source.read."""

    def __init__(self):
        self.items: list[tuple[TensorPlan, TensorSource, Piece]] = []

    def run(self, path: Path) -> None:
        if not self.items:
            return
        fd = os.open(path, os.O_WRONLY)
        try:
            for t, source, piece in self.items:
                rows = slice(*piece.rows) if piece.rows else None
                raw = source.read(t.source_key, rows)
                if mx.issubdtype(raw.dtype, mx.floating) and not bool(mx.all(mx.isfinite(raw))):
                    nonfinite(piece, str(t.source_file))
                a = _prepared(t, source, rows, raw)
                if raw.dtype != mx.float16:
                    check_cast(piece, a, str(t.source_file))
                outs = [a] if piece.quant is None else list(mx.quantize(
                    a, group_size=piece.quant[1], bits=piece.quant[0], mode=piece.quant[2]))
                mx.eval(*outs)
                for arr, (offset, n) in zip(outs, piece.dest, strict=True):
                    data = to_bytes(arr)
                    assert len(data) == n, (t.key, len(data), n)
                    os.pwrite(fd, data, offset)
        finally:
            os.close(fd)


def write_shard(path: Path, entries: list[TensorPlan], sources: dict[str, TensorSource],
                metadata: dict | None = None, progress=None) -> str:
    """Write one safetensors file at `path` (caller renames it into place); return its xxh3_128.

    `progress(nbytes)` is called as source bytes are consumed. Returns the digest; the
    number of worker processes used is available as `write_shard.workers` (for messages).
    """
    head, offsets = layout(entries, metadata or {"format": "mlx"})
    data_size = sum(n for parts in offsets for _, n in parts)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + data_size)
    checkpoint("write.sized")
    pieces: list[Piece] = []
    fallback = _SourcePieces()
    for t, parts in zip(entries, offsets):
        source = sources[t.role]
        ref = raw_ref(source, t.source_key)
        for p in pieces_of(t, source, ref, len(head), parts):
            if ref is None:
                fallback.items.append((t, source, p))
            else:
                pieces.append(p)
    write_shard.workers = run_jobs(_batch(str(path), pieces), progress)
    fallback.run(path)
    checkpoint("write.pieces-done")
    size = os.stat(path).st_size
    if size != len(head) + data_size:
        raise RuntimeError(f"{path}: {size} bytes written, the header promises {len(head) + data_size}")
    return hash_file(path)


write_shard.workers = 1


def shard_source_bytes(entries: list[TensorPlan], sources: dict[str, TensorSource]) -> int:
    """Source bytes a shard consumes (the progress total)."""
    total = 0
    for t in entries:
        ref = raw_ref(sources[t.role], t.source_key)
        if ref is not None:
            total += ref.row_bytes * (ref.shape[0] if ref.shape else 1)
    return total


# ---------------------------------------------------------------- reference path


def to_bytes(a: mx.array) -> bytes:
    return bytes(host_view(a))


def _prepared(t: TensorPlan, source: TensorSource, rows: slice | None, raw: mx.array | None = None) -> mx.array:
    """Source rows via the source's own reader (or `raw`, already read) -> transforms (in source dtype) -> cast."""
    a = source.read(t.source_key, rows) if raw is None else raw
    for name in t.transforms:
        a = TRANSFORMS[name].apply(a)
    return a.astype(DTYPES[t.dtype])


def reference_bytes(t: TensorPlan, source: TensorSource) -> list[bytes]:
    """The output parts of one entry computed whole through `source.read` (tests compare with shards)."""
    a = _prepared(t, source, None)
    if t.quant is None:
        return [to_bytes(a)]
    return [to_bytes(x) for x in mx.quantize(a, group_size=t.quant.group_size, bits=t.quant.bits, mode=t.quant.mode)]


__all__ = ["write_shard", "layout", "raw_ref", "reference_bytes", "shard_source_bytes"]
