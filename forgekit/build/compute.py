"""THE compute path: source rows -> transforms -> cast -> NaN/inf checks -> quantize -> bytes
written at known offsets. The worker pool, the serial path and pieces whose source has no
raw location all run `run_piece`; nothing else in forgekit computes an output tensor.

A `Piece` is self-describing plain data: read rows [r0, r1) of one tensor from a file at a
byte offset, decode them, apply the recipe's transforms, cast, quantize (or not), and write
the results at known byte offsets of a preallocated output file. Pieces never overlap and
quantization works per row group, so pieces can run in any order, in any process, and the
file comes out byte-identical to a sequential write.

A `Workspace` is one process's reusable state for that: cached descriptors and read buffers
(pread, no mmap, so resident memory stays one piece per process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..dtypes import BY_NAME, BY_ST_CODE
from ..errors import SourceError
from ..faults import checkpoint
from ..plan.transforms import TRANSFORMS
from ..sources.gguf_file import GGML_PREFIX
from . import profile

VIA_SOURCE = ""   # RawRef.storage of a tensor with no raw location: read through source.read


@dataclass(frozen=True)
class RawRef:
    """Where a tensor's bytes are: row r of dim 0 starts at offset + r * row_bytes."""

    path: str
    offset: int
    shape: tuple[int, ...]
    storage: str          # a safetensors dtype code, GGML:<type name>, or VIA_SOURCE
    row_bytes: int


@dataclass(frozen=True)
class Piece:
    ref: RawRef
    rows: tuple[int, int] | None            # None: the whole tensor
    transforms: tuple[str, ...]
    dtype: str                              # float dtype before quantization
    quant: tuple[int, int, str] | None      # (bits, group_size, mode)
    dest: tuple[tuple[int, int], ...]       # (absolute offset, nbytes) of each output part
    copy: bool = False                      # output bytes == source bytes: no decoding at all
    name: str = ""                          # source tensor name (for error messages)

    @property
    def source_bytes(self) -> int:
        r0, r1 = self.rows if self.rows is not None else (0, self.ref.shape[0] if self.ref.shape else 1)
        return (r1 - r0) * self.ref.row_bytes

    @property
    def work(self) -> int:
        """Cost estimate in copy-byte units: quantizing a byte costs about 4 copies."""
        if self.copy:
            return self.source_bytes // 4
        return self.source_bytes * (4 if self.quant else 1)


@dataclass(frozen=True)
class Job:
    """Pieces run together in one worker call (small tensors are batched)."""

    dest_path: str
    pieces: tuple[Piece, ...]

    @property
    def source_bytes(self) -> int:
        return sum(p.source_bytes for p in self.pieces)


# ---------------------------------------------------------------- checks


def nonfinite(piece: Piece, path: str | None = None) -> None:
    """Refuse a piece whose source values are NaN/inf, naming the source file and tensor."""
    where = f" (rows {piece.rows[0]}..{piece.rows[1] - 1})" if piece.rows else ""
    raise SourceError(f"{path or piece.ref.path}: tensor '{piece.name}' holds NaN or infinite (non-finite) "
                      f"values{where}; the source is corrupt, refusing to build from it")


def check_cast(piece: Piece, a, where: str | None = None) -> None:
    """After transforms and the cast, before quantization: a float16 output from a wider
    source turns values beyond +-65504 into infinities (the source check cannot see that)."""
    import mlx.core as mx

    if piece.dtype == "float16" and piece.ref.storage != "F16" and not bool(mx.all(mx.isfinite(a))):
        raise SourceError(f"{where or piece.ref.path}: tensor '{piece.name}' has values beyond the float16 range "
                          f"(+-65504) that become infinite (non-finite) when cast to float16; "
                          f"give it dtype bfloat16 or float32 in the recipe")


def finish(piece: Piece, a, where: str | None = None) -> list:
    """Source rows (mlx, source dtype) -> transforms (in source dtype, as mlx-lm's sanitize) ->
    cast -> float16 range check -> quantize; the evaluated output parts."""
    import mlx.core as mx

    with profile.phase("transform + cast"):
        for name in piece.transforms:
            a = TRANSFORMS[name].apply(a)
        a = a.astype(BY_NAME[piece.dtype].mlx())
        check_cast(piece, a, where)
        if profile.enabled():  # profiling only: evaluate here to split the time (same bytes)
            mx.eval(a)
    if piece.quant is None:
        return [a]
    with profile.phase("quantize", piece.source_bytes):
        bits, group_size, mode = piece.quant
        outs = list(mx.quantize(a, group_size=group_size, bits=bits, mode=mode))
        mx.eval(*outs)
    return outs


def host_view(a) -> memoryview:
    """An mlx array's bytes as they are stored in safetensors."""
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.asarray(a)).cast("B")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (a single pwrite may write short)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


# ---------------------------------------------------------------- one process's reading state


class Workspace:
    """Cached descriptors and reusable read buffers of one process (the parent's for one shard,
    or a helper's for its lifetime). Not shared between processes."""

    MAX_READERS = 16

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._buffer = bytearray()
        self._scratch = np.empty(0, dtype=np.uint8)
        self._mx_buffer = None

    def fd(self, path: str, flags: int) -> int:
        """A cached descriptor. Only read-only ones are ever evicted: a job holds its output
        descriptor across the source reads it makes, so that one must stay open."""
        key = f"{flags}:{path}"
        fd = self._fds.get(key)
        if fd is None:
            readers = [k for k in self._fds if k.startswith(f"{os.O_RDONLY}:")]
            if len(readers) >= self.MAX_READERS:
                for k in readers:
                    os.close(self._fds.pop(k))
            fd = self._fds[key] = os.open(path, flags)
        return fd

    def close(self) -> None:
        """Close cached descriptors and drop the buffers."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffer, self._scratch, self._mx_buffer = bytearray(), np.empty(0, dtype=np.uint8), None

    def _fill(self, path: str, view: memoryview, offset: int, n: int) -> None:
        fd = self.fd(path, os.O_RDONLY)
        done = 0
        with profile.phase("read", n):
            while done < n:
                got = os.preadv(fd, [view[done:n]], offset + done)
                if got == 0:
                    raise OSError(f"{path}: unexpected end of file at byte {offset + done} (file changed or truncated?)")
                done += got

    def pread(self, path: str, offset: int, n: int) -> memoryview:
        """n bytes at offset, into a buffer reused across pieces."""
        if len(self._buffer) < n:
            self._buffer = bytearray(n)
        view = memoryview(self._buffer)[:n]
        self._fill(path, view, offset, n)
        return view

    def pread_mx(self, path: str, offset: int, n: int):
        """n bytes at offset read straight into a reused mlx buffer (one copy: page cache -> mlx).

        Safe because every piece is fully evaluated before the next read overwrites the buffer,
        and the buffer stays referenced here, so mlx never donates it to an op's output.
        """
        import mlx.core as mx

        if self._mx_buffer is None or self._mx_buffer.size < n:
            self._mx_buffer = mx.array(np.zeros(max(n, 1), dtype=np.uint8))
            mx.eval(self._mx_buffer)
        self._fill(path, memoryview(self._mx_buffer), offset, n)
        return self._mx_buffer[:n], memoryview(self._mx_buffer)[:n]

    def check_finite(self, piece: Piece, raw) -> None:
        """Refuse NaN/inf in source bytes (one pass over the exponent bits, no float conversion).

        Quantization would silently turn a NaN into an ordinary-looking code, so this is the
        only place a corrupt weight can be caught with its name.
        """
        dt = BY_ST_CODE.get(piece.ref.storage)
        if dt is None or not dt.is_float:
            return
        bits_type = np.dtype(f"u{dt.itemsize}").type   # the stored bits as an unsigned integer
        bits = np.frombuffer(raw, dtype=bits_type)
        if not bits.size:
            return
        if self._scratch.nbytes < bits.nbytes:
            self._scratch = np.empty(bits.nbytes, dtype=np.uint8)
        mask = dt.exponent_mask
        with profile.phase("NaN/inf check", bits.nbytes):
            masked = np.bitwise_and(bits, bits_type(mask), out=self._scratch[: bits.nbytes].view(bits_type))
            bad = masked.max() == mask
        if bad:
            nonfinite(piece)

    def read_rows(self, ref: RawRef, rows: tuple[int, int] | None, check: Piece | None = None):
        """The source rows as an mlx array, exactly as the source's own `read` returns them.

        With `check`, raise a SourceError naming that piece's tensor if the rows hold NaN/inf."""
        import mlx.core as mx

        r0, r1 = rows if rows is not None else (0, ref.shape[0] if ref.shape else 1)
        shape = ((r1 - r0),) + tuple(ref.shape[1:]) if ref.shape else ()
        n = (r1 - r0) * ref.row_bytes
        offset = ref.offset + r0 * ref.row_bytes
        dt = BY_ST_CODE.get(ref.storage)
        if dt is not None and dt.name != "bool" and n % 8 == 0 and n > 0:
            raw, view = self.pread_mx(ref.path, offset, n)
            if check is not None:
                self.check_finite(check, view)
            out = raw.view(dt.mlx_storage()).reshape(shape)
            out = out.view(dt.mlx()) if dt.name == "bfloat16" else out
            return mx.contiguous(out)
        raw = self.pread(ref.path, offset, n)
        if ref.storage.startswith(GGML_PREFIX):
            import gguf

            qtype = gguf.GGMLQuantizationType[ref.storage[len(GGML_PREFIX):]]
            blocks = np.frombuffer(raw, dtype=np.uint8).reshape(r1 - r0, ref.row_bytes)
            arr = gguf.quants.dequantize(blocks, qtype).reshape(shape)
            if check is not None and not np.isfinite(arr).all():
                nonfinite(check)
            return mx.array(np.ascontiguousarray(arr, dtype=np.float32))
        if check is not None:
            self.check_finite(check, raw)
        out = mx.array(np.frombuffer(raw, dtype=dt.storage).reshape(shape))  # copies out of the reused buffer
        return out.view(dt.mlx()) if dt.name == "bfloat16" else out

    def copy_piece(self, piece: Piece, fd: int) -> None:
        """A tensor stored exactly as it is written (same dtype, no transform, no quantization):
        read, checked for NaN/inf, written; no decoding."""
        (offset, nbytes), = piece.dest
        if nbytes != piece.source_bytes:
            raise RuntimeError(f"copy piece of {piece.ref.path}: {piece.source_bytes} source bytes for {nbytes}")
        r0 = piece.rows[0] if piece.rows is not None else 0
        src_off = piece.ref.offset + r0 * piece.ref.row_bytes
        step = 16 * 2**20
        done = 0
        while done < nbytes:
            view = self.pread(piece.ref.path, src_off + done, min(step, nbytes - done))
            self.check_finite(piece, view)
            checkpoint("copy.chunk")
            with profile.phase("write", len(view)):
                pwrite_all(fd, view, offset + done)
            done += len(view)


# ---------------------------------------------------------------- running a piece


def _read_via_source(piece: Piece, source, where: str):
    """Rows of a tensor with no raw location, through the source's own reader (parent only)."""
    import mlx.core as mx

    raw = source.read(piece.name, slice(*piece.rows) if piece.rows else None)
    if mx.issubdtype(raw.dtype, mx.floating) and not bool(mx.all(mx.isfinite(raw))):
        nonfinite(piece, where)
    return raw


def run_piece(piece: Piece, fd: int, ws: Workspace, source=None, where: str | None = None) -> None:
    """Compute one piece and write its bytes at their offsets. `source`: read through it (a
    tensor with no raw location; `where` names its file in errors)."""
    if piece.copy:
        return ws.copy_piece(piece, fd)
    if piece.ref.storage == VIA_SOURCE:
        a = _read_via_source(piece, source, where)
    else:
        a = ws.read_rows(piece.ref, piece.rows, check=piece)
    outs = finish(piece, a, where)
    for arr, (offset, nbytes) in zip(outs, piece.dest, strict=True):
        data = host_view(arr)
        if len(data) != nbytes:
            raise RuntimeError(f"piece of {where or piece.ref.path} ({piece.name}) produced {len(data)} bytes "
                               f"where the plan expects {nbytes}")
        with profile.phase("write", nbytes):
            pwrite_all(fd, data, offset)
        if len(piece.dest) > 1:
            checkpoint("piece.partial")


def run_job(job: Job, ws: Workspace, delay: float = 0.0, helper: bool = False) -> int:
    """Compute and write every piece of a job (`helper`: in a helper process); returns the
    source bytes it consumed."""
    import time

    fd = ws.fd(job.dest_path, os.O_WRONLY)
    for piece in job.pieces:
        if delay:
            time.sleep(delay)
        checkpoint("helper.piece" if helper else "piece")
        run_piece(piece, fd, ws)
    return job.source_bytes
