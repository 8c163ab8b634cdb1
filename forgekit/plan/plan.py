"""BuildPlan: every output tensor with its source, transforms, quantization and file.

Planning reads only headers and metadata, never tensor bytes. It is where the
recipe's tables meet the sources, so it is where unmapped tensors, unmatched rules
and bad transform inputs are reported, naming the recipe key and the source tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..dtypes import BY_GGML
from ..errors import PlanError, SourceError
from ..recipe import Recipe, recipe_line
from ..sources import TensorSource, open_source
from .head import ACCEPTANCE_WARNING, describe, head_entries, head_quantization, mixed_head_params
from .layout import assign_files
from .location import check_output_location
from .quant import QuantDecision, QuantRules, config_entries, layer_count, module_path
from .combine import combine
from .remap import Table
from .tensor import TensorPlan
from .transforms import TRANSFORMS
from .config_edits import edited_config, set_dotted
from .shapes import check_shapes
from .tying import decide_tied


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build will do, from headers alone. Never changed after make_plan returns:
    the keys that depend on source bytes are computed separately (build.keys.BuildKeys)."""

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
    tied: Optional[bool] = None               # tied output embeddings (plan/tying.py); None: not declared

    @property
    def body(self) -> TensorSource:
        return self.sources["body"]


def natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def open_sources(recipe: Recipe) -> tuple[dict[str, TensorSource], list[dict]]:
    if "body" not in recipe.sources:
        raise PlanError(f"{recipe.recipe_file}: sources.body: the recipe names no body source")
    check_output_location(recipe)  # never replace a source, the cache, home... (location.py)
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


def _map_source(recipe: Recipe, role: str, source: TensorSource, default_dtype: str, config: dict | None):
    table_name = recipe.table_for(role)
    table = Table(recipe.remap[table_name], source.placeholders())
    result = table.apply(source.keys() + list(source.unread))
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
    for m in result.mapped:
        if m.source_key not in source.tensors:
            raise PlanError(f"source '{role}' ({where}): tensor '{m.source_key}' is needed but its shard was not fetched")
    entries = []
    for c in combine(result.mapped, source.tensors, config):   # split / stack rules
        dtype = c.mapped.rule.dtype or default_dtype
        entries.append((c.mapped, c.info, c.shape, c.info.dtype if dtype == "source" else dtype, c.segments))
    for m in result.mapped:
        if m.rule.split or m.rule.stack:
            continue
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
        entries.append((m, info, shape, dtype, ()))
    return entries, result.dropped


def _quant_config(recipe: Recipe, files: dict, indexed: list, sidecars: list, tensors: list[TensorPlan],
                  warnings: list[str]) -> dict:
    """config.json's quantization entries: the trunk's as mlx-lm writes them, plus every quantized
    head module named explicitly (even at the default: the load step and readers of config.json
    tell a deliberately quantized head by these entries). A head mixing settings is refused."""
    trunk_decisions = {t.key: QuantDecision(t.quant, t.quant_rule) for f in indexed for t in files[f]}
    head = head_entries(tensors, sidecars)
    mixed = mixed_head_params(head)
    if mixed:
        raise PlanError(f"{recipe_line(recipe, 'quantization', 'rules')}: quantization.rules: the MTP head mixes "
                        f"{mixed}; MTPLX loads a head quantized one way: give its rules one bits/group size/mode")
    if head_quantization(head):
        warnings.append(ACCEPTANCE_WARNING.format(how=describe(next(t for t in head if t.quant))))
    quant_config = config_entries(recipe.quantization.default, trunk_decisions)
    quant_config.update({module_path(t.key): t.quant.model_dump() for t in head if t.quant})
    return quant_config


def make_plan(recipe: Recipe, sources: dict[str, TensorSource] | None = None,
              provenance: list[dict] | None = None) -> BuildPlan:
    if sources is None:
        sources, provenance = open_sources(recipe)
    rules = QuantRules(recipe.quantization, layer_count(sources["body"].config))
    tensors: list[TensorPlan] = []
    dropped: dict[str, dict[str, str]] = {}
    seen: dict[str, str] = {}
    warnings: list[str] = []
    for role, source in sources.items():
        entries, dropped[role] = _map_source(recipe, role, source, recipe.dtype, getattr(sources.get("body"), "config", None))
        for m, info, shape, dtype, segments in entries:
            if m.output_key in seen:
                raise PlanError(
                    f"{recipe_line(recipe, 'remap', recipe.table_for(role))}: output tensor '{m.output_key}' "
                    f"is produced twice (from {seen[m.output_key]} and {role}:{m.source_key})"
                )
            seen[m.output_key] = f"{role}:{m.source_key}"
            decision: QuantDecision = rules.decide(m.output_key, shape)
            if decision.note:
                warnings.append(f"{m.output_key}: kept in {dtype}: {decision.note}")
            if info.stored_as and info.stored_as not in BY_GGML:  # not an exactly stored float type
                warnings.append(f"{m.output_key}: source {info.file} stores '{m.source_key}' as {info.stored_as}; "
                                f"it is dequantized, not original precision")
            tensors.append(TensorPlan(
                key=m.output_key, role=role, source_key=m.source_key, source_file=info.file,
                source_dtype=info.dtype, stored_as=info.stored_as, rule=m.rule.name,
                transforms=tuple(m.rule.transforms), dtype=dtype, shape=shape,
                quant=decision.params, quant_rule=decision.rule, segments=segments,
            ))
    unused = rules.unused()
    if unused:
        idx = [r.name for r in recipe.quantization.rules].index(unused[0])
        raise PlanError(f"{recipe_line(recipe, 'quantization', 'rules', idx)}: quantization.rules[{idx}] "
                        f"rule '{unused[0]}' matched no output module; fix the pattern or mark it optional: true")
    body = sources["body"]
    body_config_file = body.root / "config.json" if body.root else body.files[0]
    tied = decide_tied(recipe, {t.key for t in tensors}, body.config, body_config_file)
    if recipe.tied_embeddings is not None:   # shapes against the config the build writes (tie included)
        config = edited_config(body.config, recipe.config)
        for dotted in recipe.tied_embeddings.config:
            set_dotted(config, dotted, tied)
        check_shapes(tensors, config, body_config_file)
    tensors.sort(key=lambda t: natural_key(t.key))
    files, indexed, sidecars = assign_files(recipe, tensors)
    tensors = [t for f in files.values() for t in f]
    quant_config = _quant_config(recipe, files, indexed, sidecars, tensors, warnings)
    return BuildPlan(
        recipe=recipe, tensors=tensors, files=files, indexed_files=indexed, sidecar_files=sidecars,
        dropped=dropped, quant_config=quant_config,
        provenance=provenance or [], warnings=warnings, sources=sources, tied=tied,
    )
