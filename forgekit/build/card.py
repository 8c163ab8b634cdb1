"""The model card (README.md of the output), written to be published on the Hub unedited.

Everything in it comes from the plan (recipe, sources, tensors), the output's config.json and
the verification report; the recipe's `card:` section overrides the defaults. Local sources are
named by file name and digest, never by a path of the builder's machine.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import yaml

from .. import __version__
from ..plan import BuildPlan
from ..plan.head import dequantized_note
from ..verify import headline

STANDARD_TAGS = ("mlx", "mtplx", "mtp", "speculative-decoding")
MODEL_LINE = "MODEL="          # the one line of the usage block `forgekit publish` sets to the repo id
UNVERIFIED_BANNER = "> **Unverified build.**"


# ---------------------------------------------------------------- facts


def body_license(plan: BuildPlan) -> dict[str, str]:
    """license (+ license_name/license_link) from the body's own card front matter, else its config."""
    found: dict[str, str] = {}
    root = plan.body.root
    readme = root / "README.md" if root is not None else None
    if readme is not None and readme.is_file():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict):
                found = {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}
    if not found and (plan.body.config or {}).get("license"):
        found = {"license": str(plan.body.config["license"])}
    return found


def body_repo(plan: BuildPlan) -> str | None:
    return next((p.get("repo") for p in plan.provenance if p["role"] == "body"), None)


def license_fields(plan: BuildPlan) -> tuple[dict[str, str], str]:
    """(front matter license fields, where they came from)."""
    card = plan.recipe.card
    if card.license:
        fields = {"license": card.license}
        fields.update({k: v for k, v in (("license_name", card.license_name), ("license_link", card.license_link)) if v})
        return fields, "set by the recipe"
    inherited = body_license(plan)
    return inherited, (f"inherited from the body ({body_repo(plan) or 'its card'})" if inherited else "")


def text_config(config: dict) -> dict:
    return config.get("text_config") or config


def tags(plan: BuildPlan, config: dict) -> list[str]:
    text = text_config(config)
    found = list(STANDARD_TAGS)
    for marker in (config.get("model_type"), text.get("model_type")):
        if marker and not marker.endswith("_text"):
            found.append(marker)
    quant = plan.quant_config or {}
    if quant.get("bits"):
        found.append(f"{quant['bits']}-bit")
    if text.get("num_experts"):
        found.append("moe")
    found += list(plan.recipe.card.tags)
    return list(dict.fromkeys(found))


def front_matter(plan: BuildPlan, config: dict) -> dict:
    card = plan.recipe.card
    meta: dict = {"library_name": "mlx"}
    meta.update(license_fields(plan)[0])
    base = card.base_model or body_repo(plan)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized"
    meta["tags"] = tags(plan, config)
    meta["pipeline_tag"] = "text-generation"
    return meta


def where(prov: dict) -> str:
    """A source as a reader can find it: repo id (+ file), or a local file/dir name."""
    if prov.get("repo"):
        return f"`{prov['repo']}`" + (f" (file `{prov['file']}`)" if prov.get("file") else "")
    return f"local `{Path(prov['path']).name}`"


def head_origin(plan: BuildPlan) -> str:
    by_role = {p["role"]: p for p in plan.provenance}
    mtp, body = by_role.get("mtp"), by_role.get("body")
    if mtp is None:
        return "The build carries no MTP head."
    stored = sorted({t.stored_as for t in plan.tensors if t.role == "mtp" and t.stored_as})
    note = dequantized_note([t for t in plan.tensors if t.role == "mtp"])
    kind = f" (tensors stored there as {', '.join(stored)}" + (f"; {note}, not the original precision" if note else "") + ")" \
        if stored else ""
    if body is not None and mtp.get("repo") == body.get("repo") and mtp.get("path") == body.get("path"):
        return f"The MTP head is the body's own, from {where(mtp)}{kind}."
    if (mtp.get("file") or mtp.get("path") or "").endswith(".gguf"):
        return f"The MTP head comes from the GGUF {where(mtp)}{kind}."
    return f"The MTP head comes from {where(mtp)}{kind}, grafted onto this body."


# ---------------------------------------------------------------- sections


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def architecture(plan: BuildPlan, config: dict) -> list[str]:
    t = text_config(config)
    layer_types = Counter(t.get("layer_types") or [])
    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(layer_types.items()))
    rows = [("architecture", ", ".join(config.get("architectures") or []) or config.get("model_type", "-")),
            ("decoder layers", f"{t.get('num_hidden_layers', '-')}" + (f" ({kinds})" if kinds else "")),
            ("MTP layers", t.get("mtp_num_hidden_layers", 0)),
            ("hidden size", t.get("hidden_size", "-")),
            ("attention heads / KV heads / head dim",
             f"{t.get('num_attention_heads', '-')} / {t.get('num_key_value_heads', '-')} / {t.get('head_dim', '-')}")]
    if t.get("num_experts"):
        rows.append(("experts (active per token)", f"{t['num_experts']} ({t.get('num_experts_per_tok', '-')})"))
    rows += [("vocabulary", t.get("vocab_size", "-")),
             ("max context (tokens)", t.get("max_position_embeddings", "-")),
             ("MTPLX architecture id", f"`{plan.recipe.runtime.get('arch_id', '-')}`")]
    return _table(("", ""), rows)


def _part_quant(entries) -> str:
    kinds = Counter()
    for t in entries:
        if t.quant is not None:
            kinds[f"{t.quant.bits}-bit {t.quant.mode}, group {t.quant.group_size}"] += 1
        else:
            kinds[t.dtype] += 1
    return "; ".join(f"{kind}: {n} tensors" for kind, n in kinds.most_common())


def quantization(plan: BuildPlan, sizes: dict[str, int]) -> list[str]:
    parts = [("trunk (mlx-lm)", plan.indexed_files)] + [("MTP head (sidecar, not in the index)", [f]) for f in plan.sidecar_files]
    rows = []
    for label, files in parts:
        entries = [t for f in files for t in plan.files.get(f, [])]
        size = sum(sizes.get(f, 0) for f in files)
        rows.append((label, ", ".join(f"`{f}`" for f in files), _part_quant(entries), _human(size)))
    rest = sum(n for f, n in sizes.items() if not any(f in files for _, files in parts))
    rows.append(("config, tokenizer, reports", "", "", _human(rest)))
    rows.append(("**total on disk**", "", "", f"**{_human(sum(sizes.values()))}**"))
    return _table(("part", "files", "quantization", "size"), rows)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def usage(plan: BuildPlan, model: str) -> list[str]:
    serve = plan.recipe.runtime.get("serve", {})
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in serve.items())
    return ["```bash", f"{MODEL_LINE}{model}   # the Hub repo id, or a local copy of this directory",
            "pip install mtplx", f'mtplx serve --model "$MODEL"{flags}', "```", "",
            "The trunk alone (no speculative decoding) loads with mlx-lm:", "",
            "```bash", 'mlx_lm.generate --model "$MODEL" --prompt "Hello"', "```"]


def sampling(plan: BuildPlan) -> list[str]:
    sampler = plan.recipe.runtime.get("sampler") or {}
    if not sampler:
        return ["The recipe sets no default sampling."]
    return _table(tuple(sampler), [tuple(sampler.values())])


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+([\w.+-]*)")


def without_paths(text: str) -> str:
    """A step's message with every absolute path cut to its last part (a skip reason quotes an
    exception, which may name files of the builder's machine)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "/", text)


def verification_table(verification: dict) -> list[str]:
    rows = []
    for r in verification.get("results", []):
        verdict = "FAILED" if not r.get("passed") else "skipped" if r.get("skipped") else "passed"
        rows.append((r["step"], verdict, without_paths(headline(r).removeprefix("skipped: "))))
    return _table(("step", "result", "headline"), rows) if rows else ["No verification step ran."]


def provenance(plan: BuildPlan, digests: dict) -> list[str]:
    rows = []
    for prov in plan.provenance:
        files = digests.get(prov["role"], {})
        if prov.get("repo"):
            rows.append((prov["role"], f"`{prov['repo']}`", f"`{prov.get('commit') or prov.get('revision')}`",
                         ", ".join(f"`{Path(f).name}`" for f in files) or "-"))
        else:
            rows.append((prov["role"], "local", "-",
                         ", ".join(f"`{Path(f).name}` xxh3-128 `{d}`" for f, d in files.items())))
    return _table(("source", "repo", "commit", "files"), rows)


# ---------------------------------------------------------------- the card


def model_card(plan: BuildPlan, config: dict, digests: dict, verification: dict, sizes: dict[str, int],
               status: str) -> str:
    """The whole README.md. `status` is the verification status of mtplx_runtime.json."""
    r = plan.recipe
    body = next((p for p in plan.provenance if p["role"] == "body"), {})
    default = (f"An MLX build of {where(body)} for speculative decoding with MTPLX: a {plan.quant_config.get('bits', '?')}-bit "
               f"trunk that mlx-lm loads as is, plus the model's multi-token-prediction (MTP) head in bf16.") if body else ""
    licence, licence_from = license_fields(plan)
    sections = [
        "---", yaml.safe_dump(front_matter(plan, config), sort_keys=False).rstrip(), "---", "",
        f"# {r.card.title or r.name}", "", r.description or default, "", head_origin(plan), "",
        "## Architecture", "", *architecture(plan, config), "",
        "## Quantization and size", "", *quantization(plan, sizes), "",
        "## Usage", "", *usage(plan, r.card.repo or r.name), "",
        "## Default sampling", "", *sampling(plan), "",
        "## Verification", "", f"Status: `{status}` (CPU, forgekit {__version__}).", "", *verification_table(verification), "",
        "Speed (tokens/s) is not measured here: it needs Apple silicon (`mtplx forge verify DIR --stamp`).", "",
        "## Provenance", "", *provenance(plan, digests), "",
        f"Recipe: `{Path(r.recipe_file).name}` (chain: {' -> '.join(Path(f).name for f in r.recipe_files)}).", "",
        "## Credits and license", "",
        credits(plan), *r.card.credits, "",
        f"License: `{licence['license']}`, {licence_from}." if licence else
        "License: not stated by the sources; see the original model's terms before use.", "",
    ]
    return "\n".join(sections)


def credits(plan: BuildPlan) -> str:
    repos = list(dict.fromkeys(f"`{p['repo']}`" for p in plan.provenance if p.get("repo")))
    weights = f"Weights by the authors of {', '.join(repos)}" if repos else "Weights from the local sources above"
    return f"{weights}; converted with forgekit {__version__}."


def with_repo(card: str, repo: str) -> str:
    """The card with its usage block naming `repo` (what `forgekit publish --repo` uploads)."""
    return "\n".join(MODEL_LINE + repo + line[line.index("   #"):] if line.startswith(MODEL_LINE) and "   #" in line
                     else line for line in card.split("\n"))


def marked_unverified(card: str, reason: str) -> str:
    """The card with a banner under its front matter (what `forgekit publish --force` uploads)."""
    head, sep, rest = card.partition("\n---\n")
    banner = f"{UNVERIFIED_BANNER} Published with `--force`: {reason}. Treat its numbers as unchecked.\n\n"
    return head + sep + banner + rest if sep else banner + card
