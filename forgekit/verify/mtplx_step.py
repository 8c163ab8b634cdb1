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

import platform
import time
from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ForgeError

SKIPPED = "mtplx not importable"


class MtplxParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: tuple[Union[str, tuple[int, ...]], ...] = Field(min_length=1)
    max_prompt_tokens: Optional[int] = Field(None, gt=0)
    new_tokens: int = Field(32, gt=0)
    depth: int = Field(3, ge=1)
    min_acceptance: Optional[tuple[float, ...]] = None

    @model_validator(mode="after")
    def _one_threshold_per_depth(self):
        if self.min_acceptance is not None and len(self.min_acceptance) != self.depth:
            raise ValueError(f"min_acceptance has {len(self.min_acceptance)} values; depth is {self.depth}")
        return self

    def thresholds(self) -> tuple[float, ...]:
        return self.min_acceptance if self.min_acceptance is not None else (0.0,) * self.depth


def parse_params(params: dict) -> MtplxParams:
    try:
        return MtplxParams.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in first["loc"])
        raise ForgeError(f"params{where}: {first['msg']}") from None


def import_mtplx():
    """((mtplx, runtime, generation, sampling), None), or (None, the reason they do not import)."""
    try:
        import mtplx
        from mtplx import generation, runtime, sampling
    except Exception as exc:  # ImportError, or OSError from a macOS-only library
        return None, f"{type(exc).__name__}: {exc}"
    return (mtplx, runtime, generation, sampling), None


def device_facts() -> dict:
    """Where the decode ran: mlx's default device, Metal availability, versions."""
    import mlx.core as mx

    return {"device": str(mx.default_device()), "metal_available": bool(mx.metal.is_available()),
            "mlx": mx.__version__, "machine": f"{platform.system()} {platform.machine()}"}


def acceptance(accepted: list[int], drafted: list[int]) -> list[float]:
    return [round(a / d, 4) if d else 0.0 for a, d in zip(accepted, drafted)]


def run(directory: Path, plan, params: dict, bodies=None) -> dict:
    p = parse_params(params)
    modules, reason = import_mtplx()
    if modules is None:
        cause = f"{SKIPPED} ({reason})"
        return {"passed": True, "skipped": cause, "summary": {"skipped": cause, **device_facts()}}
    mtplx, runtime, generation, sampling = modules
    from .load import prompt_tokens

    start = time.time()
    try:
        rt = runtime.load(str(directory), mtp=True)
        ids = prompt_tokens([list(x) if isinstance(x, tuple) else x for x in p.prompts],
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
