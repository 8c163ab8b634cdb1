"""Estimate the CPU cost of the verify probes (mtp, parity) for a Qwen3.5-9B build.

Measures, on this machine's CPU with mlx, a real-width synthetic Qwen3.5 layer stack
(hidden 4096, intermediate 12288, 16/4 heads x 256, linear attention 16/32 heads x 128;
3 gated-delta layers + 1 full-attention layer per 4) with random weights, and the
248320 x 4096 lm_head, then extrapolates to 32 layers + the MTP head:

    decode   s/step of a KV-cached decode step at batch B (the probe's greedy trace)
    prefill  s/token of a batched forward over B x T tokens (hidden for the trace,
             the head's sequence-parallel drafts, parity's logits)

    python bench/probe_cost.py [--layers 4] [--prompts 2 --prompt 16 --new 24] [--json out.json]

The probe cost model (forgekit/verify/mtp.py, parity.py):
    mtp    = B*P * trunk_token + N * decode_step(B) + D * B*(P+N) * head_position
    parity = S*T * (bf16 trunk token) + S*T * (4-bit trunk token)
(model load time from disk is not included: ~5 GB 4-bit, ~18 GB bf16 for parity.)
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

HIDDEN, INTERMEDIATE, VOCAB, LAYERS_9B = 4096, 12288, 248320, 32


def text_config(layers: int) -> dict:
    return {
        "model_type": "qwen3_5_text", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers, "full_attention_interval": 4,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "vocab_size": 1024,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    }


def randomize(module: nn.Module, dtype=mx.bfloat16) -> None:
    """Random weights in `dtype` (A_log stays float32, as in a real checkpoint)."""
    def init(path, v):
        if path.endswith("A_log"):
            return v
        if v.ndim == 1:
            return mx.ones(v.shape, dtype)
        return (mx.random.normal(v.shape) * 0.02).astype(dtype)

    module.update(tree_map_with_path(init, module.parameters()))
    mx.eval(module.parameters())


def quantize(module: nn.Module) -> None:
    nn.quantize(module, group_size=64, bits=4)
    mx.eval(module.parameters())


def timed(fn, repeat: int = 3) -> float:
    mx.eval(fn())                     # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeat


def stack_costs(layers: int, tokens: int, quantized: bool) -> dict:
    """Per-token prefill cost and per-step decode cost (batch 1 and 2) of the layer stack."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.models.qwen3_5 import TextModel, TextModelArgs

    mx.random.seed(0)
    model = TextModel(TextModelArgs.from_dict(text_config(layers)))
    randomize(model)
    if quantized:
        quantize(model)
    out = {}
    seq = mx.random.randint(0, 1024, (1, tokens))
    out["prefill_token_s"] = timed(lambda: model.model(seq), repeat=1) / tokens
    for batch in (1, 2):
        cache = make_prompt_cache(model)
        mx.eval(model.model(mx.random.randint(0, 1024, (batch, 8)), cache=cache))
        step = mx.random.randint(0, 1024, (batch, 1))
        out[f"decode_step_b{batch}_s"] = timed(lambda: model.model(step, cache=cache), repeat=3)
    del model
    gc.collect()
    return out


def head_costs(tokens: int) -> dict:
    """One MTP draft depth: fc + the full-attention decoder layer + norm (bf16), per position."""
    from mlx_lm.models.qwen3_5 import TextModelArgs

    from forgekit.mtp_head import MTPHead

    mx.random.seed(1)
    head = MTPHead(TextModelArgs.from_dict(text_config(4)))
    randomize(head)
    e = mx.random.normal((1, tokens, HIDDEN)).astype(mx.bfloat16)
    h = mx.random.normal((1, tokens, HIDDEN)).astype(mx.bfloat16)
    cost = timed(lambda: head.norm(head(e, h)), repeat=1) / tokens
    del head
    gc.collect()
    return {"head_layer_token_s": cost}


def lm_head_costs(tokens: int) -> dict:
    """The 248320 x 4096 lm_head per token, bf16 (parity's source) and 4-bit g64 (the build)."""
    mx.random.seed(2)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    head.weight = (mx.random.normal((VOCAB, HIDDEN)) * 0.02).astype(mx.bfloat16)
    mx.eval(head.parameters())
    x = mx.random.normal((1, tokens, HIDDEN)).astype(mx.bfloat16)
    out = {"lm_head_bf16_token_s": timed(lambda: head(x), repeat=1) / tokens}
    quantize(head)
    out["lm_head_q4_token_s"] = timed(lambda: head(x), repeat=1) / tokens
    out["lm_head_q4_decode_step_s"] = timed(lambda: head(x[:, :1]), repeat=3)
    del head
    gc.collect()
    return out


def extrapolate(c: dict, layers: int, prompts: int, prompt: int, new: int, depth: int,
                parity_seqs: int, parity_len: int) -> dict:
    """Seconds for the 9B probes from the measured costs (32 layers = 8 stacks of 4)."""
    scale = LAYERS_9B / layers
    q4_token = c["q4"]["prefill_token_s"] * scale + c["lm_head_q4_token_s"]
    bf16_token = c["bf16"]["prefill_token_s"] * scale + c["lm_head_bf16_token_s"]
    step_b1 = c["q4"]["decode_step_b1_s"] * scale + c["lm_head_q4_decode_step_s"]
    batching = c["q4"]["decode_step_b2_s"] / c["q4"]["decode_step_b1_s"]   # cost of 2 rows vs 1
    step = step_b1 * (1 + (prompts - 1) * (batching - 1))
    head_token = c["head_layer_token_s"] + c["lm_head_q4_token_s"]
    mtp = {"trace_prefill_s": prompts * prompt * q4_token, "trace_decode_s": new * step,
           "drafts_s": depth * prompts * (prompt + new) * head_token}
    mtp["total_s"] = sum(mtp.values())
    parity = {"bf16_s": parity_seqs * parity_len * bf16_token, "q4_s": parity_seqs * parity_len * q4_token}
    parity["total_s"] = sum(parity.values())
    return {"per_token_9b": {"q4_trunk_token_s": q4_token, "bf16_trunk_token_s": bf16_token,
                             "q4_decode_step_b1_s": step_b1, "decode_batch2_over_batch1": batching,
                             "head_draft_position_s": head_token},
            "probe": {"prompts": prompts, "prompt_tokens": prompt, "new_tokens": new, "depth": depth,
                      "rounds": prompts * (new - depth), "trunk_tokens": prompts * (prompt + new)},
            "mtp_s": mtp, "parity": {"sequences": parity_seqs, "length": parity_len, **parity}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="layers in the measured stack (multiple of 4)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per measured forward")
    ap.add_argument("--prompts", type=int, default=2, help="probe: prompts")
    ap.add_argument("--prompt", type=int, default=16, help="probe: prompt tokens per prompt")
    ap.add_argument("--new", type=int, default=24, help="probe: greedy tokens per prompt")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--parity-seqs", type=int, default=1)
    ap.add_argument("--parity-len", type=int, default=32)
    ap.add_argument("--json", help="write the numbers here")
    a = ap.parse_args()
    mx.set_default_device(mx.cpu)
    costs: dict = {}
    for kind in ("q4", "bf16"):
        costs[kind] = stack_costs(a.layers, a.tokens, quantized=kind == "q4")
        print(f"{a.layers}-layer stack {kind}: {costs[kind]}", flush=True)
    costs.update(head_costs(a.tokens))
    costs.update(lm_head_costs(a.tokens))
    print({k: v for k, v in costs.items() if k not in ("q4", "bf16")}, flush=True)
    est = extrapolate(costs, a.layers, a.prompts, a.prompt, a.new, a.depth, a.parity_seqs, a.parity_len)
    est["measured"] = costs
    with open("/proc/loadavg") as f:
        est["loadavg_at_end"] = f.read().split()[:3]
    print(json.dumps(est, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(est, f, indent=2)


if __name__ == "__main__":
    main()
