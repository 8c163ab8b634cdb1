"""The numpy dequantization the CPU probes use (forgekit/verify/dequant.py) equals mlx's own
`mx.dequantize` bit for bit on real `mx.quantize` outputs of every affine bit width and group
size, with float32, bfloat16 and float16 scales; dense weights widen exactly; and a linear run
through numpy (cpu_linear.py, chunked over output rows) computes what mlx's layer computes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from forgekit.verify.cpu_linear import MIN_ROWS, ROW_CHUNK, NumpyLinear, numpy_linears, tied_head
from forgekit.verify.dequant import Rows

OUT, IN = 40, 256


def _quantized(bits: int, group: int, dtype, seed: int = 0) -> nn.QuantizedLinear:
    mx.random.seed(seed)
    dense = nn.Linear(IN, OUT, bias=False)
    dense.weight = (mx.random.normal((OUT, IN)) * 0.05).astype(mx.bfloat16)
    layer = nn.QuantizedLinear.from_linear(dense, group_size=group, bits=bits)
    layer.scales, layer.biases = layer.scales.astype(dtype), layer.biases.astype(dtype)
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_numpy_dequantize_equals_mlx_bit_for_bit(bits, dtype):
    for group in (32, 64, 128):
        layer = _quantized(bits, group, dtype)
        want = np.asarray(mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=group,
                                        bits=bits).astype(mx.float32))
        rows = Rows(layer)
        assert rows.shape == (OUT, IN)
        got = np.empty((OUT, IN), np.float32)
        rows.fill(0, OUT, got)
        assert np.array_equal(got, want), f"{bits}-bit g{group} {dtype}: max diff {np.abs(got - want).max()}"
        part = np.empty((13, IN), np.float32)     # an odd row range, split across the threads
        rows.fill(7, 20, part)
        assert np.array_equal(part, want[7:20])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
def test_dense_weights_widen_exactly(dtype):
    layer = nn.Linear(IN, OUT, bias=False)
    layer.weight = mx.random.normal((OUT, IN)).astype(dtype)
    got = np.empty((OUT, IN), np.float32)
    Rows(layer).fill(0, OUT, got)
    assert np.array_equal(got, np.asarray(layer.weight.astype(mx.float32)))


def test_numpy_linear_computes_what_mlx_computes_across_row_chunks():
    mx.random.seed(3)
    dense = nn.Linear(64, ROW_CHUNK + 37, bias=True)      # more output rows than one chunk
    layer = nn.QuantizedLinear.from_linear(dense, group_size=64, bits=4)
    layer.update({"scales": layer.scales.astype(mx.float32), "biases": layer.biases.astype(mx.float32)})
    x = mx.random.normal((2, MIN_ROWS, 64))
    want = np.asarray(layer(x))
    got = np.asarray(NumpyLinear(layer)(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)   # only the summation order differs
    assert not np.array_equal(np.asarray(NumpyLinear(layer)(x + 1)), got)


def test_numpy_linears_swaps_and_restores():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    originals = [model.layers[0], model.layers[2]]
    with numpy_linears(model):
        assert all(isinstance(model.layers[i], NumpyLinear) for i in (0, 2))
    assert model.layers[0] is originals[0] and model.layers[2] is originals[1]


def test_a_tied_vocabulary_product_runs_in_numpy_inside_the_block():
    mx.random.seed(4)
    embed = nn.QuantizedEmbedding.from_embedding(nn.Embedding(300, 64), group_size=64, bits=4)
    embed.update({"scales": embed.scales.astype(mx.float32), "biases": embed.biases.astype(mx.float32)})
    x = mx.random.normal((1, MIN_ROWS, 64))
    assert not isinstance(tied_head(embed), NumpyLinear)        # outside a block: mlx's own as_linear
    with numpy_linears(nn.Sequential()):
        head = tied_head(embed)
        assert isinstance(head, NumpyLinear)
        np.testing.assert_allclose(np.asarray(head(x)), np.asarray(embed.as_linear(x)), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(head(x[:, :1])), np.asarray(embed.as_linear(x[:, :1])))


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_other_quantization_modes_fall_back_to_mlx(mode):
    """Only affine is done in numpy; another mode (no biases) is dequantized by mlx itself."""
    mx.random.seed(5)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(IN, OUT, bias=False), mode=mode)
    rows = Rows(layer)
    assert rows.fallback and rows.shape == (OUT, IN)
    got = np.empty((OUT, IN), np.float32)
    rows.fill(0, OUT, got)
    want = mx.dequantize(layer.weight, layer.scales, None, group_size=layer.group_size, bits=layer.bits, mode=mode)
    assert np.array_equal(got, np.asarray(want.astype(mx.float32)))


def test_the_vocabulary_product_of_a_prefill_and_of_the_drafts_runs_in_numpy(built_demo):
    """trunk_pass.forward and mtp.head_drafts take the lm_head inside their numpy_linears block
    (taken before it, the vocabulary product ran in mlx's CPU kernel: most of a 9B prefill)."""
    import json
    import sys

    from forgekit.verify import mtp, trunk_pass
    from forgekit.verify.load import BodyCache, load_head

    config = json.loads((built_demo / "config.json").read_text())
    model, _ = BodyCache().load(built_demo, mx.float32)
    head = load_head(built_demo, config, mx.float32).mtp
    lm_head = model.language_model.lm_head
    tokens = mx.array([[(7 * i + 3) % config["text_config"]["vocab_size"] for i in range(2 * MIN_ROWS)]])
    inner = []

    def seen(frame, event, arg):
        if event == "call" and frame.f_code is NumpyLinear.__call__.__code__:
            inner.append(frame.f_locals["self"].inner)

    sys.setprofile(seen)
    try:
        hidden, _ = trunk_pass.forward(model, tokens)
        prefill, inner[:] = list(inner), []
        mtp.head_drafts(model, head, tokens, hidden, 2)
    finally:
        sys.setprofile(None)
    assert any(layer is lm_head for layer in prefill) and any(layer is lm_head for layer in inner)
