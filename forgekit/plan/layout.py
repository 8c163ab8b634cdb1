"""Which output file each tensor goes to: sidecars by rule, the rest in layer-stable shards."""

from __future__ import annotations

import re
from dataclasses import replace

from ..dtypes import itemsize
from ..recipe import Recipe
from .tensor import TensorPlan


_LAYER = re.compile(r".*?\.layers\.\d+\.")


def layout_group(key: str) -> str:
    """Tensors that always share a shard: one decoder layer (`...layers.N.*`), else the tensor alone."""
    m = _LAYER.match(key)
    return m.group(0) if m else key


def bound_bytes(t: TensorPlan) -> int:
    """Size of `t` stored unquantized: an upper bound of its stored size under any quantization
    (a quantized matrix, scales and biases included, is never larger than the float one)."""
    n = itemsize(t.dtype)
    for d in t.shape:
        n *= d
    return n


def assign_files(recipe: Recipe, tensors: list[TensorPlan]):
    """Assign files: sidecars by rule, the rest to model shards of at most max_shard_bytes.

    Stable shard boundaries (forgekit/README "Performance"): whole layer groups are packed
    in order by `bound_bytes`, which depends on names, shapes and float dtypes only, never
    on quantization. So changing a quantization rule changes the bytes of exactly the shards
    holding the tensors it matches and moves no tensor to another shard; a layer is split
    only if it alone exceeds the budget. Shards never exceed max_shard_bytes, except a single
    tensor larger than the budget, which gets a shard of its own (as in mlx-lm); quantized to
    4 bits shards come out at about a third of the budget.
    """
    sidecar_patterns = [(re.compile(s.match), s.file) for s in recipe.output.sidecars]
    sidecar: dict[str, list[TensorPlan]] = {}
    groups: dict[str, list[TensorPlan]] = {}
    for t in tensors:
        target = next((f for p, f in sidecar_patterns if p.fullmatch(t.key)), None)
        if target:
            sidecar.setdefault(target, []).append(t)
        else:
            groups.setdefault(layout_group(t.key), []).append(t)
    budget = recipe.output.max_shard_bytes
    units: list[list[TensorPlan]] = []
    for group in groups.values():
        if sum(bound_bytes(t) for t in group) <= budget:
            units.append(group)
        else:
            units.extend([t] for t in group)
    shards: list[list[TensorPlan]] = []
    size = 0
    for unit in units:
        unit_size = sum(bound_bytes(t) for t in unit)
        if not shards or (shards[-1] and size + unit_size > budget):
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_size
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files: dict[str, list[TensorPlan]] = {}
    for name, entries in zip(names, shards):
        files[name] = [replace(t, file=name) for t in entries]
    for name, entries in sidecar.items():
        files[name] = [replace(t, file=name) for t in entries]
    return files, names, list(sidecar)


