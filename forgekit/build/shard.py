"""Shards: safetensors files computed in pieces into a preallocated file.

A shard's header fixes the byte range of every output tensor before any tensor is
computed. The writer writes the header, sizes the file, splits every tensor into row
chunks (`compute.Piece`: large tensors are quantized in row chunks, which gives the
same bytes as whole-tensor quantization), runs the pieces on the worker pool, each
writing its bytes at their known offsets, then hashes the finished file. Memory stays
bounded by one row chunk per worker; the caller renames the temp file into place, so an
interrupted write never leaves a file under its final name.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import settings
from ..dtypes import BY_NAME, BY_ST_CODE, itemsize
from ..faults import checkpoint
from ..fileio import DISK_ERRORS, disk_error
from ..plan import TensorPlan
from ..errors import SourceError
from ..plan.head import dequantized_note
from ..plan.combine import flat_rows
from ..plan.quant import ROW_CHUNK_BYTES, row_chunks
from ..sources import TensorSource
from . import profile
from .compute import VIA_SOURCE, Job, Piece, RawRef, Workspace, run_piece
from .pool import WorkerPool
from .memo import hash_file
from .store import read_manifest


@dataclass(frozen=True)
class ShardResult:
    digest: str          # xxh3_128 of the finished file
    workers: int         # processes that computed it (for messages)


def layout(entries: list[TensorPlan], metadata: dict) -> tuple[bytes, list[list[tuple[int, int]]]]:
    """The header bytes and, per entry, (offset in the data section, nbytes) of each output part."""
    header: dict = {"__metadata__": metadata}
    offsets: list[list[tuple[int, int]]] = []
    offset = 0
    for t in entries:
        parts = []
        for name, dtype, shape in t.outputs():
            n = itemsize(dtype) * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": BY_NAME[dtype].st_code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            parts.append((offset, n))
            offset += n
        offsets.append(parts)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def raw_ref(source: TensorSource, key: str) -> RawRef | None:
    """Where the bytes of `key` sit on disk, for sources read by offset; None: use source.read."""
    where = source.location(key)
    if where is None:
        return None
    file, offset, stored = where
    shape = tuple(source.info(key).shape)
    rows = shape[0] if shape else 1
    return RawRef(file, offset, shape, stored, source.info(key).nbytes // max(rows, 1))


def _source_itemsize(ref: RawRef, info_dtype: str) -> int:
    if ref.storage in BY_ST_CODE:
        return BY_ST_CODE[ref.storage].itemsize
    return max(BY_NAME[info_dtype].itemsize if info_dtype in BY_NAME else 4, 4)


def pieces_of(t: TensorPlan, source: TensorSource, ref: RawRef | None, base: int,
              parts: list[tuple[int, int]], chunk_bytes: int = ROW_CHUNK_BYTES) -> list[Piece]:
    """Row-chunk pieces of one output entry; `parts` are its (offset, nbytes) in the data section."""
    quant = (t.quant.bits, t.quant.group_size, t.quant.mode) if t.quant else None
    if t.segments:
        return segment_pieces(t, source, base, parts, quant, chunk_bytes)
    shape = tuple(source.info(t.source_key).shape)
    if ref is None:
        ref = RawRef("", 0, shape, VIA_SOURCE, 0)  # read through source.read in the parent
    # Stored exactly as written: an in-kernel copy, no decoding (e.g. the bf16 matrices of the head).
    copy = (quant is None and not t.transforms and ref.storage == BY_NAME[t.dtype].st_code
            and tuple(t.shape) == shape)
    if len(shape) < 2:
        return [Piece(ref, None, t.transforms, t.dtype, quant, tuple((base + o, n) for o, n in parts), copy,
                      t.source_key)]
    rows = shape[0]
    size = max(_source_itemsize(ref, t.source_dtype), itemsize(t.dtype))
    per_row = [n // rows for _, n in parts]
    pieces = []
    for s in row_chunks(shape, size, chunk_bytes):
        dest = tuple((base + o + s.start * r, (s.stop - s.start) * r) for (o, _), r in zip(parts, per_row))
        pieces.append(Piece(ref, (s.start, s.stop), t.transforms, t.dtype, quant, dest, copy, t.source_key))
    return pieces


def flat_ref(source: TensorSource, key: str) -> RawRef:
    """The tensor's bytes viewed as 2-D rows [prod(shape[:-1]), shape[-1]] (how segments count rows)."""
    where = source.location(key)
    info = source.info(key)
    if where is None:
        raise SourceError(f"{info.file}: tensor '{key}' has no byte location, so it cannot be split or stacked "
                          f"piece by piece")
    rows = flat_rows(tuple(info.shape))
    return RawRef(where[0], where[1], (rows, info.shape[-1] if info.shape else 1), where[2], info.nbytes // rows)


def segment_pieces(t: TensorPlan, source: TensorSource, base: int, parts: list[tuple[int, int]], quant,
                   chunk_bytes: int) -> list[Piece]:
    """Pieces of a split or stacked output: row chunks of each segment (plan/combine.py), written at
    the output rows that segment fills, so no piece ever holds more than one chunk of one source."""
    out_rows = flat_rows(t.shape)
    per_row = [n // out_rows for _, n in parts]
    pieces, at = [], 0
    for seg in t.segments:
        ref = flat_ref(source, seg.source_key)
        n = seg.rows[1] - seg.rows[0]
        size = max(_source_itemsize(ref, source.info(seg.source_key).dtype), itemsize(t.dtype))
        copy = quant is None and ref.storage == BY_NAME[t.dtype].st_code
        for s in row_chunks((n, ref.shape[1]), size, chunk_bytes):
            dest = tuple((base + o + (at + s.start) * r, (s.stop - s.start) * r) for (o, _), r in zip(parts, per_row))
            rows = (seg.rows[0] + s.start, seg.rows[0] + s.stop)
            pieces.append(Piece(ref, rows, (), t.dtype, quant, dest, copy, seg.source_key))
        at += n
    return pieces


def batch(dest: str, pieces: list[Piece], limit: int) -> list[Job]:
    """Pieces grouped into jobs of about `limit` source bytes (small tensors travel together)."""
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


def _run_via_source(path: Path, items: list[tuple[TensorPlan, TensorSource, Piece]]) -> None:
    """Pieces of tensors with no raw location: the same compute path, in the parent."""
    if not items:
        return
    fd = os.open(path, os.O_WRONLY)
    ws = Workspace()
    try:
        for t, source, piece in items:
            run_piece(piece, fd, ws, source=source, where=str(t.source_file))
    finally:
        ws.close()
        os.close(fd)


def write_shard(path: Path, entries: list[TensorPlan], sources: dict[str, TensorSource],
                metadata: dict | None = None, progress=None, pool: WorkerPool | None = None,
                chunk_bytes: int = ROW_CHUNK_BYTES) -> ShardResult:
    """Write one safetensors file at `path` (the caller renames it into place).

    `progress(nbytes)` is called as source bytes are consumed. `pool`: the build's helper
    processes (default: a pool for this call only). `chunk_bytes`: the row chunk size.
    """
    head, offsets = layout(entries, metadata or {"format": "mlx"})
    data_size = sum(n for parts in offsets for _, n in parts)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + data_size)
    checkpoint("write.sized")
    pieces: list[Piece] = []
    via_source = []
    for t, parts in zip(entries, offsets):
        source = sources[t.role]
        ref = raw_ref(source, t.source_key)
        for p in pieces_of(t, source, ref, len(head), parts, chunk_bytes):
            if ref is None:
                via_source.append((t, source, p))
            else:
                pieces.append(p)
    own_pool = pool is None
    pool = pool or WorkerPool()
    try:
        workers = pool.run_jobs(batch(str(path), pieces, settings.job_bytes()), progress)
    finally:
        if own_pool:
            pool.shutdown()
    _run_via_source(path, via_source)
    checkpoint("write.pieces-done")
    size = os.stat(path).st_size
    if size != len(head) + data_size:
        raise RuntimeError(f"{path}: {size} bytes written, the header promises {len(head) + data_size}")
    return ShardResult(hash_while_flushing(path), workers)


def hash_while_flushing(path: Path) -> str:
    """hash_file(path), with the file's writeback (fsync) running meanwhile in a thread.

    The object store fsyncs the file again before renaming it (ObjectStore.commit, unchanged),
    which then finds it clean: the disk write overlaps the hashing read instead of following it.
    """
    import threading

    from ..fileio import fsync_file

    def flush() -> None:
        try:
            fsync_file(path)
        except OSError:
            pass   # commit's own fsync meets the same error and raises it

    flusher = threading.Thread(target=flush, daemon=True)
    flusher.start()
    try:
        return hash_file(path)
    finally:
        with profile.phase("wait for fsync of the shard"):
            flusher.join()


def shard_source_bytes(entries: list[TensorPlan], sources: dict[str, TensorSource]) -> int:
    """Source bytes a shard consumes (the progress total)."""
    total = 0
    for t in entries:
        if t.segments:
            total += sum((g.rows[1] - g.rows[0]) * flat_ref(sources[t.role], g.source_key).row_bytes
                         for g in t.segments)
            continue
        ref = raw_ref(sources[t.role], t.source_key)
        if ref is not None:
            total += ref.row_bytes * (ref.shape[0] if ref.shape else 1)
    return total


# ---------------------------------------------------------------- shard objects in the store


def build_into_store(plan, keys, file: str, store, pool: WorkerPool | None = None) -> None:
    """Compute one shard into the object store (temp file + rename)."""
    import time

    from .progress import StepProgress, human_bytes

    key = keys.file_keys[file]
    entries = plan.files[file]
    total = shard_source_bytes(entries, plan.sources)
    tmp = store.temp_path(key)
    try:
        with StepProgress(file, total) as progress:
            start = time.time()
            result = write_shard(tmp, entries, plan.sources, progress=progress.advance, pool=pool)
            size = tmp.stat().st_size
            progress.summary = (f"{len(entries)} tensors, {human_bytes(total)} -> {human_bytes(size)}, "
                                f"{result.workers} worker{'s' if result.workers > 1 else ''}")
            note = dequantized_note(entries)
            progress.summary += f", {note}" if note else ""
            checkpoint("shard.written")
            store.commit(key, tmp, result.digest, file=file, recipe=plan.recipe.name, tensors=len(entries),
                         source_bytes=total, seconds=round(time.time() - start, 3))
    except OSError as exc:
        if exc.errno in DISK_ERRORS:  # the temp file is removed below; nothing is recorded
            raise disk_error(exc, f"{file} into the cache ({store.root})") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def restore_from_output(plan, keys, file: str, store) -> bool:
    """A gc'd object whose bytes the published output still holds: copy it back, checked."""
    import shutil

    key = keys.file_keys[file]
    out = plan.recipe.output_dir()
    manifest = read_manifest(out)
    if not manifest or manifest.get("objects", {}).get(file) != key:
        return False
    want = manifest.get("files", {}).get(file)
    src = out / file
    if not want or not src.is_file():
        return False
    tmp = store.temp_path(key)
    try:
        shutil.copyfile(src, tmp)
        digest = hash_file(tmp)
        if digest != want:
            return False
        store.commit(key, tmp, digest, file=file, recipe=plan.recipe.name, restored_from=str(out))
    finally:
        tmp.unlink(missing_ok=True)
    return True
