"""BuildPlan: every output tensor with its source, transforms, quantization and file.

Planning reads only headers and metadata, never tensor bytes. It is where the
recipe's tables meet the sources, so it is where unmapped tensors, unmatched rules
and bad transform inputs are reported, naming the recipe key and the source tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import PlanError, SourceError
from .ownership import check_output_location
from .quant import QuantDecision, QuantRules, config_entries, quantized_shapes
from .recipe import QuantParams, Recipe, recipe_line
from .remap import Table
from .sources import TensorSource, open_source
from .sources.gguf_file import GGUFSource
from .transforms import TRANSFORMS

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "uint32": 4, "float64": 8, "int64": 8, "int32": 4}


@dataclass(frozen=True)
class TensorPlan:
    key: str                      # output tensor name (for quantized: the `.weight`)
    role: str                     # source role
    source_key: str
    source_file: str
    source_dtype: str
    stored_as: str
    rule: str                     # remap rule name
    transforms: tuple[str, ...]
    dtype: str                    # float dtype written (before quantization)
    shape: tuple[int, ...]        # after transforms
    quant: QuantParams | None
    quant_rule: str
    file: str = ""                # output file name, filled by layout

    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor this entry writes."""
        if self.quant is None:
            return [(self.key, self.dtype, self.shape)]
        base = self.key[: -len("weight")]
        shapes = quantized_shapes(self.shape, self.quant)
        return [(base + "weight", "uint32", shapes["weight"]),
                (base + "scales", self.dtype, shapes["scales"]),
                (base + "biases", self.dtype, shapes["biases"])]

    def nbytes(self) -> int:
        total = 0
        for _, dtype, shape in self.outputs():
            n = ITEMSIZE[dtype]
            for d in shape:
                n *= d
            total += n
        return total


@dataclass
class BuildPlan:
    recipe: Recipe
    tensors: list[TensorPlan]
    files: dict[str, list[TensorPlan]]        # output file -> entries, in order
    indexed_files: list[str]                  # trunk shards (listed in the index)
    sidecar_files: list[str]
    dropped: dict[str, dict[str, str]]        # role -> source key -> rule
    quant_config: dict
    provenance: list[dict]
    warnings: list[str] = field(default_factory=list)
    sources: dict[str, TensorSource] = field(default_factory=dict, repr=False)
    # Filled by tasks.fingerprint: source file digests, per-file action keys, the build key.
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    file_keys: dict[str, str] = field(default_factory=dict)
    build_key: str = ""

    @property
    def body(self) -> TensorSource:
        return self.sources["body"]


def natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _placeholders(source: TensorSource) -> dict[str, str]:
    if isinstance(source, GGUFSource):
        return {"mtp_block": str(source.mtp_block())}
    return {}


def open_sources(recipe: Recipe) -> tuple[dict[str, TensorSource], list[dict]]:
    if "body" not in recipe.sources:
        raise PlanError(f"{recipe.recipe_file}: sources.body: the recipe names no body source")
    check_output_location(recipe)  # never replace a source, the cache, home... (ownership.py)
    opened, provenance = {}, []
    for role, spec in recipe.sources.items():
        rules = recipe.remap[recipe.table_for(role)]
        holder: dict = {}

        def keep(name, placeholders=None, rules=rules, holder=holder):
            # placeholders: e.g. {"mtp_block": "32"} once a GGUF header is known (remote byte-range fetch)
            slot = tuple(sorted((placeholders or {}).items()))
            if slot not in holder:
                holder[slot] = Table(rules, placeholders)
            return holder[slot].keeps(name)

        source, prov = open_source(role, spec, keep)
        if role == "body" and source.config is None:
            # Without it the output's config.json and the head's expected shapes would be defaults.
            where = source.root / "config.json" if source.root else source.files[0]
            raise SourceError(f"{where}: the body source's config.json is missing; the body must be a "
                              "model directory holding its config.json")
        opened[role] = source
        provenance.append(prov)
    return opened, provenance


def _map_source(recipe: Recipe, role: str, source: TensorSource, default_dtype: str):
    table_name = recipe.table_for(role)
    table = Table(recipe.remap[table_name], _placeholders(source))
    result = table.apply(source.keys() + list(getattr(source, "unread", [])))
    where = source.files[0] if len(source.files) == 1 else source.root
    if result.unmatched_keys:
        shown = ", ".join(result.unmatched_keys[:5])
        more = f" and {len(result.unmatched_keys) - 5} more" if len(result.unmatched_keys) > 5 else ""
        raise PlanError(
            f"{recipe_line(recipe, 'remap', table_name)}: remap.{table_name}: no rule maps or drops "
            f"{len(result.unmatched_keys)} tensor(s) of source '{role}' ({where}): {shown}{more}"
        )
    if result.unused_rules:
        rule = result.unused_rules[0]
        idx = recipe.remap[table_name].index(rule)
        raise PlanError(
            f"{recipe_line(recipe, 'remap', table_name, idx)}: remap.{table_name}[{idx}] rule '{rule.name}' "
            f"matched no tensor of source '{role}' ({where}); fix the pattern or mark it optional: true"
        )
    entries = []
    for m in result.mapped:
        if m.source_key not in source.tensors:
            raise PlanError(f"source '{role}' ({where}): tensor '{m.source_key}' is needed but its shard was not fetched")
        info = source.info(m.source_key)
        shape = info.shape
        for name in m.rule.transforms:
            problem = TRANSFORMS[name].check(shape)
            if problem:
                raise PlanError(f"{info.file}: tensor '{m.source_key}' (rule '{m.rule.name}'): {problem}")
            shape = TRANSFORMS[name].shape(shape)
        dtype = m.rule.dtype or default_dtype
        if dtype == "source":
            dtype = info.dtype
        entries.append((m, info, shape, dtype))
    return entries, result.dropped


def make_plan(recipe: Recipe, sources: dict[str, TensorSource] | None = None,
              provenance: list[dict] | None = None) -> BuildPlan:
    if sources is None:
        sources, provenance = open_sources(recipe)
    rules = QuantRules(recipe.quantization)
    tensors: list[TensorPlan] = []
    dropped: dict[str, dict[str, str]] = {}
    seen: dict[str, str] = {}
    warnings: list[str] = []
    for role, source in sources.items():
        entries, dropped[role] = _map_source(recipe, role, source, recipe.dtype)
        for m, info, shape, dtype in entries:
            if m.output_key in seen:
                raise PlanError(
                    f"{recipe_line(recipe, 'remap', recipe.table_for(role))}: output tensor '{m.output_key}' "
                    f"is produced twice (from {seen[m.output_key]} and {role}:{m.source_key})"
                )
            seen[m.output_key] = f"{role}:{m.source_key}"
            decision: QuantDecision = rules.decide(m.output_key, shape)
            if decision.note:
                warnings.append(f"{m.output_key}: kept in {dtype}: {decision.note}")
            if info.stored_as not in ("BF16", "F16", "F32", ""):
                warnings.append(f"{m.output_key}: source {info.file} stores '{m.source_key}' as {info.stored_as}; "
                                f"it is dequantized, not original precision")
            tensors.append(TensorPlan(
                key=m.output_key, role=role, source_key=m.source_key, source_file=info.file,
                source_dtype=info.dtype, stored_as=info.stored_as, rule=m.rule.name,
                transforms=tuple(m.rule.transforms), dtype=dtype, shape=shape,
                quant=decision.params, quant_rule=decision.rule,
            ))
    unused = rules.unused()
    if unused:
        idx = [r.name for r in recipe.quantization.rules].index(unused[0])
        raise PlanError(f"{recipe_line(recipe, 'quantization', 'rules', idx)}: quantization.rules[{idx}] "
                        f"rule '{unused[0]}' matched no output module; fix the pattern or mark it optional: true")
    tensors.sort(key=lambda t: natural_key(t.key))
    files, indexed, sidecars = _layout(recipe, tensors)
    tensors = [t for f in files.values() for t in f]
    trunk_decisions = {t.key: QuantDecision(t.quant, t.quant_rule) for f in indexed for t in files[f]}
    return BuildPlan(
        recipe=recipe, tensors=tensors, files=files, indexed_files=indexed, sidecar_files=sidecars,
        dropped=dropped, quant_config=config_entries(recipe.quantization.default, trunk_decisions),
        provenance=provenance or [], warnings=warnings, sources=sources,
    )


_LAYER = re.compile(r".*?\.layers\.\d+\.")


def layout_group(key: str) -> str:
    """Tensors that always share a shard: one decoder layer (`...layers.N.*`), else the tensor alone."""
    m = _LAYER.match(key)
    return m.group(0) if m else key


def bound_bytes(t: TensorPlan) -> int:
    """Size of `t` stored unquantized: an upper bound of its stored size under any quantization
    (a quantized matrix, scales and biases included, is never larger than the float one)."""
    n = ITEMSIZE[t.dtype]
    for d in t.shape:
        n *= d
    return n


def _layout(recipe: Recipe, tensors: list[TensorPlan]):
    """Assign files: sidecars by rule, the rest to model shards of at most max_shard_bytes.

    Stable shard boundaries (forgekit/README "Performance"): whole layer groups are packed
    in order by `bound_bytes`, which depends on names, shapes and float dtypes only, never
    on quantization. So changing a quantization rule changes the bytes of exactly the shards
    holding the tensors it matches and moves no tensor to another shard; a layer is split
    only if it alone exceeds the budget. Shards never exceed max_shard_bytes, except a single
    tensor larger than the budget, which gets a shard of its own (as in mlx-lm); quantized to
    4 bits shards come out at about a third of the budget.
    """
    from dataclasses import replace

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


def describe(plan: BuildPlan) -> list[dict]:
    """One row per output tensor, for `forgekit plan` and the model card."""
    rows = []
    for t in plan.tensors:
        q = f"{t.quant.bits}-bit g{t.quant.group_size} {t.quant.mode}" if t.quant else t.dtype
        rows.append({"output": t.key, "file": t.file, "source": f"{t.role}:{t.source_key}",
                     "stored_as": t.stored_as, "transforms": list(t.transforms), "quant": q,
                     "quant_rule": t.quant_rule, "bytes": t.nbytes(), "shape": list(t.shape)})
    return rows
