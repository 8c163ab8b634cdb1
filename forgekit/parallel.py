"""Shard work split into independent pieces, run on all cores.

A `Piece` is self-describing plain data: read rows [r0, r1) of one tensor from a file
at a byte offset, decode them, apply the recipe's transforms, cast, quantize (or not),
and write the results at known byte offsets of a preallocated output file. Pieces never
overlap and quantization works per row group, so pieces can run in any order, in any
process, and the file comes out byte-identical to a sequential write.

The parent works on a shard's pieces itself and shares them with `FORGEKIT_JOBS - 1` helper
processes (so it never waits for helpers to start). Helpers are spawned (not forked: the
parent has mlx loaded) and are not threads: measured, mlx's CPU quantize does not run two
threads in parallel. Helpers import only numpy, mlx and this module, read sources with
pread (no mmap, so resident memory stays one piece per process), and exit when their
parent dies.

Environment:
  FORGEKIT_JOBS            processes working on a shard, the parent included (default: usable
                           cores, at most 8)
  FORGEKIT_POOL_MIN_BYTES  shards with less work run in the parent alone unless the helpers are
                           already up (work = source bytes, quantized ones counted 4x; default 256 MiB)
  FORGEKIT_JOB_BYTES       source bytes batched into one job (default 32 MiB; tests use tiny jobs)
  FORGEKIT_HASH_IN_POOL_BYTES  new/changed sources totalling more are hashed on the pool (default 1 GiB)
  FORGEKIT_TEST_PIECE_DELAY  seconds to sleep before each piece (tests: interrupt a build)
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import env_number
from .faults import checkpoint

# storage code -> (numpy dtype of the stored bytes, mlx dtype name to view them as)
STORAGE = {
    "BF16": (np.uint16, "bfloat16"), "F16": (np.float16, None), "F32": (np.float32, None),
    "F64": (np.float64, None), "I64": (np.int64, None), "I32": (np.int32, None), "I16": (np.int16, None),
    "I8": (np.int8, None), "U8": (np.uint8, None), "U32": (np.uint32, None), "BOOL": (np.bool_, None),
}
GGML_PREFIX = "GGML:"   # GGUF block-quantized storage, dequantized with gguf.quants


@dataclass(frozen=True)
class RawRef:
    """Where a tensor's bytes are: row r of dim 0 starts at offset + r * row_bytes."""

    path: str
    offset: int
    shape: tuple[int, ...]
    storage: str          # a STORAGE code, or GGML:<type name>
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


# ---------------------------------------------------------------- computing a piece

# Exponent bits of a float storage: all set means NaN or infinity.
EXPONENT = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000),
            "F64": (np.uint64, 0x7FF0000000000000)}
_scratch = np.empty(0, dtype=np.uint8)


def check_finite(piece: Piece, raw) -> None:
    """Refuse NaN/inf in source bytes (one pass over the exponent bits, no float conversion).

    Quantization would silently turn a NaN into an ordinary-looking code, so this is the
    only place a corrupt weight can be caught with its name.
    """
    global _scratch
    spec = EXPONENT.get(piece.ref.storage)
    if spec is None:
        return
    dtype, mask = spec
    bits = np.frombuffer(raw, dtype=dtype)
    if not bits.size:
        return
    if _scratch.nbytes < bits.nbytes:
        _scratch = np.empty(bits.nbytes, dtype=np.uint8)
    masked = np.bitwise_and(bits, dtype(mask), out=_scratch[: bits.nbytes].view(dtype))
    if masked.max() == mask:
        nonfinite(piece)


def nonfinite(piece: Piece, path: str | None = None) -> None:
    """Refuse a piece whose source values are NaN/inf, naming the source file and tensor."""
    from .errors import SourceError

    where = f" (rows {piece.rows[0]}..{piece.rows[1] - 1})" if piece.rows else ""
    raise SourceError(f"{path or piece.ref.path}: tensor '{piece.name}' holds NaN or infinite (non-finite) "
                      f"values{where}; the source is corrupt, refusing to build from it")


def check_cast(piece: Piece, a, where: str | None = None) -> None:
    """After transforms and the cast, before quantization: a float16 output from a wider
    source turns values beyond +-65504 into infinities (the source check cannot see that)."""
    import mlx.core as mx

    if piece.dtype == "float16" and piece.ref.storage != "F16" and not bool(mx.all(mx.isfinite(a))):
        from .errors import SourceError

        raise SourceError(f"{where or piece.ref.path}: tensor '{piece.name}' has values beyond the float16 range "
                          f"(+-65504) that become infinite (non-finite) when cast to float16; "
                          f"give it dtype bfloat16 or float32 in the recipe")


_fds: dict[str, int] = {}
_buffer = bytearray()


def _fd(path: str, flags: int) -> int:
    """A cached descriptor. Only read-only ones are ever evicted: a job holds its output
    descriptor across the source reads it makes, so that one must stay open."""
    key = f"{flags}:{path}"
    fd = _fds.get(key)
    if fd is None:
        readers = [k for k in _fds if k.startswith(f"{os.O_RDONLY}:")]
        if len(readers) >= 16:
            for k in readers:
                os.close(_fds.pop(k))
        fd = _fds[key] = os.open(path, flags)
    return fd


def close_files() -> None:
    """Close cached descriptors and drop the reusable buffers (the parent calls this after a shard)."""
    global _buffer, _scratch, _mx_buffer
    for fd in _fds.values():
        os.close(fd)
    _fds.clear()
    _buffer, _scratch, _mx_buffer = bytearray(), np.empty(0, dtype=np.uint8), None


def _pread(path: str, offset: int, n: int) -> memoryview:
    """n bytes at offset, into a buffer reused across pieces (no mmap: bounded resident memory)."""
    global _buffer
    if len(_buffer) < n:
        _buffer = bytearray(n)
    view = memoryview(_buffer)[:n]
    fd = _fd(path, os.O_RDONLY)
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done} (file changed or truncated?)")
        done += got
    return view


_mx_buffer = None


def _pread_mx(path: str, offset: int, n: int):
    """n bytes at offset read straight into a reused mlx buffer (one copy: page cache -> mlx).

    Safe because every piece is fully evaluated before the next read overwrites the buffer,
    and the buffer stays referenced here, so mlx never donates it to an op's output.
    """
    import mlx.core as mx

    global _mx_buffer
    if _mx_buffer is None or _mx_buffer.size < n:
        _mx_buffer = mx.array(np.zeros(max(n, 1), dtype=np.uint8))
        mx.eval(_mx_buffer)
    view = memoryview(_mx_buffer)
    fd = _fd(path, os.O_RDONLY)
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:n]], offset + done)
        if got == 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done} (file changed or truncated?)")
        done += got
    return _mx_buffer[:n]


def read_rows(ref: RawRef, rows: tuple[int, int] | None, check: Piece | None = None):
    """The source rows as an mlx array, exactly as the source's own `read` returns them.

    With `check`, raise a SourceError naming that piece's tensor if the rows hold NaN/inf."""
    import mlx.core as mx

    r0, r1 = rows if rows is not None else (0, ref.shape[0] if ref.shape else 1)
    shape = ((r1 - r0),) + tuple(ref.shape[1:]) if ref.shape else ()
    n = (r1 - r0) * ref.row_bytes
    if ref.storage in STORAGE and ref.storage != "BOOL" and n % 8 == 0 and n > 0:
        np_dtype, view = STORAGE[ref.storage]
        raw = _pread_mx(ref.path, ref.offset + r0 * ref.row_bytes, n)
        if check is not None:
            check_finite(check, memoryview(_mx_buffer)[:n])
        out = raw.view(getattr(mx, np.dtype(np_dtype).name)).reshape(shape)
        out = out.view(getattr(mx, view)) if view else out
        return mx.contiguous(out)
    raw = _pread(ref.path, ref.offset + r0 * ref.row_bytes, n)
    if ref.storage.startswith(GGML_PREFIX):
        import gguf

        qtype = gguf.GGMLQuantizationType[ref.storage[len(GGML_PREFIX):]]
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(r1 - r0, ref.row_bytes)
        arr = gguf.quants.dequantize(blocks, qtype).reshape(shape)
        if check is not None and not np.isfinite(arr).all():
            nonfinite(check)
        return mx.array(np.ascontiguousarray(arr, dtype=np.float32))
    if check is not None:
        check_finite(check, raw)
    np_dtype, view = STORAGE[ref.storage]
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    out = mx.array(arr)  # copies out of the reused buffer
    return out.view(getattr(mx, view)) if view else out


def compute(piece: Piece):
    """Source rows -> transforms (in source dtype, as mlx-lm's sanitize) -> cast -> quantize."""
    import mlx.core as mx

    from .transforms import DTYPES, TRANSFORMS

    a = read_rows(piece.ref, piece.rows, check=piece)
    for name in piece.transforms:
        a = TRANSFORMS[name].apply(a)
    a = a.astype(DTYPES[piece.dtype])
    check_cast(piece, a)
    if piece.quant is None:
        outs = [a]
    else:
        bits, group_size, mode = piece.quant
        outs = list(mx.quantize(a, group_size=group_size, bits=bits, mode=mode))
    mx.eval(*outs)
    return outs


def host_view(a) -> memoryview:
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.asarray(a)).cast("B")


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def copy_piece(piece: Piece, fd: int) -> None:
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
        view = _pread(piece.ref.path, src_off + done, min(step, nbytes - done))
        check_finite(piece, view)
        checkpoint("copy.chunk")
        _pwrite(fd, view, offset + done)
        done += len(view)


def run_piece(piece: Piece, fd: int) -> None:
    if piece.copy:
        return copy_piece(piece, fd)
    outs = compute(piece)
    for arr, (offset, nbytes) in zip(outs, piece.dest, strict=True):
        data = host_view(arr)
        if len(data) != nbytes:
            raise RuntimeError(f"piece of {piece.ref.path} produced {len(data)} bytes where the plan expects {nbytes}")
        _pwrite(fd, data, offset)
        if len(piece.dest) > 1:
            checkpoint("piece.partial")


def run_job(job: Job) -> int:
    """Compute and write every piece of a job; returns the source bytes it consumed."""
    delay = env_number("FORGEKIT_TEST_PIECE_DELAY", 0.0, float)
    fd = _fd(job.dest_path, os.O_WRONLY)
    for piece in job.pieces:
        if delay:
            time.sleep(delay)
        checkpoint("helper.piece" if _helper else "piece")
        run_piece(piece, fd)
    return job.source_bytes


# ---------------------------------------------------------------- the worker pool

HASH_IN_POOL_BYTES = int(os.environ.get("FORGEKIT_HASH_IN_POOL_BYTES", 2**30))  # hash new sources on the pool above this
_pool = None
_pool_size = 0
_helper = False        # True in a helper process (set by _init_worker)
_pool_lock = threading.Lock()


def worker_count() -> int:
    """Processes to use: FORGEKIT_JOBS, else the usable cores (at most 8).

    Inside a multiprocessing child (our own worker, or a doit `-n N -P process` task
    runner, which already runs shards side by side) it is 1: no nested pools.
    """
    if multiprocessing.parent_process() is not None:
        return 1
    env = env_number("FORGEKIT_JOBS", None)
    if env is not None:
        return max(1, env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _init_worker(parent: int) -> None:
    import signal

    global _helper
    _helper = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle

    def watch() -> None:  # exit when the parent is gone (e.g. the build was killed)
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    import mlx.core as mx

    mx.set_cache_limit(64 * 2**20)


def _get_pool(n: int):
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.terminate()
            ctx = multiprocessing.get_context("spawn")
            import multiprocessing.spawn as spawn

            # Workers need nothing from __main__: do not make them re-import it (it may be
            # '<stdin>', a notebook, or a script without a __main__ guard).
            original = spawn.get_preparation_data

            def without_main(name):
                data = original(name)
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
                return data

            spawn.get_preparation_data = without_main
            try:
                _pool = ctx.Pool(n, initializer=_init_worker, initargs=(os.getpid(),))
            finally:
                spawn.get_preparation_data = original
            _pool_size = n
        return _pool


def prestart() -> bool:
    """Start the helper processes now (they import while the parent keeps working).

    The parent is always one of the workers, so `worker_count() - 1` helpers are started."""
    n = worker_count()
    if n <= 1:
        return False
    _get_pool(n - 1)
    return True


def _share(fn: Callable, items: list, on_result: Callable, prefetch: int = 2) -> int:
    """Run fn over items on the parent *and* the helper pool; returns the processes used.

    The parent takes items from the front, helpers from the back (at most `prefetch` queued
    per helper), so the parent starts at once (no wait for helpers to spawn) and the two
    ends meet without a straggler. Exceptions from any side propagate; a helper that dies
    (killed, out of memory) fails the call instead of leaving its item waiting forever.
    """
    helpers = _pool_size if _pool is not None else 0
    pending = deque(items)
    inflight: list = []
    started = _helper_pids()

    def collect(block: bool) -> None:
        nonlocal inflight
        if block and inflight and not any(r.ready() for r in inflight):
            inflight[0].wait(0.05)
            dead = _dead_helper(started)
            if dead:
                shutdown()
                from .errors import ForgeError

                raise ForgeError(f"a helper process of this build died ({dead}) while working on it; "
                                 f"nothing it wrote is kept, run the build again")
        keep = []
        for r in inflight:
            if r.ready():
                on_result(r.get())
            else:
                keep.append(r)
        inflight = keep

    while pending or inflight:
        collect(block=False)
        while helpers and pending and len(inflight) < helpers * prefetch:
            inflight.append(_pool.apply_async(fn, (pending.pop(),)))
        if pending:
            on_result(fn(pending.popleft()))
        else:
            collect(block=True)
    return 1 + helpers


def _helper_pids() -> set[int]:
    return {p.pid for p in list(getattr(_pool, "_pool", None) or [])}


def _dead_helper(started: set[int]) -> str | None:
    """A helper that exited (multiprocessing.Pool replaces dead workers silently, and the
    item a dead worker held is never answered)."""
    procs = list(getattr(_pool, "_pool", None) or [])
    for p in procs:
        if p.exitcode is not None:
            return f"pid {p.pid}, exit code {p.exitcode}"
    gone = started - {p.pid for p in procs}
    return f"pid {min(gone)}" if gone else None


def _hash(path: str) -> tuple[str, str, bool]:
    from .cache import hash_file

    before = os.stat(path)
    checkpoint("pool.hash")
    digest = hash_file(Path(path))
    after = os.stat(path)
    same = (before.st_size, before.st_mtime_ns, before.st_ino) == (after.st_size, after.st_mtime_ns, after.st_ino)
    return path, digest, same


def hash_files(paths: list[str]) -> dict[str, tuple[str, bool]]:
    """xxh3 digests of several files, hashed side by side by the parent and the helpers.

    Returns path -> (digest, unchanged while hashed)."""
    out: dict[str, tuple[str, bool]] = {}

    def keep(result) -> None:
        path, digest, same = result
        out[path] = (digest, same)

    prestart()
    _share(_hash, sorted(paths, key=lambda p: -os.path.getsize(p)), keep, prefetch=1)
    return out


def shutdown() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.terminate()
            _pool.join()
            _pool = None


def run_jobs(jobs: list[Job], on_done: Callable[[int], None] | None = None) -> int:
    """Run a shard's jobs on the parent plus the helper pool (the parent alone for small
    shards, unless the helpers are already up); returns the processes used."""
    import mlx.core as mx

    work = sum(p.work for j in jobs for p in j.pieces)
    n = min(worker_count(), len(jobs))
    min_work = env_number("FORGEKIT_POOL_MIN_BYTES", 256 * 2**20)
    if n > 1 and (work >= min_work or _pool is not None):
        prestart()
    previous = mx.set_cache_limit(64 * 2**20)  # the parent's own mlx cache, restored below
    try:
        used = _share(run_job, jobs, on_done or (lambda done: None)) if n > 1 else _serial(jobs, on_done)
    finally:
        close_files()
        mx.set_cache_limit(previous)
        mx.clear_cache()
    return used


def _serial(jobs: list[Job], on_done) -> int:
    for job in jobs:
        done = run_job(job)
        if on_done:
            on_done(done)
    return 1
