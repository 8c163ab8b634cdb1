"""Quantization rules -> per-module decisions, mlx-lm's config entries, and the quantizer.

A module is quantizable exactly when mlx-lm's `nn.quantize` would touch it: a 2-D
`.weight` (Linear or Embedding) whose last dim divides by the group size.
Rules are ordered, full-match on the module path, first match wins; modules no
rule matches get the recipe's default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..quant_modes import QUANT_MODES
from ..recipe import QuantParams, Quantization

ROW_CHUNK_BYTES = 32 * 2**20   # default row chunk: a piece of a large tensor holds about this many bytes


@dataclass(frozen=True)
class QuantDecision:
    params: QuantParams | None   # None: kept in float
    rule: str                    # rule name, "default", or "not quantizable"
    note: str = ""


def module_path(tensor_key: str) -> str | None:
    return tensor_key[: -len(".weight")] if tensor_key.endswith(".weight") else None


def is_quantizable(tensor_key: str, shape: tuple[int, ...]) -> bool:
    """A 2-D `.weight` (Linear, Embedding) or a 3-D stacked-experts `.weight` [E, out, in]
    (mlx-lm's SwitchLinear); a 3-D weight with last dim 1 is a conv kernel, which mlx-lm never quantizes."""
    return module_path(tensor_key) is not None and (len(shape) == 2 or (len(shape) == 3 and shape[-1] > 1))


class QuantRules:
    def __init__(self, quantization: Quantization, num_layers: int = 0):
        """num_layers: the body's layer count n, for rules that select layers by index."""
        self.q = quantization
        self.num_layers = num_layers
        self.patterns = [re.compile(r.match) for r in quantization.rules]
        self.used: set[str] = set()

    def decide(self, tensor_key: str, shape: tuple[int, ...]) -> QuantDecision:
        if not is_quantizable(tensor_key, shape):
            return QuantDecision(None, "not quantizable")
        path = module_path(tensor_key)
        params, rule_name = self.q.default, "default"
        for rule, pattern in zip(self.q.rules, self.patterns):
            hit = pattern.fullmatch(path)
            if hit and rule.layers is not None and not rule.layers.selects(int(hit["layer"]), self.num_layers):
                hit = None
            if hit:
                self.used.add(rule.name)
                if not rule.quantize:
                    return QuantDecision(None, rule.name)
                params = QuantParams(
                    bits=rule.bits or self.q.default.bits,
                    group_size=rule.group_size or self.q.default.group_size,
                    mode=rule.mode or self.q.default.mode,
                )
                rule_name = rule.name
                break
        if shape[-1] % params.group_size:
            return QuantDecision(None, rule_name, f"last dim {shape[-1]} not divisible by group size {params.group_size}")
        return QuantDecision(params, rule_name)

    def unused(self) -> list[str]:
        return [r.name for r in self.q.rules if r.name not in self.used and not r.optional]


def config_entries(default: QuantParams, decisions: dict[str, QuantDecision]) -> dict:
    """mlx-lm's `quantization` dict: the default plus one entry per module that differs."""
    entries: dict = default.model_dump()
    for tensor_key, d in decisions.items():
        if d.rule == "not quantizable":
            continue
        path = module_path(tensor_key)
        if d.params is None:
            entries[path] = False
        elif d.params != default:   # as mlx-lm's quant predicates write them: no "mode" for affine
            entry = {"group_size": d.params.group_size, "bits": d.params.bits}
            entries[path] = entry if d.params.mode == "affine" else {**entry, "mode": d.params.mode}
    return entries


def quantized_outputs(shape: tuple[int, ...], p: QuantParams, dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of what mx.quantize returns for a [..., rows, cols] tensor
    (leading axes, e.g. stacked experts, are kept as they are)."""
    *lead, cols = shape
    lead = tuple(lead)
    spec = QUANT_MODES[p.mode]
    groups = lead + (cols // p.group_size,)
    out = {"weight": ("uint32", lead + (cols * p.bits // 32,)), "scales": (dtype if spec.float_scales else "uint8", groups)}
    if spec.biases:
        out["biases"] = (dtype, groups)
    return out


def layer_count(config: dict | None) -> int:
    """The body's num_hidden_layers (nested text_config or flat), 0 when the config has none."""
    config = config or {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    n = text.get("num_hidden_layers", 0)
    return n if isinstance(n, int) else 0


def row_chunks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int = ROW_CHUNK_BYTES) -> list[slice]:
    """Row slices small enough to bound memory; per-row-group quantization makes them exact."""
    row_bytes = max(1, itemsize * (math.prod(shape[1:]) if len(shape) > 1 else 1))
    step = max(1, chunk_bytes // row_bytes)
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]
