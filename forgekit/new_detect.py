"""`forgekit new`: inspect the sources (headers and config only) and pick the base recipe.

What is read, and what it decides:
    body config model_type      -> the base recipe (BASES), dense or MoE, nested or text-only
    body tensors                -> tied (no lm_head tensor) or untied; a contradicting config is said
    --mtp source                -> where the head is: the body's own mtp.* keys, a GGUF's MTP block,
                                   a safetensors head; none -> refused, asking for a graft source
    head tensor types           -> stored bf16/f16/f32, or quantized (built dequantized)
A source that is not on this machine (a hub repo not in the local cache) is not inspected: the
default base is used and the output says so; validation then opens it for real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ForgeError, RecipeError
from .recipe import find_recipe

# body config model_type -> (base recipe, what it is). Text-only saves have their own base: the
# output must be the nested form, the only one mlx-lm and MTPLX load.
BASES = {
    "qwen3_5": ("qwen3.5-dense-mtp", "dense, nested (Qwen3_5ForConditionalGeneration)"),
    "qwen3_5_text": ("qwen3.5-text-mtp", "dense, text-only save (Qwen3_5ForCausalLM, flat keys)"),
    "qwen3_5_moe": ("qwen3.5-moe-mtp", "MoE, nested (Qwen3_5MoeForConditionalGeneration)"),
}
DEFAULT_BASE = BASES["qwen3_5"][0]
EXACT_TYPES = ("BF16", "F16", "F32", "bfloat16", "float16", "float32")


@dataclass
class Detected:
    base: str
    facts: list[str] = field(default_factory=list)


def _open(ref: str):
    """The source opened from a path or the local hub cache, or None where it is not here."""
    from pathlib import Path

    from .new_recipe import HUB_RE
    from .sources.inspect import open_any

    m = None if Path(ref).expanduser().exists() else HUB_RE.fullmatch(ref)
    try:
        return open_any(m.group("repo"), m.group("rev"), m.group("file"))[0] if m else open_any(ref)[0]
    except ForgeError:
        return None


def _tie(source) -> str:
    keys = set(source.keys()) | set(source.unread)
    untied = any(k.endswith("lm_head.weight") for k in keys)
    cfg = source.config or {}
    stated = cfg.get("text_config", cfg).get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
    fact = "untied (lm_head.weight present)" if untied else "tied (no lm_head.weight: logits through embed_tokens)"
    if stated is not None and bool(stated) == untied:
        fact += f"; but config.json says tie_word_embeddings: {str(stated).lower()} (validation will refuse it)"
    return fact


def _head(body, mtp_ref: str) -> str:
    from .sources.gguf_file import GGUFSource
    from .sources.inspect import mtp_summary

    source = body if mtp_ref == "body" else _open(mtp_ref)
    if source is None:
        return "head: not inspected (not on this machine)"
    summary = mtp_summary(source)
    where = "the body's own mtp.* keys" if mtp_ref == "body" else mtp_ref
    if not summary.get("tensors"):
        raise ForgeError(f"--mtp {mtp_ref}: no MTP head tensors there; name a GGUF with the "
                         f"blk.N.nextn block, or graft one: --mtp <the base model's repo or dir with mtp.* keys>")
    if isinstance(source, GGUFSource):
        types = summary.get("stored_as", [])
        where = f"GGUF block blk.{summary['block']} ({summary['tensors']} tensors)"
    else:
        head = [k for k in source.tensors if k.startswith("mtp.")]
        types = sorted({source.tensors[k].dtype for k in head})
        where = f"{where}: mtp.* ({summary['tensors']} tensors)"
    quantized = [t for t in types if t not in EXACT_TYPES]
    storage = (f"stored quantized ({', '.join(quantized)}): built dequantized, not original precision"
               if quantized else f"stored {', '.join(types)}")
    return f"head: {where}, {storage}"


def detect(body_ref: str, mtp_ref: str) -> Detected:
    """The base recipe for these sources, and one line per fact that decided it."""
    body = _open(body_ref)
    if body is None:
        return Detected(DEFAULT_BASE, [f"body: not inspected (not on this machine): base {DEFAULT_BASE}"])
    model_type = (body.config or {}).get("model_type")
    if model_type not in BASES:
        known = ", ".join(sorted(BASES))
        raise ForgeError(f"--body {body_ref}: config.json model_type '{model_type}' has no base recipe "
                         f"(known: {known}); pass --base to name one")
    base, kind = BASES[model_type]
    try:
        find_recipe(base)
    except RecipeError:
        raise ForgeError(f"--body {body_ref}: a {kind.split(',')[0]} Qwen3.5 (model_type {model_type}) needs "
                         f"the base recipe '{base}', which is not installed here; pass --base") from None
    facts = [f"body: {kind} -> base {base}", f"embeddings: {_tie(body)}", _head(body, mtp_ref)]
    return Detected(base, facts)


def pick_base(body_ref: str, mtp_ref: str) -> str:
    """`detect`, printing one `detected ...` line per fact; returns the base recipe name."""
    detected = detect(body_ref, mtp_ref)
    for fact in detected.facts:
        print(f"detected {fact}")
    return detected.base
