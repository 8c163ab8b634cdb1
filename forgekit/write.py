"""Writers: streamed safetensors shards, and the meta files of the output directory.

A shard is written tensor by tensor (large tensors in row chunks) straight to a
temp file, hashed as it is written, then renamed: memory stays bounded by one row
chunk, and an interrupted write never leaves a file under the final name.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import xxhash

from .plan import ITEMSIZE, TensorPlan
from .quant import quantize, row_chunks
from .sources import TensorSource
from .transforms import DTYPES, TRANSFORMS

ST_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32", "float64": "F64",
            "int64": "I64", "int32": "I32"}


def _header(entries: list[TensorPlan], metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in entries:
        for name, dtype, shape in t.outputs():
            n = ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def to_bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a).tobytes()


def _prepared(t: TensorPlan, source: TensorSource, rows: slice | None) -> mx.array:
    """Source rows -> transforms (in source dtype, as mlx-lm's sanitize) -> cast."""
    a = source.read(t.source_key, rows)
    for name in t.transforms:
        a = TRANSFORMS[name].apply(a)
    return a.astype(DTYPES[t.dtype])


def tensor_chunks(t: TensorPlan, source: TensorSource):
    """Yield the bytes of each output tensor of `t`, in header order, chunk by chunk."""
    src_shape = source.info(t.source_key).shape
    if t.quant is None:
        for rows in row_chunks(src_shape, ITEMSIZE[t.dtype]) if len(src_shape) > 1 else [None]:
            a = _prepared(t, source, rows)
            mx.eval(a)
            yield to_bytes(a)
        return
    scales, biases = [], []
    for rows in row_chunks(src_shape, ITEMSIZE[t.dtype]):
        w, s, b = quantize(_prepared(t, source, rows), t.quant)
        mx.eval(w, s, b)
        yield to_bytes(w)
        scales.append(to_bytes(s))
        biases.append(to_bytes(b))
    yield b"".join(scales)
    yield b"".join(biases)


def write_shard(path: Path, entries: list[TensorPlan], sources: dict[str, TensorSource],
                metadata: dict | None = None, progress=None) -> str:
    """Write one safetensors file at `path` (caller renames it into place); return its xxh3_128."""
    h = xxhash.xxh3_128()
    with open(path, "wb") as f:
        head = _header(entries, metadata or {"format": "mlx"})
        f.write(head)
        h.update(head)
        for t in entries:
            for chunk in tensor_chunks(t, sources[t.role]):
                f.write(chunk)
                h.update(chunk)
            if progress:
                progress(t)
        f.flush()
    return h.hexdigest()
