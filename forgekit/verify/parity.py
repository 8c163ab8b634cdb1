"""parity: the built (quantized) body against the bf16 source body, both read by mlx-lm.

On fixed sequences (the recipe's prompts, optionally extended greedily by the source
model, or deterministic pseudo-random ids when no prompt is given) it compares the
next-token distributions at every position:
    top1     fraction of positions where both models' argmax agree
    mean_kl  mean over positions of KL(p_source || p_built), in nats
The source is loaded only while its logits are computed, so the two models are never
in memory together (a 9B bf16 body is ~18 GB).

params: prompts, new_tokens (0), max_prompt_tokens, random {count, length, seed}
(used without prompts), min_top1, max_mean_kl, compute_dtype (float32: the built body's
floats widened, as in the mtp step; the bf16 source runs as stored, dense bf16 is fast).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..mtp_head import text_args
from ..verify_params import ParityParams, prompt_list
from . import reference_cache
from .load import BodyCache, cast_floats, compute_dtype, prompt_tokens
from .trunk_pass import log_probs_by_sequence


def _greedy_extend(model, ids: list[int], new_tokens: int) -> list[int]:
    """Extend one prompt by `new_tokens` greedy tokens with mlx-lm's KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    if new_tokens <= 0:
        return list(ids)
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = list(ids)
    for _ in range(new_tokens):
        token = int(mx.argmax(logits[0, -1]))
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def sequences(params: ParityParams, tokenizer, vocab: int) -> list[list[int]]:
    """The prompts as token ids, or `random` pseudo-random ids (numpy seed) without prompts."""
    if params.prompts:
        return prompt_tokens(prompt_list(params.prompts), tokenizer, params.max_prompt_tokens)
    spec = params.random
    rng = np.random.default_rng(spec.seed)
    return rng.integers(0, vocab, size=(spec.count, spec.length)).tolist()


def run(directory: Path, plan, params: ParityParams, bodies: BodyCache | None = None) -> dict:
    from mlx_lm import load

    min_top1, max_kl = params.min_top1, params.max_mean_kl
    root = plan.sources["body"].root
    if root is None:
        return {"passed": False, "cause": "the body source is not a model directory mlx-lm can load"}
    start = time.time()
    try:
        dtype = compute_dtype(params)
        bodies = bodies or BodyCache()
        _, tokenizer = bodies.load(directory, dtype)
        prompts = sequences(params, tokenizer, text_args(plan.body.config or {}).vocab_size)
        cache_key = reference_cache.key((bodies.source_digests or {}).get("body"), [prompts, params.new_tokens])
        cached = reference_cache.load(cache_key)
        if cached is None:
            bodies.clear()                 # one model in memory at a time
            gc.collect()
            # mlx-lm reads the source as the model type the build declares (a flat text-only save
            # has no mlx-lm module of its own; mlx-lm's qwen3_5 reads a flat config as its text config)
            built_type = json.loads((directory / "config.json").read_text()).get("model_type")
            source, _ = load(str(root), model_config={"model_type": built_type} if built_type else None)
            if text_args(plan.body.config or {}).num_experts > 0:
                cast_floats(source, mx.float32)   # experts run through gather_mm, float32-only on mlx's CPU
    except Exception as exc:
        return {"passed": False, "cause": f"cannot set up the comparison: {type(exc).__name__}: {exc}"}
    if cached is None:
        seqs = [_greedy_extend(source, s, params.new_tokens) for s in prompts]
        reference = log_probs_by_sequence(source, seqs)
        reference_cache.store(cache_key, seqs, reference)
        del source
        gc.collect()
    else:
        seqs, reference = cached
    source_seconds = time.time() - start
    built, _ = bodies.load(directory, dtype)
    agree, kls = [], []
    for lp, ref in zip(log_probs_by_sequence(built, seqs, bodies), reference):
        agree.append(ref.argmax(-1) == lp.argmax(-1))
        kls.append((np.exp(ref) * (ref - lp)).sum(-1))
    agree, kls = np.concatenate(agree), np.concatenate(kls)
    top1, mean_kl = float(agree.mean()), float(kls.mean())
    summary = {"sequences": len(seqs), "positions": int(agree.size), "top1": round(top1, 4),
               "mean_kl": round(mean_kl, 5), "max_kl": round(float(kls.max()), 5),
               "source_seconds": round(source_seconds, 2), "compute_dtype": str(dtype).split(".")[-1],
               "reference": "cached" if cached is not None else "computed" if cache_key else "computed, not cached"}
    problems = []
    if top1 < min_top1:
        problems.append(f"top-1 agreement with the bf16 source {top1:.3f} < {min_top1}")
    if not mean_kl <= max_kl:
        problems.append(f"mean KL(source || built) {mean_kl:.4f} nats > {max_kl}")
    if problems:
        return {"passed": False, "cause": "; ".join(problems), "summary": summary}
    return {"passed": True, "summary": summary}
