"""What `forgekit plan` shows: one row per output tensor, totals per file, warnings."""

from __future__ import annotations

from .plan import BuildPlan
from .remap import Table


def describe(plan: BuildPlan) -> list[dict]:
    """One row per output tensor, for `forgekit plan` and the model card."""
    rows = []
    for t in plan.tensors:
        q = f"{t.quant.bits}-bit g{t.quant.group_size} {t.quant.mode}" if t.quant else t.dtype
        rows.append({"output": t.key, "file": t.file, "source": ", ".join(f"{t.role}:{k}" for k in t.source_names()),
                     "stored_as": t.stored_as, "transforms": list(t.transforms), "quant": q,
                     "quant_rule": t.quant_rule, "bytes": t.nbytes(), "shape": list(t.shape)})
    return rows


def plan_warnings(plan) -> list[str]:
    """The plan's own warnings plus rules that matched nothing (optional ones; others are errors)."""
    recipe = plan.recipe
    warnings = list(plan.warnings)
    for role, source in plan.sources.items():
        name = recipe.table_for(role)
        rules = recipe.remap[name]
        table = Table(rules, source.placeholders())
        used = set()
        for key in source.keys() + list(source.unread):
            hit = table.first_match(key)
            if hit:
                used.add(hit[0].name)
        for i, rule in enumerate(rules):
            if rule.name not in used:
                warnings.append(f"remap.{name}[{i}] rule '{rule.name}' (optional) matches no tensor of source '{role}'")
    quant_used = {t.quant_rule for t in plan.tensors}
    for i, rule in enumerate(recipe.quantization.rules):
        if rule.name not in quant_used:
            warnings.append(f"quantization.rules[{i}] rule '{rule.name}' (optional) matches no output module")
    return warnings


def plan_report(plan) -> dict:
    rows = describe(plan)
    files = {}
    for name, entries in plan.files.items():
        files[name] = {"tensors": len(entries), "bytes": sum(t.nbytes() for t in entries),
                       "indexed": name in plan.indexed_files, "quantized": sum(1 for t in entries if t.quant)}
    dropped = {}
    for role, keys in plan.dropped.items():
        counts: dict[str, int] = {}
        for rule in keys.values():
            counts[rule] = counts.get(rule, 0) + 1
        dropped[role] = counts
    sources = []
    for prov in plan.provenance:
        src = plan.sources[prov["role"]]
        entry = dict(prov)
        entry["tensors"] = len(src.keys()) + len(src.unread)
        entry["mapped"] = sum(1 for t in plan.tensors if t.role == prov["role"])
        entry["dropped"] = len(plan.dropped.get(prov["role"], {}))
        if src.remote:
            entry["remote"] = {**entry.get("remote", {}), **src.remote}
        sources.append(entry)
    return {"recipe": plan.recipe.name, "recipe_file": plan.recipe.recipe_file,
            "recipe_chain": list(plan.recipe.recipe_files), "output_dir": str(plan.recipe.output_dir()),
            "sources": sources, "files": files, "total_bytes": sum(f["bytes"] for f in files.values()),
            "tensor_count": len(rows), "dropped": dropped, "tensors": rows, "warnings": plan_warnings(plan)}
