"""mtplx: the build decoded by MTPLX's own runtime, judged by MTPLX's own counters.

The staging directory is loaded with `mtplx.runtime.load(dir, mtp=True)`; each prompt is
decoded greedily (temperature 0) once autoregressively (`generate_ar`) and once per
depth d = 1..D with native MTP drafting (`generate_mtpk`, speculative_depth=d). Per
depth, summed over the prompts, MTPLX's `stats.accepted_by_depth` /
`stats.drafted_by_depth` give acceptance[i] = accepted[i] / drafted[i] (MTPLX's own
ratio) and `generated_tokens / verify_calls` the tokens per verify round.

The step fails when a speculative decode is not token-identical to the AR decode (at
temperature 0 speculation must be exact), or when, in any of the D runs, acceptance at a
draft position i falls below `min_acceptance[i]` (one threshold per position 1..D).

Where `mtplx` does not import (not installed, or on Linux where mtplx 2.12 opens macOS's
libSystem at import), the result carries `skipped` with the reason (and `passed` true:
nothing failed, nothing was verified by MTPLX); the report table shows "skipped" and
mtplx_runtime.json lists the step as skipped instead of claiming it.

params: prompts (token id lists or text), max_prompt_tokens, new_tokens (32),
depth (3), min_acceptance (list, one per depth; default 0 each).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..verify_params import MtplxParams, prompt_list
from .where import device_facts

SKIPPED = "mtplx not importable"


def import_mtplx():
    """((mtplx, runtime, generation, sampling), None), or (None, the reason they do not import)."""
    try:
        import mtplx
        from mtplx import generation, runtime, sampling
    except Exception as exc:  # ImportError, or OSError from a macOS-only library
        return None, f"{type(exc).__name__}: {exc}"
    return (mtplx, runtime, generation, sampling), None


def acceptance(accepted: list[int], drafted: list[int]) -> list[float]:
    return [round(a / d, 4) if d else 0.0 for a, d in zip(accepted, drafted)]


def run(directory: Path, plan, p: MtplxParams, bodies=None) -> dict:
    modules, reason = import_mtplx()
    if modules is None:
        cause = f"{SKIPPED} ({reason})"
        return {"passed": True, "skipped": cause, "summary": {"skipped": cause, **device_facts()}}
    mtplx, runtime, generation, sampling = modules
    from .load import prompt_tokens

    start = time.time()
    try:
        rt = runtime.load(str(directory), mtp=True)
        ids = prompt_tokens(prompt_list(p.prompts),
                            rt.tokenizer, p.max_prompt_tokens)
    except Exception as exc:  # MTPLX's own refusal is the finding
        return {"passed": False, "cause": f"MTPLX cannot load the build: {type(exc).__name__}: {exc}"}
    load_seconds = time.time() - start
    greedy = sampling.SamplerConfig(temperature=0.0)
    ar = [generation.generate_ar(rt, x, max_tokens=p.new_tokens, sampler=greedy).tokens for x in ids]
    by_depth, mismatches = [], []
    for depth in range(1, p.depth + 1):
        accepted, drafted = [0] * depth, [0] * depth
        tokens = verify_calls = 0
        for n, (x, reference) in enumerate(zip(ids, ar)):
            out = generation.generate_mtpk(rt, x, max_tokens=p.new_tokens, sampler=greedy,
                                           speculative_depth=depth)
            s = out.stats
            accepted = [a + b for a, b in zip(accepted, s.accepted_by_depth)]
            drafted = [a + b for a, b in zip(drafted, s.drafted_by_depth)]
            tokens, verify_calls = tokens + s.generated_tokens, verify_calls + s.verify_calls
            if out.tokens != reference:
                first = next((i for i, (a, b) in enumerate(zip(out.tokens, reference)) if a != b),
                             min(len(out.tokens), len(reference)))
                mismatches.append(f"depth {depth} prompt {n} differs from AR at token {first}")
        by_depth.append({"depth": depth, "accepted_by_depth": accepted, "drafted_by_depth": drafted,
                         "acceptance": acceptance(accepted, drafted), "generated_tokens": tokens,
                         "verify_calls": verify_calls,
                         "tokens_per_verify": round(tokens / verify_calls, 4) if verify_calls else 0.0})
    deepest = by_depth[-1]["acceptance"]
    summary = {"acceptance": deepest, "tokens_per_verify": by_depth[-1]["tokens_per_verify"],
               "equals_ar": not mismatches, "by_depth": by_depth, "prompts": len(ids),
               "new_tokens": p.new_tokens, "depth": p.depth, "mtplx": mtplx.__version__,
               "concat_order": rt.contract.concat_order, **device_facts(),
               "seconds": {"load": round(load_seconds, 2), "decode": round(time.time() - start - load_seconds, 2)}}
    thresholds = p.thresholds()
    low = [run for run in by_depth if any(a < t for a, t in zip(run["acceptance"], thresholds))]
    problems = [f"MTP decode is not AR-exact: {mismatches[0]}"
                + (f" (+{len(mismatches) - 1} more)" if len(mismatches) > 1 else "")] if mismatches else []
    if low:
        problems.append(f"acceptance below min_acceptance {'/'.join(map(str, thresholds))}: " + "; ".join(
            f"depth-{run['depth']} decode {'/'.join(f'{a:.3f}' for a in run['acceptance'])}" for run in low))
    if problems:
        return {"passed": False, "cause": "MTPLX runtime: " + "; ".join(problems), "summary": summary}
    return {"passed": True, "summary": summary}
