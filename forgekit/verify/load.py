"""load: mlx-lm loads the body (and its tokenizer); the head loads with strict=True into
forgekit's MTPHeadModel (mlx-lm's own DecoderLayer); a forward pass on fixed tokens gives
finite logits for the trunk and for a depth-1 draft.

Also the loading helpers the parity and mtp steps share (`load_body`, `load_head`,
`trunk`, `prompt_tokens`). A `BodyCache` passed by the caller keeps the last loaded body,
so the steps of one build load a large model once.

params: tokens (fixed token ids, at least 2; default 2 deterministic ids), compute_dtype (float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..dtypes import BY_NAME
from ..mtp_head import MTPHeadModel, text_args
from ..verify_params import LoadParams
from .cpu_linear import tied_head

def _signature(directory: Path) -> tuple:
    """Identity of a model directory's current contents (path + stat of its files)."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return (str(directory.resolve()),) + tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


COMPUTE_DTYPES = ("float32", "bfloat16")   # what the probes may run the built model in


def compute_dtype(params):
    """The float dtype the probes run the built model in (params `compute_dtype`).

    Default float32: the stored weights are unchanged (packed 4-bit values; bf16 scales,
    biases and norms widen exactly to float32), only activations are wider than on an
    Apple GPU. mlx's CPU quantized matmul is many times slower in bf16 (bench/probe_cost.py).
    """
    return BY_NAME[params.compute_dtype].mlx()


def cast_floats(module, dtype) -> None:
    """Cast a module's bf16/f16 parameters to `dtype` (float32 A_log and packed ints untouched)."""
    from mlx.utils import tree_map

    if dtype != mx.bfloat16:
        module.update(tree_map(lambda v: v.astype(dtype) if v.dtype in (mx.bfloat16, mx.float16) else v,
                               module.parameters()))
        mx.eval(module.parameters())


class BodyCache:
    """The last body loaded by `load`, keyed by the directory's contents and the dtype."""

    def __init__(self):
        self.key = None
        self.value = None
        self.passes: dict = {}          # trunk_pass.py: forwards of this body, by token ids
        self.source_digests: dict | None = None   # role -> {file: digest}, set by a build (reference_cache.py)

    def load(self, directory: Path, dtype=mx.bfloat16):
        """(model, tokenizer) through mlx-lm's own loader, strict, floats cast to `dtype`."""
        from mlx_lm import load

        key = (_signature(Path(directory)), str(dtype))
        if self.key != key:
            self.clear()
            model, tokenizer = load(str(directory))
            cast_floats(model, dtype)
            self.key, self.value = key, (model, tokenizer)
        return self.value

    def clear(self) -> None:
        self.key = self.value = None
        self.passes = {}


def head_file(directory: Path, config: dict) -> Path:
    return Path(directory) / config.get("mlx_lm_extra_tensors", {}).get("mtp_file", "mtp.safetensors")


def contract(config: dict) -> dict:
    """The MTP draft contract the config declares (the runtime's defaults otherwise)."""
    declared = config.get("mtplx_mtp_contract") or {}
    return {"base_hidden_variant": declared.get("base_hidden_variant", "post_norm"),
            "hidden_variant": declared.get("hidden_variant", "post_norm"),
            "concat_order": declared.get("concat_order", "embedding_hidden")}


def load_head(directory: Path, config: dict, dtype=mx.bfloat16) -> MTPHeadModel:
    """The head file loaded strictly (exact keys and shapes) with the config's concat order. A head
    that runs is built from mlx-lm's own modules (imported here first; see mlx_models.py)."""
    import mlx_lm  # noqa: F401

    model = MTPHeadModel(text_args(config), concat_order=contract(config)["concat_order"])
    quantized = {p: e for p, e in (config.get("quantization") or {}).items() if p.startswith("mtp.") and isinstance(e, dict)}
    if quantized:   # a prequantized head: the modules config.json names take its packed weights
        nn.quantize(model, class_predicate=lambda path, _: quantized.get(path, False))
    model.load_weights(list(mx.load(str(head_file(directory, config))).items()), strict=True)
    model.eval()
    cast_floats(model, dtype)
    mx.eval(model.parameters())
    return model


def trunk(model):
    """(decoder returning post-norm hidden, embedding module, lm_head callable) of an mlx-lm model."""
    text = getattr(model, "language_model", model)
    embed = text.model.embed_tokens
    lm_head = tied_head(embed) if text.args.tie_word_embeddings else text.lm_head
    return text.model, embed, lm_head


def prompt_tokens(prompts: list, tokenizer, max_tokens: int | None = None) -> list[list[int]]:
    """Prompts as token id lists: a list of ints is taken as is, a string is tokenized."""
    out = []
    for p in prompts:
        ids = list(p) if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=False)
        if not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"prompt {p!r} gives no token ids")
        out.append(ids[:max_tokens] if max_tokens else ids)
    return out


DEFAULT_TOKENS = 2   # position 1 attends to position 0 and gives the head one draft; every weight
                     # of the body is multiplied for each token, so more tokens prove nothing more
                     # about finiteness (a 9B costs ~6 s a token in mlx's CPU kernel)


def runtime_forward(model, head, ids: list[int]) -> tuple[mx.array, mx.array]:
    """Trunk logits [1, T, V] and depth-1 draft logits [1, T-1, V] through mlx's own kernels.

    The parity and mtp steps run their linears in numpy on a CPU (cpu_linear.py); this is the
    one forward of a verify that runs the layers as the runtime does (mlx's quantized matmul).
    """
    tokens = mx.array([ids])
    decoder, embed, lm_head = trunk(model)
    hidden = decoder(tokens)
    logits = lm_head(hidden)
    draft_logits = lm_head(head.norm(head(embed(tokens[:, 1:]), hidden[:, :-1])))
    mx.eval(logits, draft_logits)
    return logits, draft_logits


def run(directory: Path, plan, params: LoadParams, bodies: BodyCache | None = None) -> dict:
    config = json.loads((directory / "config.json").read_text())
    try:
        dtype = compute_dtype(params)
        model, tokenizer = (bodies or BodyCache()).load(directory, dtype)
    except Exception as exc:  # mlx-lm's own words are the cause
        return {"passed": False, "cause": f"mlx-lm cannot load the body: {type(exc).__name__}: {exc}"}
    try:
        head = load_head(directory, config, dtype)
    except Exception as exc:
        return {"passed": False, "cause": f"{head_file(directory, config).name} does not load strictly into "
                                          f"the MTP module tree: {exc}"}
    vocab = text_args(config).vocab_size
    ids = list(params.tokens or ()) or [(7 * i + 3) % vocab for i in range(DEFAULT_TOKENS)]
    logits, draft_logits = runtime_forward(model, head.mtp, ids)
    if logits.shape[-1] != vocab:
        return {"passed": False, "cause": f"trunk logits have {logits.shape[-1]} columns, config vocab is {vocab}"}
    for name, value in (("trunk", logits), ("head", draft_logits)):
        if not bool(mx.all(mx.isfinite(value))):
            return {"passed": False, "cause": f"{name} logits on fixed tokens are not finite (NaN/inf)"}
    return {"passed": True, "summary": {"tokens": len(ids), "vocab": vocab,
                                        "compute_dtype": str(dtype).split(".")[-1],
                                        "trunk_logit_absmax": round(float(mx.max(mx.abs(logits))), 3),
                                        "head_logit_absmax": round(float(mx.max(mx.abs(draft_logits))), 3)}}
