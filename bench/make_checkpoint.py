"""Generate a random-weight Qwen3.5 checkpoint (HF layout) plus a matching MTP-head GGUF.

    python bench/make_checkpoint.py --out /tmp/forgekit-bench/ckpt --layers 2 4 8   # real 9B widths
    python bench/make_checkpoint.py --out /tmp/tiny --layers 4 --preset tiny      # seconds

Writes, under --out:
    pool/                    one safetensors file per layer + one for embed/lm_head/norm
    body-<N>L/               an HF Qwen3_5ForConditionalGeneration directory with N layers:
                             hard links to the pool files it needs, its index, config.json
                             and tokenizer files (so 2/4/8-layer bodies cost the 8-layer disk)
    head-<N>L-MTP-BF16.gguf  llama.cpp qwen35 layout, only the 15 blk.N.* MTP tensors
                             (block_count = N + 1, nextn_predict_layers = 1), norms F32, matrices BF16
    head-<N>L-alt-MTP-BF16.gguf  the same with other random values (a changed head source)

The 9B preset uses Qwen3.5-9B's widths (hidden 4096, intermediate 12288, vocab 248320,
16/4 heads x 256, linear attention 16/32 heads x 128, conv 4): 4 layers are ~5.9 GiB bf16.
Memory stays bounded: tensors are produced and written in 64 MiB chunks. Values are
random bf16 (a random block re-randomized per chunk in sign and mantissa); the HF
conventions hold (zero-centred decoder norms, conv1d [C, 1, K], A_log float32).
Tokenizer files come from --tokenizer-from (default: the tiny test fixture's body) or,
if absent, a minimal word-level tokenizer is written; mlx_lm.convert needs one, its vocab
need not match for conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 64 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")

PRESETS = {
    "9b": dict(hidden_size=4096, intermediate_size=12288, vocab_size=248320, num_attention_heads=16,
               num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
               linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
               mrope_section=[11, 11, 10]),
    "tiny": dict(hidden_size=64, intermediate_size=128, vocab_size=256, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                 mrope_section=[2, 1, 1]),
}


def text_config(preset: str, layers: int) -> dict:
    p = dict(PRESETS[preset])
    mrope = p.pop("mrope_section")
    return {
        "model_type": "qwen3_5_text", **p, "num_hidden_layers": layers, "full_attention_interval": 4,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        "attn_output_gate": True, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": mrope, "mrope_interleaved": True},
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "mamba_ssm_dtype": "float32",
        "use_cache": True, "eos_token_id": 0, "dtype": "bfloat16",
    }


def full_config(preset: str, layers: int) -> dict:
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "text_config": text_config(preset, layers), "tie_word_embeddings": False}


def hf_tensors(preset: str, layers: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, dtype) from mlx-lm's own module tree (lazy: nothing is allocated)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.qwen3_5 import Model, ModelArgs

    model = Model(ModelArgs.from_dict(full_config(preset, layers)))
    out = {}
    for path, v in tree_flatten(model.parameters()):
        name = ("model.language_model." + path[len("language_model.model."):]
                if path.startswith("language_model.model.") else path.replace("language_model.", "", 1))
        shape = tuple(v.shape)
        if path.endswith("conv1d.weight"):
            shape = (shape[0], shape[2], shape[1])  # mlx [C, K, 1] -> HF [C, 1, K]
        out[name] = (shape, "F32" if path.endswith("A_log") else "BF16")
    return out


class Random:
    """Fast random bf16 bits: one random block, re-randomized per chunk in sign and low mantissa."""

    def __init__(self, seed: int, scale: float = 0.02):
        self.rng = np.random.default_rng(seed)
        block = (self.rng.standard_normal(CHUNK // 2, dtype=np.float32) * scale)
        self.block = (block.view(np.uint32) >> 16).astype(np.uint16)

    def bf16(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.uint16)
        for i in range(0, n, len(self.block)):
            m = min(len(self.block), n - i)
            mask = np.uint16(self.rng.integers(0, 2**16) & 0x807F)
            start = int(self.rng.integers(0, len(self.block) - m + 1))
            np.bitwise_xor(self.block[start:start + m], mask, out=out[i:i + m])
        return out


def tensor_bytes(name: str, shape: tuple[int, ...], dtype: str, rnd: Random):
    """Yield the tensor's bytes in chunks (bounded memory)."""
    n = int(np.prod(shape))
    if dtype == "F32":  # A_log
        yield np.log(rnd.rng.uniform(1, 16, n)).astype(np.float32).tobytes()
        return
    if len(shape) == 1:
        if name.endswith("linear_attn.norm.weight"):
            vals = np.ones(n, np.float32)           # gated norm: absolute
        elif name.endswith("dt_bias"):
            vals = rnd.rng.uniform(0.5, 1.5, n).astype(np.float32)
        else:
            vals = rnd.rng.normal(0.0, 0.05, n).astype(np.float32)  # zero-centred decoder norms
        yield (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        return
    per = max(1, CHUNK // 2)
    for i in range(0, n, per):
        yield rnd.bf16(min(per, n - i)).tobytes()


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]], rnd: Random) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dtype) in tensors.items():
        n = int(np.prod(shape)) * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, dtype) in tensors.items():
            for chunk in tensor_bytes(name, shape, dtype, rnd):
                f.write(chunk)
    os.replace(tmp, path)


def pool_file(name: str) -> str:
    parts = name.split(".")
    if "layers" in parts:
        return f"model-layer-{int(parts[parts.index('layers') + 1]):03d}.safetensors"
    return "model-embed.safetensors"


def write_pool(pool: Path, preset: str, layers: int, seed: int) -> dict[str, str]:
    """Write (or reuse) the pool files for `layers` layers; returns tensor name -> pool file."""
    pool.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(preset, layers)
    by_file: dict[str, dict] = {}
    for name, spec in tensors.items():
        by_file.setdefault(pool_file(name), {})[name] = spec
    stamp = pool / "pool.json"
    done = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if done.get("preset") not in (None, preset):
        raise SystemExit(f"{pool} holds preset {done['preset']}, not {preset}: use another --out")
    files_done = set(done.get("files", []))
    for i, (file, specs) in enumerate(sorted(by_file.items())):
        if file in files_done and (pool / file).is_file():
            continue
        t = time.time()
        write_safetensors(pool / file, dict(sorted(specs.items())), Random(seed + i * 7919 + len(file)))
        files_done.add(file)
        stamp.write_text(json.dumps({"preset": preset, "files": sorted(files_done)}))
        print(f"  wrote {file} ({(pool / file).stat().st_size / 2**30:.2f} GiB) in {time.time() - t:.1f}s", flush=True)
    return {name: pool_file(name) for name in tensors}


def write_tokenizer(body: Path, source: Path | None) -> None:
    if source is not None and (source / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, body / name)
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, 128)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(body / "tokenizer.json"))
    (body / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
        "model_max_length": 262144}))


def write_body(out: Path, preset: str, layers: int, names: dict[str, str], tokenizer: Path | None) -> Path:
    body = out / f"body-{layers}L"
    tmp = out / f".body-{layers}L.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = sorted(set(names.values()))
    for f in files:
        os.link(out / "pool" / f, tmp / f)
    total = 0
    for f in files:
        total += (tmp / f).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(names.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(full_config(preset, layers), indent=2))
    write_tokenizer(tmp, tokenizer)
    shutil.rmtree(body, ignore_errors=True)
    os.replace(tmp, body)
    return body


def head_table() -> dict[str, str]:
    """GGUF name (after blk.N.) -> mtp.* name, read from the base recipe's `mtp` remap table
    (the recipe is where this table lives; the benchmark writes the GGUF it maps)."""
    from forgekit.recipe import load_recipe

    table = {}
    for rule in load_recipe("qwen3.5-dense-mtp").remap["mtp"]:
        if rule.drop:
            continue
        gguf_name = rule.match.removeprefix(r"blk\.{mtp_block}\.").removesuffix(r"\.weight").replace("\\.", ".")
        table[gguf_name] = rule.to.removeprefix("mtp.").removesuffix(".weight")
    return table


def head_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    p = PRESETS[preset]
    H, I, hd, nh, nkv = p["hidden_size"], p["intermediate_size"], p["head_dim"], p["num_attention_heads"], \
        p["num_key_value_heads"]
    return {"fc": (H, 2 * H), "pre_fc_norm_embedding": (H,), "pre_fc_norm_hidden": (H,), "norm": (H,),
            "layers.0.input_layernorm": (H,), "layers.0.post_attention_layernorm": (H,),
            "layers.0.self_attn.q_proj": (2 * nh * hd, H), "layers.0.self_attn.k_proj": (nkv * hd, H),
            "layers.0.self_attn.v_proj": (nkv * hd, H), "layers.0.self_attn.o_proj": (H, nh * hd),
            "layers.0.self_attn.q_norm": (hd,), "layers.0.self_attn.k_norm": (hd,),
            "layers.0.mlp.gate_proj": (I, H), "layers.0.mlp.up_proj": (I, H), "layers.0.mlp.down_proj": (H, I)}


def write_head_gguf(path: Path, preset: str, layers: int, seed: int) -> None:
    """The MTP block of a llama.cpp qwen35 GGUF, streamed tensor by tensor."""
    import gguf

    p = PRESETS[preset]
    shapes = head_shapes(preset)
    block = layers
    rnd = Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen35")
    w.add_type("model")
    w.add_name(f"bench-{preset}-{layers}L-MTP")
    w.add_block_count(layers + 1)
    w.add_context_length(262144)
    w.add_embedding_length(p["hidden_size"])
    w.add_feed_forward_length(p["intermediate_size"])
    w.add_head_count(p["num_attention_heads"])
    w.add_head_count_kv(p["num_key_value_heads"])
    w.add_key_length(p["head_dim"])
    w.add_value_length(p["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(p["vocab_size"])
    w.add_full_attention_interval(4)
    w.add_nextn_predict_layers(1)
    w.add_file_type(32)
    w.add_quantization_version(2)
    specs = []
    for gname, mname in head_table().items():
        shape = shapes[mname]
        n = int(np.prod(shape))
        if len(shape) == 1:
            w.add_tensor_info(f"blk.{block}.{gname}.weight", shape, np.dtype(np.float32), n * 4)
        else:
            w.add_tensor_info(f"blk.{block}.{gname}.weight", shape, np.dtype(np.uint16), n * 2,
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        specs.append((gname, shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, shape in specs:
        n = int(np.prod(shape))
        if len(shape) == 1:  # GGUF norms are absolute (+1), F32, exactly representable in bf16
            vals = 1.0 + rnd.rng.normal(0, 0.05, n).astype(np.float32)
            data = ((vals.view(np.uint32) >> 16) << 16).view(np.float32).reshape(shape)
            if gname in ("attn_q_norm", "attn_k_norm"):
                data = data + np.float32(0.75)  # ~1.8 like a real checkpoint's q/k norms
        else:
            data = rnd.bf16(n).reshape(shape)
        w.write_tensor_data(data)
    w.close()
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=[4])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="9b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=ROOT / "tests" / "fixtures" / "tiny" / "body")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    start = time.time()
    names = write_pool(out / "pool", args.preset, max(args.layers), args.seed)
    for layers in sorted(args.layers):
        subset = {n: f for n, f in names.items()
                  if f == "model-embed.safetensors" or int(f.split("-")[2].split(".")[0]) < layers}
        body = write_body(out, args.preset, layers, subset, args.tokenizer_from)
        head = out / f"head-{layers}L-MTP-BF16.gguf"
        if not head.is_file():
            write_head_gguf(head, args.preset, layers, args.seed + 1000 + layers)
        alt = out / f"head-{layers}L-alt-MTP-BF16.gguf"   # another head: a "head source changed" rebuild
        if not alt.is_file():
            write_head_gguf(alt, args.preset, layers, args.seed + 2000 + layers)
        size = sum(p.stat().st_size for p in body.glob("*.safetensors"))
        print(f"{body}: {layers} layers, {size / 2**30:.2f} GiB bf16; head {head.name} "
              f"({head.stat().st_size / 2**20:.0f} MiB)", flush=True)
    print(f"done in {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
