"""Generate a random-weight Qwen3.5 MoE checkpoint with the real 35B-A3B widths (HF layout) plus
its head as HF safetensors with fused experts (the checkpoint's own 19 `mtp.*` keys).

    python bench/make_moe_checkpoint.py --out /tmp/forgekit-moe-bench/ckpt --layers 2

35B-A3B widths: hidden 2048, 256 experts (top-8), expert and shared-expert ffn 512, heads 16/2 x
256, linear attention 16/32 heads x 128, conv 4, vocab 248320. Per layer the fused experts are
`mlp.experts.gate_up_proj` [256, 1024, 2048] and `down_proj` [256, 2048, 512] (1.5 GiB bf16).
Writes under --out: `body-<N>L/` (one safetensors file per layer + one for embed/lm_head/norm,
index, config.json, tokenizer files) and `head-<N>L.safetensors`. Memory stays bounded: tensors
are produced and written in 64 MiB chunks (bench/make_checkpoint.py's writer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoint as dense  # noqa: E402  (the chunked writer and random source)

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = dict(hidden_size=2048, vocab_size=248320, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
              linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
              linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8,
              moe_intermediate_size=512, shared_expert_intermediate_size=512)


def full_config(layers: int) -> dict:
    text = {
        "model_type": "qwen3_5_moe_text", **WIDTHS, "num_hidden_layers": layers, "full_attention_interval": 4,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        "attn_output_gate": True, "attention_bias": False, "attention_dropout": 0.0,
        "router_aux_loss_coef": 0.001, "output_router_logits": False,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "mamba_ssm_dtype": "float32",
        "use_cache": True, "eos_token_id": 0, "dtype": "bfloat16",
    }
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text, "tie_word_embeddings": False}


def hf_tensors(layers: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, dtype), from mlx-lm's module tree (lazy: nothing is allocated), with the
    switch_mlp experts written back in HF's fused layout."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.qwen3_5_moe import Model, ModelArgs

    out = {}
    model = Model(ModelArgs.from_dict(full_config(layers)))
    for path, v in tree_flatten(model.parameters()):
        name = ("model.language_model." + path[len("language_model.model."):]
                if path.startswith("language_model.model.") else path.replace("language_model.", "", 1))
        shape = tuple(v.shape)
        if path.endswith("conv1d.weight"):
            shape = (shape[0], shape[2], shape[1])
        if ".switch_mlp.up_proj" in name:
            continue
        if ".switch_mlp.gate_proj" in name:
            name, shape = name.replace("switch_mlp.gate_proj.weight", "experts.gate_up_proj"), (shape[0], 2 * shape[1], shape[2])
        elif ".switch_mlp.down_proj" in name:
            name = name.replace("switch_mlp.down_proj.weight", "experts.down_proj")
        out[name] = (shape, "F32" if path.endswith("A_log") else "BF16")
    return out


def head_tensors() -> dict[str, tuple[tuple[int, ...], str]]:
    """The 19 fused `mtp.*` keys with 35B-A3B shapes."""
    H, E, I, hd = WIDTHS["hidden_size"], WIDTHS["num_experts"], WIDTHS["moe_intermediate_size"], WIDTHS["head_dim"]
    nh, nkv, Is = WIDTHS["num_attention_heads"], WIDTHS["num_key_value_heads"], WIDTHS["shared_expert_intermediate_size"]
    l0 = "mtp.layers.0."
    shapes = {"mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,), "mtp.pre_fc_norm_embedding.weight": (H,),
              "mtp.pre_fc_norm_hidden.weight": (H,), l0 + "input_layernorm.weight": (H,),
              l0 + "post_attention_layernorm.weight": (H,), l0 + "self_attn.q_proj.weight": (2 * nh * hd, H),
              l0 + "self_attn.k_proj.weight": (nkv * hd, H), l0 + "self_attn.v_proj.weight": (nkv * hd, H),
              l0 + "self_attn.o_proj.weight": (H, nh * hd), l0 + "self_attn.q_norm.weight": (hd,),
              l0 + "self_attn.k_norm.weight": (hd,), l0 + "mlp.gate.weight": (E, H),
              l0 + "mlp.experts.gate_up_proj": (E, 2 * I, H), l0 + "mlp.experts.down_proj": (E, H, I),
              l0 + "mlp.shared_expert.gate_proj.weight": (Is, H), l0 + "mlp.shared_expert.up_proj.weight": (Is, H),
              l0 + "mlp.shared_expert.down_proj.weight": (H, Is), l0 + "mlp.shared_expert_gate.weight": (1, H)}
    return {k: (v, "BF16") for k, v in sorted(shapes.items())}


def write_body(out: Path, layers: int, seed: int) -> Path:
    body = out / f"body-{layers}L"
    if (body / "config.json").is_file():
        return body
    tmp = out / f".body-{layers}L.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_file: dict[str, dict] = {}
    for name, spec in hf_tensors(layers).items():
        by_file.setdefault(dense.pool_file(name), {})[name] = spec
    weight_map, total = {}, 0
    for i, (file, specs) in enumerate(sorted(by_file.items())):
        t = time.time()
        dense.write_safetensors(tmp / file, dict(sorted(specs.items())), dense.Random(seed + 7919 * i))
        weight_map.update({n: file for n in specs})
        total += (tmp / file).stat().st_size
        print(f"  wrote {file} ({(tmp / file).stat().st_size / 2**30:.2f} GiB) in {time.time() - t:.1f}s", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (tmp / "config.json").write_text(json.dumps(full_config(layers), indent=2))
    dense.write_tokenizer(tmp, ROOT / "tests" / "fixtures" / "tiny" / "body")
    shutil.rmtree(body, ignore_errors=True)
    tmp.rename(body)
    return body


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    head = out / "head.safetensors"
    if not head.is_file():
        dense.write_safetensors(head, head_tensors(), dense.Random(args.seed + 1000))
    for layers in sorted(args.layers):
        body = write_body(out, layers, args.seed)
        size = sum(p.stat().st_size for p in body.glob("*.safetensors"))
        print(f"{body}: {layers} layers, {size / 2**30:.2f} GiB bf16; head {head.stat().st_size / 2**30:.2f} GiB",
              flush=True)
    print(f"done in {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
