"""Multi-token forwards on the CPU through numpy's BLAS instead of mlx's CPU matmul.

On a CPU without Metal, mlx's matmul (dense or 4-bit quantized) runs far below the machine's
BLAS (measured on the project's 2-core box: mlx float32 0.5 GFLOP/s, 4-bit float32 0.6, numpy
float32 5.1 on the same load; bench/probe_cost.py). For a forward over many tokens (a prefill,
the head's sequence-parallel drafts) each linear layer's weight is therefore turned into float32
rows ROW_CHUNK at a time (dequant.py: affine dequantization in numpy, bit-identical to
`mx.dequantize`, or bf16 widened exactly) and multiplied by numpy; no layer is ever held in
float32 whole. A one-token decode step keeps mlx's kernel. Only the summation order differs
from mlx.

`numpy_linears(model)` swaps every nn.Linear / nn.QuantizedLinear of a module tree for the
duration of a `with` block and puts the originals back afterwards. Used only where
`mx.default_device()` is the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .dequant import Rows

MIN_ROWS = 8            # fewer tokens than this: mlx's own kernel (a decode step)
ROW_CHUNK = 1024        # output rows dequantized at a time (16 MiB at 4096 inputs: stays in cache)


EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)   # a tied model's vocabulary product: `as_linear`
_active = [0]           # numpy_linears blocks open (tied_head reads it)


class NumpyLinear(nn.Module):
    """A linear layer whose multi-token products run in numpy (float32); module docstring."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows < MIN_ROWS or mx.default_device() != mx.cpu:
            return self.inner.as_linear(x) if isinstance(self.inner, EMBEDDINGS) else self.inner(x)
        xs = np.asarray(x.astype(mx.float32)).reshape(rows, x.shape[-1])
        weight = Rows(self.inner)
        out_rows = weight.shape[0]
        y = np.empty((rows, out_rows), np.float32)
        buffer = np.empty((min(ROW_CHUNK, out_rows), weight.shape[1]), np.float32)
        for start in range(0, out_rows, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, out_rows)
            chunk = buffer[:stop - start]
            weight.fill(start, stop, chunk)
            np.matmul(xs, chunk.T, out=y[:, start:stop])
        out = mx.array(y.reshape(*x.shape[:-1], out_rows))
        if "bias" in self.inner:
            out = out + self.inner.bias.astype(mx.float32)
        return out.astype(x.dtype)


def _linear_slots(module: nn.Module):
    """(parent, key, layer) for every linear layer in the tree (lists of modules included).

    A list's parent is the list the module itself holds (`children()` returns copies of lists).
    """
    for key, child in module.children().items():
        stored = module[key]
        items = enumerate(stored) if isinstance(stored, list) else [(None, child)]
        for index, item in items:
            if isinstance(item, (nn.Linear, nn.QuantizedLinear)):
                yield (stored if index is not None else module), (index if index is not None else key), item
            elif isinstance(item, nn.Module):
                yield from _linear_slots(item)


@contextmanager
def numpy_linears(*modules: nn.Module):
    """Within the block, the linear layers of `modules` run multi-token products in numpy."""
    swapped = []
    for module in modules:
        for parent, key, layer in list(_linear_slots(module)):
            parent[key] = NumpyLinear(layer)
            swapped.append((parent, key, layer))
    _active[0] += 1
    try:
        yield
    finally:
        _active[0] -= 1
        for parent, key, layer in swapped:
            parent[key] = layer


def tied_head(embed: nn.Module):
    """A tied model's lm_head: `embed.as_linear`, in numpy inside a numpy_linears block."""
    return NumpyLinear(embed) if _active[0] else embed.as_linear
