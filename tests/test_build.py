"""Spine acceptance: the demo recipe builds an MTPLX-ready MLX directory that mlx-lm loads,
that matches mlx_lm.convert bit for bit, and whose head equals the GGUF's."""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from conftest import BODY, HEAD_GGUF, heldout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tensors(path) -> dict[str, mx.array]:
    return mx.load(str(path))


def trunk_tensors(directory) -> dict[str, mx.array]:
    out = {}
    for f in sorted(directory.glob("model*.safetensors")):
        out.update(tensors(f))
    return out


def test_demo_loads_with_mlx_lm_and_agrees_with_bf16_source(built_demo):
    from mlx_lm import load

    model, _ = load(str(built_demo))
    source, _ = load(str(BODY))  # mlx-lm's own reading of the bf16 HF body
    agree = total = 0
    for seq in heldout():
        tokens = mx.array([seq])
        logits = model(tokens)
        assert bool(mx.all(mx.isfinite(logits)))
        a = mx.argmax(logits, axis=-1)
        b = mx.argmax(source(tokens), axis=-1)
        agree += int(mx.sum(a == b))
        total += a.size
    assert agree / total >= 0.90, f"greedy agreement {agree / total:.3f}"


@pytest.mark.slow
def test_body_is_bit_identical_to_mlx_lm_convert(built_demo, mlx_lm_converted):
    ref = mlx_lm_converted(BODY)   # mlx_lm convert -q --q-bits 4 --q-group-size 64
    ours, theirs = trunk_tensors(built_demo), trunk_tensors(ref)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert ours[k].shape == theirs[k].shape, k
        assert bytes(memoryview(ours[k])) == bytes(memoryview(theirs[k])), f"{k} differs from mlx_lm.convert"
    ref_cfg = json.loads((ref / "config.json").read_text())
    our_cfg = json.loads((built_demo / "config.json").read_text())
    for key in ("bits", "group_size", "mode"):
        assert our_cfg["quantization"][key] == ref_cfg["quantization"][key]


def _gguf_head() -> tuple[dict[str, np.ndarray], dict[str, str], int]:
    """The GGUF's MTP block read directly with gguf-py (not through forgekit)."""
    reader = gguf.GGUFReader(HEAD_GGUF)
    count = int(reader.fields["qwen35.block_count"].parts[-1][0])
    nextn = int(reader.fields["qwen35.nextn_predict_layers"].parts[-1][0])
    n = count - nextn
    data, types = {}, {}
    for t in reader.tensors:
        if t.name.startswith(f"blk.{n}."):
            data[t.name] = np.asarray(t.data)
            types[t.name] = t.tensor_type.name
    return data, types, n


# An independent statement of the GGUF -> mtp.* head names (on purpose: the test checks the
# base recipe's table against it, so it must not read the recipe).
GGUF_TO_MTP = {
    "nextn.eh_proj": "fc", "nextn.enorm": "pre_fc_norm_embedding", "nextn.hnorm": "pre_fc_norm_hidden",
    "nextn.shared_head_norm": "norm", "attn_norm": "layers.0.input_layernorm",
    "post_attention_norm": "layers.0.post_attention_layernorm", "attn_q": "layers.0.self_attn.q_proj",
    "attn_k": "layers.0.self_attn.k_proj", "attn_v": "layers.0.self_attn.v_proj",
    "attn_output": "layers.0.self_attn.o_proj", "attn_q_norm": "layers.0.self_attn.q_norm",
    "attn_k_norm": "layers.0.self_attn.k_norm", "ffn_gate": "layers.0.mlp.gate_proj",
    "ffn_up": "layers.0.mlp.up_proj", "ffn_down": "layers.0.mlp.down_proj",
}


def test_head_has_the_15_keys_bf16_with_config_shapes_and_gguf_values(built_demo):
    cfg = json.loads((built_demo / "config.json").read_text())["text_config"]
    H, I, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {
        "fc": (H, 2 * H), "pre_fc_norm_embedding": (H,), "pre_fc_norm_hidden": (H,), "norm": (H,),
        "layers.0.input_layernorm": (H,), "layers.0.post_attention_layernorm": (H,),
        "layers.0.self_attn.q_proj": (2 * nh * hd, H), "layers.0.self_attn.k_proj": (nkv * hd, H),
        "layers.0.self_attn.v_proj": (nkv * hd, H), "layers.0.self_attn.o_proj": (H, nh * hd),
        "layers.0.self_attn.q_norm": (hd,), "layers.0.self_attn.k_norm": (hd,),
        "layers.0.mlp.gate_proj": (I, H), "layers.0.mlp.up_proj": (I, H), "layers.0.mlp.down_proj": (H, I),
    }
    head = tensors(built_demo / "mtp.safetensors")
    assert set(head) == {f"mtp.{k}.weight" for k in shapes}
    data, types, n = _gguf_head()
    assert len(data) == 15
    for gname, mname in GGUF_TO_MTP.items():
        out = head[f"mtp.{mname}.weight"]
        assert out.dtype == mx.bfloat16 and tuple(out.shape) == shapes[mname], mname
        src = data[f"blk.{n}.{gname}.weight"]
        if types[f"blk.{n}.{gname}.weight"] == "F32":  # norms: F32 in GGUF, already absolute -> cast only
            expected = mx.array(src.view(np.float32)).astype(mx.bfloat16)
            assert mx.array_equal(out, expected), mname
        else:  # matrices: BF16, copied byte for byte
            assert types[f"blk.{n}.{gname}.weight"] == "BF16"
            assert bytes(memoryview(out.view(mx.uint16))) == src.tobytes(), mname


def test_trunk_has_no_mtp_keys_mlx_conv_layout_and_absolute_norms(built_demo):
    index = json.loads((built_demo / "model.safetensors.index.json").read_text())
    assert not [k for k in index["weight_map"] if "mtp" in k]
    assert "mtp.safetensors" not in set(index["weight_map"].values())
    trunk = trunk_tensors(built_demo)
    assert not [k for k in trunk if "mtp." in k]
    convs = [k for k in trunk if k.endswith("conv1d.weight")]
    assert convs and all(trunk[k].shape[-1] == 1 for k in convs)
    with safe_open(str(BODY / "model-00001-of-00002.safetensors"), "numpy") as _:
        pass  # the body is a real 2-shard HF checkpoint
    src = {}
    for f in sorted(BODY.glob("model-*.safetensors")):
        src.update(tensors(f))
    qnorms = [k for k in trunk if k.endswith("self_attn.q_norm.weight")]
    assert qnorms
    for k in qnorms:
        hf = src[k.replace("language_model.model.", "model.language_model.")]
        assert mx.array_equal(trunk[k], (hf + 1.0).astype(mx.bfloat16)), k  # HF zero-centred + 1
        mean = float(mx.mean(trunk[k].astype(mx.float32)))
        assert 1.25 < mean < 2.4, f"{k} mean {mean}: not absolute (HF ~0.8 -> MLX ~1.8; double shift ~2.8)"
    gated = [k for k in trunk if k.endswith("linear_attn.norm.weight")]
    for k in gated:  # absolute in HF already: copied, never shifted
        assert mx.array_equal(trunk[k], src[k.replace("language_model.model.", "model.language_model.")]), k
    assert trunk["language_model.model.layers.0.linear_attn.A_log"].dtype == mx.float32


def test_config_and_runtime_files(built_demo):
    cfg = json.loads((built_demo / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5"
    assert cfg["text_config"]["mtp_num_hidden_layers"] == 1
    assert cfg["quantization"] == cfg["quantization_config"]
    assert cfg["mlx_lm_extra_tensors"] == {"mtp_file": "mtp.safetensors"}
    for forbidden in ("vision_config", "auto_map", "mtplx_mtp_quantization"):
        assert forbidden not in cfg
    assert not [k for k in cfg if k.endswith("norm_encoding")]
    for f in ("tokenizer.json", "tokenizer_config.json", "README.md", "mtplx_runtime.json"):
        assert (built_demo / f).is_file(), f
    rt = json.loads((built_demo / "mtplx_runtime.json").read_text())
    for key in ("mtplx_version", "arch_id", "mtp_depth_max", "recommended_profile", "exactness_baseline", "verified_on"):
        assert key in rt, key
    assert rt["arch_id"] == "qwen3-next-mtp" and rt["mtp_depth_max"] > 0
    assert "Apple GPU" in rt["exactness_baseline"]["speed"]  # speed is not claimed from a CPU build


def test_mtplx_inspection_gate_passes(built_demo):
    from mtplx.artifacts import inspect_model
    from mtplx.backends.registry import RuntimeContract

    report = inspect_model(str(built_demo.resolve()))
    assert report.mtp.passes_tensor_gate, report.mtp
    assert report.compatibility["tier"] == "verified", report.compatibility.get("message")
    assert report.compatibility["mtp_supported"] == "yes"
    RuntimeContract.from_dict(json.loads((built_demo / "mtplx_runtime.json").read_text()))


def test_mtplx_gate_fails_without_a_head_key(built_demo, tmp_path):
    """The gate test above can fail: drop one head tensor and MTPLX's inspection rejects it."""
    import shutil

    from mtplx.artifacts import inspect_model

    broken = tmp_path / "broken"
    shutil.copytree(built_demo, broken)
    head = tensors(broken / "mtp.safetensors")
    head.pop("mtp.layers.0.self_attn.k_norm.weight")
    mx.save_safetensors(str(broken / "mtp.safetensors"), head)
    assert not inspect_model(str(broken.resolve())).mtp.passes_tensor_gate


def test_build_without_mtp_probe_is_marked_unverified_for_mtplx(tmp_path):
    """`verify: []` (e.g. a benchmark on random weights) must not claim a verified head."""
    from mtplx.artifacts import inspect_model

    from conftest import demo_recipe, run_doit

    proc = run_doit(demo_recipe(tmp_path, extra="verify: [{step: structural}]\n"), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runtime = json.loads((tmp_path / "out" / "mtplx_runtime.json").read_text())
    assert runtime["exactness_baseline"]["status"] == "unverified_mtp_acceptance_not_probed"
    assert inspect_model(str((tmp_path / "out").resolve())).compatibility["tier"] != "verified"
