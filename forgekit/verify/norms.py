"""norms: the RMSNorm convention checks (HF zero-centred gains vs MLX/GGUF absolute gains).

MLX wants absolute gains. HF Qwen3.5 stores decoder and MTP norms zero-centred
(x * (1 + w)), llama.cpp GGUFs store them +1 (absolute); `linear_attn.norm` is
absolute everywhere. Checks, in order of how precisely they name the cause:

1. no norm gain in the output is all zeros;
2. the GGUF's convention is proven: its `output_norm.weight` must equal the body's
   final norm in absolute form (GGUF absolute) or that minus 1 (GGUF zero-centred);
   neither is an error unless params state `gguf_norms` (and a proof contradicting
   the stated convention is always an error);
3. every output norm equals its source tensor converted to absolute (offset +1 from a
   zero-centred source, 0 from an absolute one); an offset one too many is reported
   as "shifted twice", one too few as "left zero-centred";
4. MTPLX's own thresholds: the trunk's first q_norm mean must stay <= 2.4 (its refusal
   line; an mtp.* key in a model*.safetensors file makes mlx-lm 0.31 add +1 on load, so
   it is counted). The recipe's band `q_norm_mean` [lo, hi] for every trunk q_norm is a
   heuristic (trained models differ: a healthy finetune can sit near 0.94): a warning,
   a failure only with `fail_on_heuristics: true`;
5. the head's own convention (head_norms.py): proven against another source's copy of
   the head where one exists (+1 too many is "shifted twice"), said loudly where not;
   MTPLX's head detector (max mean q/k norm < 1.25 and min mean input/post/pre_fc norm
   < 0.5 -> zero-centred, shifted again at load) must not fire. The formula is
   implemented here and, when mtplx is importable, compared with its own function.

params (verify_params.NormsParams): q_norm_mean [lo, hi], fail_on_heuristics, gguf_norms /
hf_norms (absolute | zero_centred), tolerance (absolute tolerance of the per-tensor comparison, plus 1% relative).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from ..sources.gguf_file import GGUFSource
from ..sources.safetensors_dir import SafetensorsSource, read_header
from ..verify_params import NormsParams
from . import head_norms

REFUSAL_Q_NORM_MEAN = 2.4          # MTPLX refuses a trunk whose first q_norm mean is above this
HEAD_QK_DELTA_MAX = 1.25           # MTPLX head detector, q/k family
HEAD_LOW_DELTA_MAX = 0.5           # MTPLX head detector, input/post/pre_fc family
HEAD_QK = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
HEAD_LOW = ("input_layernorm.weight", "post_attention_layernorm.weight",
            "pre_fc_norm_hidden.weight", "pre_fc_norm_embedding.weight")


def is_norm(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and "norm" in parts[-2]


def is_shifted(key: str) -> bool:
    """Norms HF stores zero-centred: every decoder/MTP norm except linear_attn.norm."""
    return is_norm(key) and ".linear_attn." not in key


def head_is_zero_centred(norms: dict[str, mx.array]) -> tuple[bool, dict]:
    """MTPLX's two-signal detector (mtp_sidecar_norms_are_delta), reimplemented."""
    qk = [float(mx.mean(v.astype(mx.float32))) for k, v in norms.items() if v.ndim == 1 and k.endswith(HEAD_QK)]
    low = [float(mx.mean(v.astype(mx.float32))) for k, v in norms.items() if v.ndim == 1 and k.endswith(HEAD_LOW)]
    numbers = {"head_qk_mean_max": round(max(qk), 4) if qk else None,
               "head_low_mean_min": round(min(low), 4) if low else None}
    if not qk or not low:
        return False, numbers
    return max(qk) < HEAD_QK_DELTA_MAX and min(low) < HEAD_LOW_DELTA_MAX, numbers


def mtplx_says_zero_centred(norms: dict[str, mx.array]) -> bool | None:
    try:
        from mtplx.compressed_tensors import mtp_sidecar_norms_are_delta
    except Exception:
        return None
    return bool(mtp_sidecar_norms_are_delta(norms))


def output_norms(directory: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Every 1-D norm gain in the directory's safetensors files, and the file holding it."""
    values, where = {}, {}
    for path in sorted(directory.glob("*.safetensors")):
        header, _ = read_header(path)
        keys = [k for k, e in header.items() if is_norm(k) and len(e["shape"]) == 1]
        if keys:
            src = SafetensorsSource("output", path)
            for k in keys:
                values[k] = src.read(k).astype(mx.float32)
                where[k] = path.name
    return values, where


def safetensors_convention(source: SafetensorsSource, stated: str | None) -> str:
    """HF checkpoints are zero-centred; mlx-lm's own test: conv1d still [C, 1, K] means HF."""
    if stated:
        return stated
    convs = [i.shape for k, i in source.tensors.items() if k.endswith("conv1d.weight")]
    if convs and all(len(s) == 3 and s[-1] == 1 and s[1] != 1 for s in convs):
        return "absolute"             # already in MLX layout: an MLX checkpoint
    return "zero_centred"


def _final_norm_abs(plan, conventions: dict[str, str]) -> mx.array | None:
    for t in plan.tensors:
        if t.role == "body" and t.key.endswith("model.norm.weight") and not t.key.startswith("mtp."):
            w = plan.sources["body"].read(t.source_key).astype(mx.float32)
            return w + 1.0 if conventions["body"] == "zero_centred" else w
    return None


def _excess(got: mx.array, expected: mx.array) -> float:
    """Largest deviation beyond 1% of the expected value (bf16 rounding of a +1 shift fits in it)."""
    return float(mx.max(mx.abs(got - expected) - 0.01 * mx.abs(expected)))


def gguf_convention(source: GGUFSource, body_final_abs: mx.array | None, stated: str | None,
                    tol: float) -> tuple[str | None, str, dict]:
    """(convention, problem, numbers): prove it from output_norm vs the body's final norm."""
    numbers: dict = {"gguf_norms_stated": stated}
    proven = None
    if "output_norm.weight" in source.tensors and body_final_abs is not None:
        g = source.read("output_norm.weight").astype(mx.float32)
        if g.shape == body_final_abs.shape:
            d_abs = _excess(g, body_final_abs)
            d_zc = _excess(g, body_final_abs - 1.0)
            numbers.update(gguf_output_norm_vs_body_abs=round(d_abs, 5), gguf_output_norm_vs_body_zc=round(d_zc, 5))
            proven = "absolute" if d_abs <= tol else "zero_centred" if d_zc <= tol else None
    numbers["gguf_norms_proven"] = proven
    name = source.files[0].name
    if proven and stated and proven != stated:
        return None, f"{name}: params state gguf_norms {stated} but output_norm.weight proves {proven}", numbers
    if proven or stated:
        return proven or stated, "", numbers
    why = ("has no output_norm.weight to compare" if "output_norm.weight" not in source.tensors
           else "output_norm.weight matches the body's final norm neither absolute nor zero-centred "
                "(a GGUF of another model?)")
    return None, (f"{name} {why}; cannot prove its norm convention, state it in the norms step "
                  f"params (gguf_norms: absolute|zero_centred)"), numbers


def _offset_kind(got: mx.array, src: mx.array, offset: float, tol: float) -> str:
    """'' when got == src + offset (within tolerance), else what went wrong."""
    if _excess(got, src + offset) <= tol:
        return ""
    seen = float(mx.mean(got - src))
    if abs(seen - offset - 1.0) < 0.1:
        return "shifted twice (source +2 where +1 is expected)" if offset else "shifted twice (+1 over a source already absolute)"
    if abs(seen - offset + 1.0) < 0.1:
        return "left zero-centred (the +1 shift is missing)"
    return "does not match its source (another model or corrupted)"


def _grouped(found: dict[tuple[str, str], list[str]]) -> list[str]:
    """One sentence per (file, kind): count and the first keys."""
    out = []
    for (file, kind), keys in found.items():
        names = ", ".join(f"'{k}'" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
        out.append(f"{len(keys)} norm(s) in {file} {kind}: {names}")
    return out


def _trunk_q_norm_problems(norms: dict, where: dict, params: NormsParams, summary: dict) -> tuple[list[str], list[str]]:
    """(problems, warnings): MTPLX's refusal line on the first trunk q_norm (proven: a failure), the
    recipe's heuristic absolute band on all (a warning unless params fail_on_heuristics)."""
    q_means = {k: float(mx.mean(v)) for k, v in norms.items() if k.endswith("self_attn.q_norm.weight")
               and not k.startswith("mtp.") and where[k].startswith("model")}
    if not q_means:
        return [], []
    first = min(q_means, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)])
    stray_mtp = any(k.startswith("mtp.") and where[k].startswith("model") for k in norms)
    effective = q_means[first] + (1.0 if stray_mtp else 0.0)
    lo, hi = params.q_norm_mean or (None, None)
    summary.update(trunk_q_norm_mean_first=round(q_means[first], 4),
                   trunk_q_norm_mean_range=[round(min(q_means.values()), 4), round(max(q_means.values()), 4)])
    problems = []
    if effective > REFUSAL_Q_NORM_MEAN:
        extra = " after mlx-lm 0.31 adds +1 for the mtp.* keys in the trunk files" if stray_mtp else ""
        problems.append(f"trunk '{first}' mean {effective:.3f}{extra} is above MTPLX's refusal line "
                        f"{REFUSAL_Q_NORM_MEAN} (double-shifted trunk)")
    outside = [k for k, m in q_means.items() if not (k == first and problems)
               and ((lo is not None and m < lo) or (hi is not None and m > hi))]
    warnings = [f"heuristic: trunk '{outside[0]}' mean {q_means[outside[0]]:.3f} is outside the absolute "
                f"range q_norm_mean [{lo}, {hi}]" + (f" (+{len(outside) - 1} more)" if len(outside) > 1 else "")
                ] if outside else []
    return problems, warnings


def _head_problems(head: dict, summary: dict) -> list[str]:
    """MTPLX's head detector (ours and, when importable, its own) must not call the head zero-centred."""
    if not head:
        return []
    zero_centred, numbers = head_is_zero_centred(head)
    theirs = mtplx_says_zero_centred(head)
    summary.update(numbers, head_detector_zero_centred=zero_centred, mtplx_detector_zero_centred=theirs)
    if theirs is not None and theirs != zero_centred:
        return [f"MTPLX's head detector says zero_centred={theirs}, forgekit's formula {zero_centred}"]
    if zero_centred:
        return [f"MTPLX would classify the head as zero-centred and add +1 at load "
                f"(max mean q/k norm {numbers['head_qk_mean_max']} < {HEAD_QK_DELTA_MAX} and min mean "
                f"input/post/pre_fc norm {numbers['head_low_mean_min']} < {HEAD_LOW_DELTA_MAX})"]
    return []


def run(directory: Path, plan, params: NormsParams, bodies=None) -> dict:
    tol = params.tolerance
    norms, where = output_norms(directory)
    problems = [f"{where[k]} '{k}' is all zeros" for k, v in norms.items() if not bool(mx.any(v != 0))]

    conventions: dict[str, str] = {}
    summary: dict = {"norms_checked": 0}
    for role, source in plan.sources.items():
        if source.kind == "safetensors":
            conventions[role] = safetensors_convention(source, params.hf_norms)
    for role, source in plan.sources.items():
        if source.kind == "gguf":
            conv, problem, numbers = gguf_convention(source, _final_norm_abs(plan, conventions),
                                                     params.gguf_norms, tol)
            summary.update(numbers)
            if problem:
                return {"passed": False, "cause": problem, "summary": summary}
            conventions[role] = conv
    summary["source_conventions"] = dict(conventions)

    worst, found = 0.0, {}
    for t in plan.tensors:
        if t.key not in norms or not is_norm(t.key):
            continue
        offset = 1.0 if is_shifted(t.key) and conventions.get(t.role) == "zero_centred" else 0.0
        src = plan.sources[t.role].read(t.source_key).astype(mx.float32)
        if src.shape != norms[t.key].shape:
            continue  # structural reports shapes
        worst = max(worst, float(mx.max(mx.abs(norms[t.key] - src - offset))))
        summary["norms_checked"] += 1
        kind = _offset_kind(norms[t.key], src, offset, tol)
        if kind:
            found.setdefault((where[t.key], kind), []).append(t.key)
    problems += _grouped(found)
    summary["max_abs_deviation"] = round(worst, 5)

    trunk_problems, warnings = _trunk_q_norm_problems(norms, where, params, summary)
    head = {k: v for k, v in norms.items() if not where[k].startswith("model")}
    head_problems, head_warnings = head_norms.check(plan, head, conventions, tol, summary)
    problems += trunk_problems + head_problems + _head_problems(head, summary)
    warnings += head_warnings
    if params.fail_on_heuristics and warnings:
        problems += [f"{w} (fail_on_heuristics)" for w in warnings]
    if problems:
        return {"passed": False, "cause": "; ".join(problems), "summary": summary, "warnings": warnings}
    return {"passed": True, "summary": summary, "warnings": warnings}
