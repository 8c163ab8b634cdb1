"""Output values against their sources, recomputed independently of the build's piece arithmetic.

MTPLX's gate checks head names only and its runtime binds the head with `strict=False`, and
acceptance does not notice everything (on the tiny MoE fixture, swapped gate/up halves still
draft well), so the values are compared here:
- every head (sidecar) tensor: its source read whole by the source's own reader, the plan's
  transforms, the cast; split parts by numpy slicing along the rule's axis, stacked tensors by
  numpy stacking in the order of the index read from each source name;
- a fused HF `experts.gate_up_proj` is read the way mlx-lm's own `qwen3_5_moe` sanitize reads it
  (gate = first half), and a fused GGUF `ffn_gate_up_exps` the way llama.cpp reads it (gate = the
  first half of numpy axis -2), both whatever order the recipe's split names, so a recipe that swaps
  the halves fails by name;
- every split or stacked trunk tensor: the same, quantized with the tensor's own parameters
  (deterministic, so equal bytes), on a sample of experts (all when there are at most 16).
The step fails on the first difference, named in one line.

params: none.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..plan.remap import Table
from ..plan.transforms import TRANSFORMS
from ..dtypes import BY_NAME

FUSED_GATE_UP = "experts.gate_up_proj"   # HF's fused expert layout, as mlx-lm's sanitize reads it
GGUF_GATE_UP = "ffn_gate_up_exps.weight"  # llama.cpp's fused expert tensor (--fuse-gate-up-exps)


def mlx_lm_gate_up(fused: mx.array) -> dict[str, mx.array]:
    """{'gate_proj', 'up_proj'} of a fused [E, 2I, H] tensor through mlx-lm's own sanitize."""
    from types import SimpleNamespace

    from ..mlx_models import models_module   # mlx-lm's model file without mlx_lm's start-up

    Model = models_module("qwen3_5_moe").Model
    prefix = "language_model.model.layers.0.mlp"
    text = SimpleNamespace(args=SimpleNamespace(num_hidden_layers=1), sanitize=lambda w: w)
    out = Model.sanitize(SimpleNamespace(language_model=text),
                         {f"{prefix}.experts.gate_up_proj": fused, f"{prefix}.experts.down_proj": fused})
    return {p: out[f"{prefix}.switch_mlp.{p}.weight"] for p in ("gate_proj", "up_proj")}


def llama_cpp_gate_up(fused: mx.array) -> dict[str, mx.array]:
    """{'gate_proj', 'up_proj'} of a GGUF `ffn_gate_up_exps` as llama.cpp reads it: ggml `ne`
    {H, 2I, E} (gguf-py's reader gives [E, 2I, H]); its MoE graph multiplies once and takes output
    rows 0..I-1 as the gate and I..2I-1 as up, i.e. the first and second half of numpy axis -2."""
    half = fused.shape[-2] // 2
    return {"gate_proj": fused[..., :half, :], "up_proj": fused[..., half:, :]}


def reference_gate_up(source_key: str, fused: mx.array) -> dict[str, mx.array] | None:
    """The gate/up halves of a known fused expert layout, by its own reader; None if not one."""
    if source_key.endswith(FUSED_GATE_UP):
        return mlx_lm_gate_up(fused)
    if source_key.endswith(GGUF_GATE_UP):
        return llama_cpp_gate_up(fused)
    return None


def sample(n: int) -> list[int]:
    return list(range(n)) if n <= 16 else sorted({0, n // 2, n - 1})


def _stack_order(t, source, rule) -> list[str]:
    """The stacked sources ordered by the index in their names (not by the plan's segment order)."""
    table = Table((rule,), source.placeholders())
    names = {s.source_key for s in t.segments}
    return sorted(names, key=lambda k: int(table.first_match(k)[1].group(rule.stack.index)))


def expected(t, source, rule, lead: list[int] | None) -> mx.array:
    """The output's value (float, before quantization) at leading indices `lead` (None: whole)."""
    if rule is not None and rule.stack:
        keys = _stack_order(t, source, rule)
        return mx.stack([source.read(keys[i]) for i in (lead if lead is not None else range(len(keys)))])
    rows = None if lead is None or (rule is not None and rule.split and rule.split.axis % len(t.shape) == 0) else lead
    a = source.read(t.source_key) if rows is None else \
        mx.concatenate([source.read(t.source_key, slice(i, i + 1)) for i in rows])   # only the sampled experts
    if rule is not None and rule.split:
        part = next((p for p in ("gate_proj", "up_proj") if t.key.endswith(f"{p}.weight")), None)
        halves = reference_gate_up(t.source_key, a) if part and len(rule.split.to) == 2 else None
        if halves is not None:
            return halves[part]
        match = Table((rule,), source.placeholders()).first_match(t.source_key)[1]
        j = [match.expand(to) for to in rule.split.to].index(t.key)
        a = mx.split(a, len(rule.split.to), axis=rule.split.axis)[j]
        if lead is not None and rows is None:
            a = a[mx.array(lead)]
    for name in t.transforms:
        a = TRANSFORMS[name].apply(a)
    return a


def _differs(built: dict, t, value: mx.array, lead: list[int] | None) -> bool:
    value = value.astype(BY_NAME[t.dtype].mlx())
    names = [n for n, _, _ in t.outputs()]
    got = [built[n] if lead is None else built[n][mx.array(lead)] for n in names]
    if t.quant is None:
        want = [value]
    else:
        want = list(mx.quantize(value, group_size=t.quant.group_size, bits=t.quant.bits, mode=t.quant.mode))
    return any(g.shape != w.shape or g.dtype != w.dtype or not mx.array_equal(g, w).item()
               for g, w in zip(got, want))


def check(directory: Path, plan) -> str | None:
    """The first output tensor whose value differs from its source, as one line; None if all agree."""
    rules = {(role, r.name): r for role in plan.sources for r in plan.recipe.remap[plan.recipe.table_for(role)]}
    loaded: dict[str, dict] = {}
    for file, entries in plan.files.items():
        sidecar = file in plan.sidecar_files
        for t in entries:
            if not sidecar and not t.segments:
                continue
            rule = rules.get((t.role, t.rule))
            built = loaded.setdefault(file, mx.load(str(Path(directory) / file)))
            lead = sample(t.shape[0]) if len(t.shape) == 3 else None
            value = expected(t, plan.sources[t.role], rule, lead)
            if _differs(built, t, value, lead):
                which = f" (experts {lead})" if lead and len(lead) < t.shape[0] else ""
                return (f"{file}: '{t.key}'{which} differs from its source "
                        f"{', '.join(t.source_names()[:2])}{' ...' if len(t.source_names()) > 2 else ''} "
                        f"({t.source_file}) under rule '{t.rule}'")
        loaded.pop(file, None)
    return None


def run(directory: Path, plan, params: dict, bodies=None) -> dict:
    different = check(directory, plan)
    if different:
        return {"passed": False, "cause": different}
    head = sum(len(plan.files[f]) for f in plan.sidecar_files)
    combined = sum(1 for f in plan.indexed_files for t in plan.files[f] if t.segments)
    return {"passed": True, "summary": {"head_tensors": head, "split_or_stacked_trunk_tensors": combined}}
