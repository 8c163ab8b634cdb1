"""`forgekit inspect`: a pure function returning a plain dict (the CLI prints it as a
table or JSON).

inspect: a safetensors file or model directory, a GGUF file, or an HF repo id found in
huggingface_hub's local cache (never downloads). Lists tensors (name, shape, dtype or
GGML type, bytes) and metadata, says where the MTP head is, and with `norms=True` reads
the 1-D norm gains to tell zero-centred (HF) from absolute (MLX/GGUF) conventions.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..dtypes import BY_GGML
from ..errors import SourceError
from .base import TensorSource
from .gguf_file import GGUFSource
from .safetensors_dir import SafetensorsSource, weight_files

REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# MTPLX's head detector: zero-centred iff max(mean q/k norm) < 1.25 and
# min(mean input/post/pre_fc norm) < 0.5.
QK_LIMIT, OTHER_LIMIT = 1.25, 0.5


# ---------------------------------------------------------------- opening


def _from_hub_cache(repo: str, revision: str | None, file: str | None) -> Path:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if file:
        hit = try_to_load_from_cache(repo, file, revision=revision)
        if isinstance(hit, str):
            return Path(hit)
        raise SourceError(f"{repo}: '{file}' is not in the local Hugging Face cache "
                          f"(inspect never downloads; fetch it with `hf download {repo} {file}`)")
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision, local_files_only=True))
    except Exception:
        raise SourceError(f"{repo}: not in the local Hugging Face cache at revision {revision or 'main'} "
                          f"(inspect never downloads)") from None


def open_any(ref: str, revision: str | None = None, file: str | None = None) -> tuple[TensorSource, str]:
    """A path or a cached repo id -> (open source, description of where it is)."""
    path = Path(ref).expanduser()
    if path.exists():
        where = str(path.resolve())
    elif REPO_RE.fullmatch(ref):
        path = _from_hub_cache(ref, revision, file)
        where = f"{ref}@{revision or 'main'} (cache: {path})"
    else:
        raise SourceError(f"{ref}: neither an existing file or directory nor an HF repo id (org/name)")
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource("inspect", path), where
    if path.is_file() and path.suffix == ".safetensors":
        return SafetensorsSource("inspect", path), where
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        has_st = any(path.glob("*.safetensors"))
        if not has_st and len(ggufs) == 1:
            return GGUFSource("inspect", path / ggufs[0]), where + f" file {ggufs[0]}"
        if not has_st and ggufs:
            raise SourceError(f"{path}: holds {len(ggufs)} GGUF files ({', '.join(ggufs[:4])}); name one (--file)")
        return _open_dir(path), where
    raise SourceError(f"{path}: not a .gguf file, a .safetensors file or a model directory")


def _open_dir(path: Path) -> SafetensorsSource:
    """A model dir; shards the index lists but that are absent (partial download) count as unread."""
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise SourceError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        present = sorted({f for f in weight_map.values() if (path / f).is_file()})
        unread = sorted(n for n, f in weight_map.items() if f not in present)
        return SafetensorsSource("inspect", path, only_files=present, unread=unread)
    weight_files(path)  # raises a clear error when there are none
    return SafetensorsSource("inspect", path)


# ---------------------------------------------------------------- inspect


def _short_value(v):
    if isinstance(v, list) and len(v) > 8:
        return f"[{len(v)} items: {', '.join(map(str, v[:4]))}, ...]"
    return v


def mtp_summary(source: TensorSource) -> dict:
    if isinstance(source, GGUFSource):
        try:
            block = source.mtp_block()
        except SourceError as exc:
            return {"declared": False, "note": str(exc).split(": ", 1)[-1]}
        names = [k for k in source.keys() if k.startswith(f"blk.{block}.")]
        names += [k for k in source.unread if k.startswith(f"blk.{block}.")]
        types = sorted({source.tensors[k].stored_as for k in names if k in source.tensors})
        out = {"declared": True, "block": block, "tensors": len(names), "stored_as": types}
        if not names:
            out["note"] = f"declares an MTP head (block {block}) but ships no blk.{block}.* tensors"
        elif any(t not in BY_GGML for t in types):
            out["note"] = "head stored quantized: a head built from it is dequantized, not original precision"
        return out
    names = [k for k in source.keys() + list(source.unread) if k.startswith("mtp.")]
    cfg = (source.config or {}).get("text_config", source.config or {})
    out = {"declared": bool(cfg.get("mtp_num_hidden_layers")), "tensors": len(names),
           "mtp_num_hidden_layers": cfg.get("mtp_num_hidden_layers")}
    if out["declared"] and not names:
        out["note"] = "config declares an MTP head but the weights carry no mtp.* keys (graft a head from elsewhere)"
    return out


def _mean(source: TensorSource, key: str) -> float:
    return float(np.asarray(source.read(key).astype(_f32())).mean())


def _f32():
    import mlx.core as mx

    return mx.float32


def norm_report(source: TensorSource) -> dict:
    """Means of the 1-D norm gains, and what convention they look like (reads only those)."""
    norms = {k: i for k, i in source.tensors.items()
             if len(i.shape) == 1 and re.search(r"norm(?:_embedding|_hidden)?\.weight$", k)}
    means = {k: round(_mean(source, k), 4) for k in sorted(norms)}
    report: dict = {"means": means}
    if isinstance(source, GGUFSource):
        try:
            block = source.mtp_block()
        except SourceError:
            block = None
        head = {k: v for k, v in means.items() if block is not None and k.startswith(f"blk.{block}.")}
        qk = [v for k, v in head.items() if re.search(r"attn_[qk]_norm", k)]
        other = [v for k, v in head.items() if re.search(r"attn_norm|post_attention_norm|nextn\.[eh]norm", k)]
        final = means.get("output_norm.weight")
    else:
        head = {k: v for k, v in means.items() if k.startswith("mtp.")}
        qk = [v for k, v in head.items() if re.search(r"self_attn\.[qk]_norm", k)]
        other = [v for k, v in head.items() if re.search(r"input_layernorm|post_attention_layernorm|pre_fc_norm", k)]
        final = next((means[k] for k in ("model.language_model.norm.weight", "model.norm.weight",
                                         "language_model.model.norm.weight") if k in means), None)
    if qk and other:
        zero = max(qk) < QK_LIMIT and min(other) < OTHER_LIMIT
        report["head"] = {"max_qk_norm_mean": max(qk), "min_input_post_prefc_mean": min(other),
                          "convention": "zero-centred (HF: applied as 1+w)" if zero else "absolute (MLX/GGUF)"}
    if final is not None:
        report["final_norm_mean"] = final
        report["final_norm_convention"] = "zero-centred (HF)" if abs(final) < 0.5 else "absolute (MLX/GGUF)"
    return report


def inspect(ref: str, revision: str | None = None, file: str | None = None, norms: bool = False,
            stats: str | None = None) -> dict:
    source, where = open_any(ref, revision, file)
    fmt = "gguf" if isinstance(source, GGUFSource) else "safetensors"
    tensors = [{"name": k, "shape": list(i.shape), "dtype": i.dtype, "stored_as": i.stored_as,
                "bytes": i.nbytes, "file": Path(i.file).name} for k, i in source.tensors.items()]
    if fmt == "gguf":
        tensors.sort(key=lambda t: _natural(t["name"]))
    out = {"source": where, "format": fmt, "files": [str(f) for f in source.files],
           "tensor_count": len(tensors), "total_bytes": sum(t["bytes"] for t in tensors),
           "metadata": {k: _short_value(v) for k, v in source.metadata.items()} if fmt == "gguf" else _config_summary(source),
           "mtp": mtp_summary(source), "tensors": tensors, "unread": list(source.unread)}
    if norms:
        out["norms"] = norm_report(source)
    if stats:
        try:
            pattern = re.compile(stats)
        except re.error as exc:
            raise SourceError(f"--stats: bad regular expression {stats!r}: {exc}") from None
        out["stats"] = {}
        for t in tensors:
            if pattern.fullmatch(t["name"]):
                a = np.asarray(source.read(t["name"]).astype(_f32()))
                out["stats"][t["name"]] = {"mean": float(a.mean()), "std": float(a.std()),
                                           "min": float(a.min()), "max": float(a.max())}
    return out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _config_summary(source: TensorSource) -> dict:
    cfg = source.config or {}
    text = cfg.get("text_config", cfg)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "full_attention_interval", "mtp_num_hidden_layers",
            "tie_word_embeddings")
    out = {"architectures": cfg.get("architectures"), "model_type": cfg.get("model_type")}
    out.update({f"text_config.{k}" if "text_config" in cfg else k: text.get(k) for k in keys[1:] if k in text})
    out["vision_config"] = "present" if "vision_config" in cfg else "absent"
    return {k: v for k, v in out.items() if v is not None}
