"""What proves the MTP head's norm convention, and what only suggests it.

A GGUF's `output_norm` proves the convention of the GGUF's *trunk*; its head block was
converted by the same code, but a checkpoint whose head norms were already absolute
comes out of llama.cpp's converter shifted twice (about +2 over zero-centred), and
nothing in the GGUF shows it. The head's own convention is proven only when another
source carries the same head in a known convention (an HF body with its own `mtp.*`
keys): every head norm must then equal that reference converted to absolute. Without
such a reference the step says so (a warning), and the head's norm means are held to a
heuristic band (warning unless the recipe opts in to failing on heuristics).
"""

from __future__ import annotations

import mlx.core as mx

SHIFTED_TWICE_MEAN = 1.5   # heuristic: absolute input/post/pre_fc/final head gains sit near 1, twice-shifted near 2
LOW_FAMILY = ("input_layernorm.weight", "post_attention_layernorm.weight", "pre_fc_norm_hidden.weight",
              "pre_fc_norm_embedding.weight", "mtp.norm.weight")


def _reference(plan, head_role: str, conventions: dict[str, str]):
    """(source role, convention) of another source holding `mtp.*` norms in HF names, or None."""
    for role, source in plan.sources.items():
        if role != head_role and source.kind == "safetensors" and any(k.startswith("mtp.") for k in source.keys()):
            return role, conventions.get(role, "zero_centred")
    return None


def _offset_seen(got: mx.array, ref_abs: mx.array, tol: float) -> float | None:
    """0, +1 or -1 when got equals ref_abs plus that offset (within tol and 1%), else None."""
    for offset in (0.0, 1.0, -1.0):
        expected = ref_abs + offset
        if float(mx.max(mx.abs(got - expected) - 0.01 * mx.abs(expected))) <= tol:
            return offset
    return None


def check(plan, head: dict[str, mx.array], conventions: dict[str, str], tol: float,
          summary: dict) -> tuple[list[str], list[str]]:
    """(problems, warnings) about the head's norm convention. `head`: output mtp.* norms."""
    roles = {t.role for t in plan.tensors if t.key in head}
    gguf_roles = [r for r in roles if plan.sources[r].kind == "gguf"]
    if not head or not gguf_roles:
        return [], []          # an HF head is compared with its own source tensor by tensor
    ref = _reference(plan, gguf_roles[0], conventions)
    if ref is None:
        summary["head_convention_proven"] = False
        warnings = ["the head's norm convention is NOT proven by its source: the GGUF's output_norm proves its "
                    "trunk's convention, not its head's (a head already absolute before conversion ends up "
                    "shifted twice); no source carries the same head to compare with"]
        low = {k: float(mx.mean(v)) for k, v in head.items() if k.endswith(LOW_FAMILY)}
        high = {k: m for k, m in low.items() if m > SHIFTED_TWICE_MEAN}
        if low and len(high) == len(low):
            warnings.append(f"heuristic: every input/post/pre_fc/final head norm mean is above "
                            f"{SHIFTED_TWICE_MEAN} (e.g. '{next(iter(high))}' {next(iter(high.values())):.3f}): "
                            f"the head looks shifted twice")
        return [], warnings
    role, convention = ref
    source = plan.sources[role]
    offsets: dict[float | None, list[str]] = {}
    for key, got in head.items():
        if key not in source.tensors:
            continue
        ref_abs = source.read(key).astype(mx.float32) + (1.0 if convention == "zero_centred" else 0.0)
        if ref_abs.shape == got.shape:
            offsets.setdefault(_offset_seen(got, ref_abs, tol), []).append(key)
    summary["head_reference"] = {"source": role, "convention": convention,
                                 "offsets": {str(k): len(v) for k, v in offsets.items()}}
    if offsets.get(1.0) and not offsets.get(0.0):
        keys = offsets[1.0]
        return [f"{len(keys)} head norm(s) shifted twice: +1 over source '{role}''s own head in absolute form "
                f"(e.g. '{keys[0]}'); the head GGUF was made from norms that were already absolute"], []
    if offsets.get(-1.0) and not offsets.get(0.0):
        keys = offsets[-1.0]
        return [f"{len(keys)} head norm(s) left zero-centred against source '{role}''s own head (e.g. '{keys[0]}')"], []
    if offsets.get(0.0) and len(offsets[0.0]) == sum(map(len, offsets.values())):
        summary["head_convention_proven"] = True
        return [], []
    summary["head_convention_proven"] = False
    return [], [f"the head's norm convention is NOT proven: source '{role}' carries an mtp head, but not this one "
                f"(its norms match it under no single offset)"]
