"""Estimate the CPU cost of the default verify (load, parity, mtp) for a Qwen3.5-9B build.

Default: the default verify of recipes/qwen3.5-dense-mtp.yaml, timed through forgekit's own
functions on a real mlx-lm Qwen3.5 text model at 9B width with a 4-layer stack and the full
248320-token vocabulary (random weights), extrapolated to 32 layers:

    built   trunk_pass.forward of the 4-bit model (float32 floats) over B x T tokens: the prefill
            parity and the teacher-forced mtp share (numpy linears, verify/cpu_linear.py)
    source  trunk_pass.forward of the bf16 source over the same tokens (first build only; a
            rebuild reads its log-probs from cache/verify/)
    drafts  mtp.head_drafts: D draft depths of the MTP head + the 4-bit lm_head (not scaled)
    load    load.runtime_forward: the load step's tokens through mlx's own kernels

Wall and CPU seconds are both recorded (`estimate_9b_wall_s`, `estimate_9b_cpu_s`); on a shared
machine compare CPU seconds. Model loading from disk is not included.

`--old` also measures the previous default (below), decoded token by token with mlx's kernels:
it measures, on this machine's CPU with mlx, a real-width synthetic Qwen3.5 layer stack
(hidden 4096, intermediate 12288, 16/4 heads x 256, linear attention 16/32 heads x 128;
3 gated-delta layers + 1 full-attention layer per 4) with random weights, the MTP head
(fc + one full-attention layer) and the 248320 x 4096 lm_head, then extrapolates to
32 layers:

    token    s/token of a forward over a sequence (prompt prefill, the head's
             sequence-parallel drafts, parity's logits)
    step     s of one KV-cached decode step (the probe's greedy trace), batch 1 and 2

Variants: `q4_f32` is the 4-bit g64 body as the probes run it (float32 scales and
activations: mlx's CPU quantized matmul is many times slower in bf16), `bf16` the
dense source body (parity), `q4_bf16` (--with-q4-bf16) the 4-bit body in bf16.

    python bench/probe_cost.py [--prompts 2 --prompt 10 --new 18] [--json out.json] [--measured out.json]

Cost model (forgekit/verify/mtp.py, parity.py; model loading not included):
    mtp    = B*P * token + N * step(B) + D * B*(P+N) * head_position
    parity = S*T * (bf16 token) + S*T * (q4_f32 token)
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_map_with_path

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


def randomize(module: nn.Module) -> None:
    """Random bf16 weights (A_log stays float32, as in a real checkpoint), unit norm gains."""
    def init(path, v):
        if path.endswith("A_log"):
            return v
        if v.ndim == 1:
            return mx.ones(v.shape, mx.bfloat16)
        return (mx.random.normal(v.shape) * 0.02).astype(mx.bfloat16)

    module.update(tree_map_with_path(init, module.parameters()))
    mx.eval(module.parameters())


def prepare(module: nn.Module, variant: str) -> None:
    """bf16 as is; q4_*: mlx_lm.convert's 4-bit g64; *_f32: float parameters cast to float32."""
    if variant.startswith("q4"):
        nn.quantize(module, group_size=64, bits=4)
    if variant.endswith("f32"):
        module.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v,
                               module.parameters()))
    mx.eval(module.parameters())


def act_dtype(variant: str):
    return mx.float32 if variant.endswith("f32") else mx.bfloat16


def timed(fn, repeat: int = 1, warm: bool = True) -> float:
    if warm:
        mx.eval(fn())                 # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeat


def stack_costs(layers: int, tokens: int, variant: str) -> dict:
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.models.qwen3_5 import TextModel, TextModelArgs

    mx.random.seed(0)
    model = TextModel(TextModelArgs.from_dict(text_config(layers)))
    randomize(model)
    prepare(model, variant)
    out = {"token_s": timed(lambda: model.model(mx.random.randint(0, 1024, (1, tokens)))) / tokens}
    for batch in (1, 2):
        cache = make_prompt_cache(model)
        mx.eval(model.model(mx.random.randint(0, 1024, (batch, 8)), cache=cache))
        step = mx.random.randint(0, 1024, (batch, 1))
        out[f"step_b{batch}_s"] = timed(lambda: model.model(step, cache=cache), repeat=3)
    del model
    gc.collect()
    return out


def head_costs(tokens: int, variant: str) -> dict:
    """One MTP draft depth without the lm_head: fc + full-attention layer + norm, per position."""
    from mlx_lm.models.qwen3_5 import TextModelArgs

    from forgekit.mtp_head import MTPHead

    mx.random.seed(1)
    head = MTPHead(TextModelArgs.from_dict(text_config(4)))
    randomize(head)
    prepare(head, "bf16_f32" if variant.endswith("f32") else "bf16")   # the head stays unquantized
    e, h = (mx.random.normal((1, tokens, HIDDEN)).astype(act_dtype(variant)) for _ in range(2))
    cost = timed(lambda: head.norm(head(e, h))) / tokens
    del head
    gc.collect()
    return {"head_token_s": cost}


def lm_head_costs(tokens: int, variant: str) -> dict:
    mx.random.seed(2)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    head.weight = (mx.random.normal((VOCAB, HIDDEN)) * 0.02).astype(mx.bfloat16)
    prepare(head, variant)
    x = mx.random.normal((1, tokens, HIDDEN)).astype(act_dtype(variant))
    out = {"lm_head_token_s": timed(lambda: head(x)) / tokens,
           "lm_head_step_s": timed(lambda: head(x[:, :1]), repeat=3)}
    del head
    gc.collect()
    return out


def measure(layers: int, tokens: int, variant: str) -> dict:
    costs = stack_costs(layers, tokens, variant)
    costs.update(lm_head_costs(tokens, variant))
    if variant != "bf16":
        costs.update(head_costs(tokens, variant))
    print(f"{variant}: {json.dumps({k: round(v, 4) for k, v in costs.items()})}", flush=True)
    return costs


def per_9b(c: dict, layers: int) -> dict:
    scale = LAYERS_9B / layers
    out = {"token_s": c["token_s"] * scale + c["lm_head_token_s"],
           "step_b1_s": c["step_b1_s"] * scale + c["lm_head_step_s"],
           "step_b2_s": c["step_b2_s"] * scale + 2 * c["lm_head_step_s"]}
    if "head_token_s" in c:
        out["head_position_s"] = c["head_token_s"] + c["lm_head_token_s"]
    return out


def estimate(q4: dict, bf16: dict, prompts: int, prompt: int, new: int, depth: int,
             parity_seqs: int, parity_len: int) -> dict:
    """Seconds of the 9B probes with the given sizes (per_9b costs)."""
    step = q4["step_b1_s"] + (prompts - 1) * (q4["step_b2_s"] - q4["step_b1_s"])
    mtp = {"trace_prompt_s": prompts * prompt * q4["token_s"], "trace_decode_s": new * step,
           "drafts_s": depth * prompts * (prompt + new) * q4["head_position_s"]}
    mtp["total_s"] = sum(mtp.values())
    parity = {"source_bf16_s": parity_seqs * parity_len * bf16["token_s"],
              "built_q4_s": parity_seqs * parity_len * q4["token_s"]}
    parity["total_s"] = sum(parity.values())
    return {"probe": {"prompts": prompts, "prompt_tokens": prompt, "new_tokens": new, "depth": depth,
                      "rounds": prompts * (new - depth), "trunk_tokens": prompts * (prompt + new)},
            "mtp_s": mtp, "parity": {"sequences": parity_seqs, "length": parity_len, **parity}}


def _model(layers: int, quantized: bool, seed: int = 0):
    """A real mlx-lm Qwen3.5 text model at 9B width and vocabulary with `layers` layers, random
    weights: the built 4-bit model as the probes run it (mlx_lm.convert's 4-bit g64 of every
    linear and the embedding, floats widened to float32 by forgekit's own cast), or the bf16 source."""
    from mlx_lm.models.qwen3_5 import TextModel, TextModelArgs

    from forgekit.verify.load import cast_floats

    mx.random.seed(seed)
    model = TextModel(TextModelArgs.from_dict({**text_config(layers), "vocab_size": VOCAB}))
    randomize(model)
    if quantized:
        nn.quantize(model, group_size=64, bits=4)
        cast_floats(model, mx.float32)
    mx.eval(model.parameters())
    return model


def _cpu(fn):
    """(result, wall s, CPU s of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def new_default_costs(layers: int, batch: int, length: int, depth: int) -> dict:
    """Wall and CPU seconds of the default verify's passes through forgekit's own functions
    (trunk_pass.forward, mtp.head_drafts, load.runtime_forward) on a `layers`-layer model;
    the vocabulary products are timed apart so the estimate scales only the layers."""
    from mlx_lm.models.qwen3_5 import TextModelArgs

    from forgekit.mtp_head import MTPHead
    from forgekit.verify import load, mtp, trunk_pass
    from forgekit.verify.cpu_linear import numpy_linears

    out = {}
    tokens = mx.random.randint(0, VOCAB, (batch, length))
    for quantized, name in ((True, "built"), (False, "source")):
        model = _model(layers, quantized)
        (hidden, _), out[f"{name}_forward_s"], out[f"{name}_forward_cpu_s"] = _cpu(
            lambda: trunk_pass.forward(model, tokens))
        with numpy_linears(model):        # the vocabulary product alone: best of 2 (conservative split)
            runs = [_cpu(lambda: mx.eval(load.trunk(model)[2](hidden)))[1:] for _ in range(2)]
            out[f"{name}_lm_head_s"], out[f"{name}_lm_head_cpu_s"] = (min(r) for r in zip(*runs))
        if quantized:
            head = MTPHead(TextModelArgs.from_dict(text_config(4)))
            randomize(head)
            load.cast_floats(head, mx.float32)          # the head stays unquantized (base recipe)
            _, out["drafts_s"], out["drafts_cpu_s"] = _cpu(
                lambda: mtp.head_drafts(model, head, tokens, hidden, depth))
            ids = [(7 * i + 3) % VOCAB for i in range(load.DEFAULT_TOKENS)]
            _, out["load_forward_s"], out["load_forward_cpu_s"] = _cpu(
                lambda: load.runtime_forward(model, head, ids))
            _, out["load_layers_s"], out["load_layers_cpu_s"] = _cpu(
                lambda: mx.eval(load.trunk(model)[0](mx.array([ids]))))
            del head
        del model, hidden
        gc.collect()
    print(f"new default, measured: {json.dumps({k: round(v, 3) for k, v in out.items()})}", flush=True)
    return out


def new_default_estimate(c: dict, layers: int, unit: str = "s") -> dict:
    """9B seconds (`unit` "s" wall, "cpu_s" CPU): layer time x 32/layers, vocabulary products once."""
    scale = LAYERS_9B / layers
    g = lambda k: c[f"{k}_{unit}"]
    parts = {"built_prefill": (g("built_forward") - g("built_lm_head")) * scale + g("built_lm_head"),
             "source_prefill": (g("source_forward") - g("source_lm_head")) * scale + g("source_lm_head"),
             "mtp_drafts": g("drafts"),
             "load_forward": g("load_layers") * scale + g("load_forward") - g("load_layers")}
    parts["total_first_build"] = sum(parts.values())
    parts["total_rebuild"] = parts["total_first_build"] - parts["source_prefill"]
    return {k: round(v, 1) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="layers in the measured stack (multiple of 4)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per measured sequence forward")
    # defaults: the 9B verify block of recipes/qwen3.5-dense-mtp.yaml
    ap.add_argument("--prompts", type=int, default=2, help="probe: prompts")
    ap.add_argument("--prompt", type=int, default=10, help="probe: prompt tokens per prompt")
    ap.add_argument("--new", type=int, default=18, help="probe: greedy tokens per prompt")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--parity-seqs", type=int, default=1)
    ap.add_argument("--parity-len", type=int, default=24)
    ap.add_argument("--with-q4-bf16", action="store_true", help="also measure the 4-bit body in bf16 (slow)")
    ap.add_argument("--old", action="store_true", help="also estimate the previous default (token-by-token decode)")
    ap.add_argument("--texts", type=int, default=2, help="new default: texts in the shared prefill")
    ap.add_argument("--text-tokens", type=int, default=32, help="new default: tokens per text")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--measured", help="re-estimate from the 'measured' block of an earlier --json file")
    a = ap.parse_args()
    mx.set_default_device(mx.cpu)
    with open("/proc/loadavg") as f:
        load_start = f.read().split()[:3]
    new = new_default_costs(a.layers, a.texts, a.text_tokens, a.depth)
    result = {"loadavg_at_start": load_start,
              "new_default": {"texts": a.texts, "tokens": a.text_tokens, "depth": a.depth, "measured": new,
                              "estimate_9b_wall_s": new_default_estimate(new, a.layers, "s"),
                              "estimate_9b_cpu_s": new_default_estimate(new, a.layers, "cpu_s")}}
    if not a.old:
        _finish(result, a.json)
        return
    if a.measured:
        with open(a.measured) as f:
            measured = json.load(f)["measured"]
    else:
        variants = ["q4_f32", "bf16"] + (["q4_bf16"] if a.with_q4_bf16 else [])
        measured = {v: measure(a.layers, a.tokens, v) for v in variants}
    nine_b = {v: per_9b(c, a.layers) for v, c in measured.items()}
    result = {**result, "measured": measured, "per_9b": nine_b,
              **estimate(nine_b["q4_f32"], nine_b["bf16"], a.prompts, a.prompt, a.new, a.depth,
                         a.parity_seqs, a.parity_len)}
    _finish(result, a.json)


def _finish(result: dict, path: str | None) -> None:
    with open("/proc/loadavg") as f:
        result["loadavg_at_end"] = f.read().split()[:3]
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
