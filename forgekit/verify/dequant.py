"""mlx weights as float32 numpy rows, computed in numpy: affine dequantization and bf16 widening.

mlx's own CPU `mx.dequantize` was the dominant cost of a CPU verify at 9B; the same arithmetic
in vectorised numpy, 1024 rows at a time on the machine's cores, is ~10x cheaper (a 12288 x 4096
4-bit weight: 0.33 s vs 0.032 s on the project's 2-core box, docs/benchmarks.md). The result equals `mx.dequantize(...).astype(mx.float32)`
bit for bit (tests/test_dequant.py checks every bit width and group size mlx offers, with
float32, bfloat16 and float16 scales):

    packed   uint32 words holding a little-endian bit stream of `bits`-bit values, row by row
    value    scale * q + bias per group of `group_size` inputs; with bf16/f16 scales mlx
             rounds the product to that type, then the sum (both round-to-nearest-even)

Only mlx's "affine" mode is done here; any other mode (mxfp4 and the like) falls back to
`mx.dequantize`. A dense bf16 weight widens exactly (its 16 bits are a float32's top half).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

THREADS = max(1, min(os.cpu_count() or 1, 8))   # numpy releases the GIL in these ufuncs
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """This process's thread pool (a forked child must not use its parent's: no threads behind it)."""
    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS[pid] = ThreadPoolExecutor(THREADS, thread_name_prefix="forgekit-dequant")
    return _POOLS[pid]


def host(a: mx.array) -> np.ndarray:
    """A numpy view of an mlx array (bf16, which numpy lacks, as its raw uint16 bits)."""
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def _round_to(v: np.ndarray, dtype) -> None:
    """Round float32 `v` in place to the nearest `dtype` (bf16 or f16) value, ties to even."""
    if dtype == mx.float16:
        v[...] = v.astype(np.float16)
    elif dtype == mx.bfloat16:
        u = v.view(np.uint32)
        u += np.uint32(0x7FFF) + ((u >> 16) & 1)
        u &= np.uint32(0xFFFF0000)


def _widen(raw: np.ndarray, dtype, out: np.ndarray) -> None:
    """float32 `out` from host() values of `dtype` (bf16 bits shifted into the top half)."""
    if dtype == mx.bfloat16:
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = raw


def _unpack(packed: np.ndarray, bits: int, out: np.ndarray) -> None:
    """The `bits`-bit unsigned values of packed uint32 rows, as float32 into `out` [rows, cols]."""
    u8 = packed.view(np.uint8)
    if bits == 8:
        out[...] = u8
    elif bits == 4:
        pairs = out.reshape(out.shape[0], -1, 2)
        np.bitwise_and(u8, 15, out=pairs[..., 0], casting="unsafe")
        np.right_shift(u8, 4, out=pairs[..., 1], casting="unsafe")
    else:                      # 2, 3, 5, 6 bits: the bit stream itself, least significant bit first
        stream = np.unpackbits(u8, axis=-1, bitorder="little")
        fields = stream.reshape(u8.shape[0], -1, bits)[:, :out.shape[1]]
        out[...] = fields.astype(np.uint32) @ (np.uint32(1) << np.arange(bits, dtype=np.uint32))


class Rows:
    """Float32 rows of one linear (or embedding) weight, dense or affine-quantized, read from host
    memory once."""

    def __init__(self, layer: nn.Module):
        self.quantized = isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        self.fallback = self.quantized and (getattr(layer, "mode", "affine") != "affine" or "biases" not in layer)
        self.layer = layer
        self.weight = host(layer.weight)
        self.dtype = layer.weight.dtype
        if self.quantized:
            self.bits, self.group = layer.bits, layer.group_size
            self.scale_dtype = layer.scales.dtype
            self.scales = host(layer.scales)
            self.biases = None if self.fallback else host(layer.biases)
        self.shape = (layer.weight.shape[0], self.weight.shape[1] * 32 // layer.bits if self.quantized
                      else self.weight.shape[1])

    def fill(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) into float32 `out`, split across the threads."""
        if self.fallback:
            out[...] = np.asarray(self._mlx(start, stop))
            return
        step = -(-(stop - start) // THREADS)
        parts = [(a, min(a + step, stop)) for a in range(start, stop, step)]
        list(_pool().map(lambda p: self._fill(p[0], p[1], out[p[0] - start:p[1] - start]), parts))

    def _fill(self, start: int, stop: int, out: np.ndarray) -> None:
        if not self.quantized:
            _widen(self.weight[start:stop], self.dtype, out)
            return
        _unpack(self.weight[start:stop], self.bits, out)
        groups = out.reshape(stop - start, -1, self.group)
        scale = np.empty(groups.shape[:2] + (1,), np.float32)
        _widen(self.scales[start:stop, :, None], self.scale_dtype, scale)
        groups *= scale
        _round_to(groups, self.scale_dtype)
        _widen(self.biases[start:stop, :, None], self.scale_dtype, scale)
        groups += scale
        _round_to(groups, self.scale_dtype)

    def _mlx(self, start: int, stop: int) -> mx.array:
        layer = self.layer
        return mx.dequantize(layer.weight[start:stop], layer.scales[start:stop],
                             None if layer.biases is None else layer.biases[start:stop],
                             group_size=layer.group_size, bits=layer.bits,
                             mode=getattr(layer, "mode", "affine")).astype(mx.float32)
