"""The non-tensor files of the output directory: config.json, the index, tokenizer
files, mtplx_runtime.json and the model card. Pure functions from the plan to
bytes, so their content can be hashed into the build key."""

from __future__ import annotations

import copy
import platform
from pathlib import Path

from .. import __version__
from ..plan import BuildPlan
from ..plan.config_edits import edited_config, set_dotted
from ..plan.head import dequantized_note, head_entries, head_quantization, sidecar_format

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "vocab.json", "merges.txt")


def config_json(plan: BuildPlan) -> dict:
    """Body config + recipe edits + mlx-lm's quantization entries (mirrored, like mlx-lm)."""
    config = edited_config(plan.body.config, plan.recipe.config)
    if plan.tied is not None:            # decided from the tensors (plan/tying.py), stated everywhere
        for dotted in plan.recipe.tied_embeddings.config:
            set_dotted(config, dotted, plan.tied)
    config["quantization"] = plan.quant_config
    config["quantization_config"] = copy.deepcopy(plan.quant_config)
    head_q = head_quantization(head_entries(plan.tensors, plan.sidecar_files))
    if head_q:
        config["mtplx_mtp_quantization"] = head_q
    return dict(sorted(config.items()))


def index_json(plan: BuildPlan) -> dict:
    weight_map = {}
    total = 0
    for f in plan.indexed_files:
        for t in plan.files[f]:
            total += t.nbytes()
            for name, _, _ in t.outputs():
                weight_map[name] = f
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def copied_files(plan: BuildPlan) -> dict[str, Path]:
    """Files copied verbatim from the body directory: tokenizer, generation config, extras."""
    root = plan.body.root
    names = list(TOKENIZER_FILES) + list(plan.recipe.output.copy_files)
    return {n: root / n for n in names if root is not None and (root / n).is_file()}


def source_summary(plan: BuildPlan, digests: dict[str, dict[str, str]]) -> list[dict]:
    """Provenance per source: location, revision, digests, and the GGML types actually stored."""
    out = []
    for prov in plan.provenance:
        src = plan.sources[prov["role"]]
        stored = sorted({t.stored_as for t in plan.tensors if t.role == prov["role"]})
        note = dequantized_note([t for t in plan.tensors if t.role == prov["role"]])
        out.append({**prov, "files": {Path(f).name: d for f, d in digests.get(prov["role"], {}).items()},
                    "stored_as": stored, "format": type(src).__name__, **({"dequantized": note} if note else {})})
    return out


def steps_run(verification: dict) -> list[str]:
    """The verify steps that actually checked something (a skipped step did not)."""
    results = verification.get("results")
    if results is None:
        return list(verification.get("steps", []))
    return [r["step"] for r in results if not r.get("skipped")]


def mtplx_runtime_check(verification: dict) -> dict:
    """What the `mtplx` step established: ran (with where and the numbers), skipped (why), or not run."""
    result = next((r for r in verification.get("results", []) if r.get("step") == "mtplx"), None)
    if result is None:
        return {"status": "not_run", "reason": "the recipe has no mtplx verify step"}
    if result.get("skipped"):
        return {"status": "skipped", "reason": result["skipped"]}
    s = result.get("summary", {})
    return {"status": "passed" if result.get("passed") else "failed",
            **{k: s.get(k) for k in ("mtplx", "device", "metal_available", "mlx", "acceptance",
                                     "tokens_per_verify", "equals_ar")}}


def verification_status(verification: dict) -> str:
    """Only a passed MTP acceptance probe earns a verified status; MTPLX treats `unverified_*` as unverified."""
    steps = steps_run(verification)
    if not steps:
        return "unverified_no_forgekit_checks_ran"
    if not verification.get("passed", False):
        return "unverified_forgekit_checks_failed"
    if "mtp" not in steps:
        return "unverified_mtp_acceptance_not_probed"
    return "cpu_verified_by_forgekit"


def head_summary(plan: BuildPlan) -> dict:
    """How the MTP head is stored and whether it was dequantized ({} without a head)."""
    head = head_entries(plan.tensors, plan.sidecar_files)
    if not head:
        return {}
    return {"sidecar": sidecar_format(head), "source": dequantized_note(head) or "original precision (no dequantization)"}


def runtime_json(plan: BuildPlan, digests: dict, verification: dict) -> dict:
    """mtplx_runtime.json: the recipe's runtime block + what forgekit verified, honestly."""
    rt = copy.deepcopy(plan.recipe.runtime)
    head = head_summary(plan)
    if head:   # what was written, not what the recipe assumed
        rt["mtp_sidecar"] = head["sidecar"]
        rt["mtp_head_source"] = head["source"]
    rt["exactness_baseline"] = {
        "status": verification_status(verification),
        "method": "forgekit verify steps on CPU (mlx-cpu): " + ", ".join(steps_run(verification)),
        "skipped": {r["step"]: r["skipped"] for r in verification.get("results", []) if r.get("skipped")},
        "results": verification.get("summary", {}),
        "speed": "not measured: tok/s needs an Apple GPU; run `mtplx forge verify DIR --stamp` on a Mac",
    }
    rt["verified_on"] = {"machine": f"{platform.system()} {platform.machine()}", "device": "cpu",
                         **verification.get("verified_on", {}), "warnings": verification.get("warnings", []),
                         "tool": f"forgekit {__version__}", "python": platform.python_version(),
                         "mtplx_runtime": mtplx_runtime_check(verification)}
    sources = [{**s, "path": Path(s["path"]).name} if s.get("path") else s  # published: no path of this machine
               for s in source_summary(plan, digests)]
    rt["provenance"] = {"recipe": plan.recipe.name, "sources": sources}
    return rt
