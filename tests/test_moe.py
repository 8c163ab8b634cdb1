"""Qwen3.5 MoE builds (issue 12) on the trained tiny MoE fixture (tests/fixtures/tiny_moe/), by
real doit runs: the body bit-identical to `mlx_lm.convert -q --q-bits 4 --q-group-size 64`
(8-bit router), the head in MTPLX's 20-key switch_mlp layout from each of the head layouts (GGUF
with separate or fused gate/up experts, fused HF, numbered HF) byte-identical, MTPLX's gate and
runtime on it, and mis-builds failing by name."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from conftest import ROOT, run_doit, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MOE = ROOT / "tests" / "fixtures" / "tiny_moe"
MOE_RECIPE = ROOT / "recipes" / "tiny-moe.yaml"
BASE = ROOT / "recipes" / "qwen3.5-moe-mtp.yaml"
HEADS = {"gguf": f"{{path: {MOE / 'head.gguf'}}}",
         "gguf_fused": f"{{path: {MOE / 'head_gate_up.gguf'}}}",    # llama.cpp's ffn_gate_up_exps
         "fused": f"{{path: {MOE / 'head_fused.safetensors'}, table: mtp_hf}}",
         "numbered": f"{{path: {MOE / 'head_numbered.safetensors'}, table: mtp_hf}}"}
STRUCTURAL_ONLY = "verify:\n  - step: structural\n    params: {head_dtype: BF16}\n  - step: values\n"


def moe_recipe(work: Path, name: str, head: str = HEADS["gguf"], extra: str = STRUCTURAL_ONLY,
               body: Path = MOE / "body") -> Path:
    return write_recipe(work, f"extends: {BASE}\nname: {name}\nsources:\n  body: {{path: {body}}}\n"
                              f"  mtp: {head}\noutput: {{dir: {work / name}}}\n{extra}", f"{name}.yaml")


def tensors(path: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for f in sorted(Path(path).glob("model*.safetensors")) if Path(path).is_dir() else [Path(path)]:
        out.update(mx.load(str(f)))
    return out


@pytest.fixture(scope="module")
def moe_builds(tmp_path_factory) -> dict[str, Path]:
    """The shipped tiny-moe recipe (GGUF head, every verify step), the fused-experts GGUF head and
    the fused / numbered HF heads (structural + values), each built by a real doit run sharing one
    cache."""
    work = tmp_path_factory.mktemp("moe")
    out = {}
    recipe = write_recipe(work, f"extends: {MOE_RECIPE}\nname: tm-gguf\noutput: {{dir: {work / 'gguf'}}}\n", "gguf.yaml")
    proc = run_doit(recipe, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out["gguf"] = work / "gguf"
    for layout in ("gguf_fused", "fused", "numbered"):
        proc = run_doit(moe_recipe(work, layout, HEADS[layout]), work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[layout] = work / layout
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """mlx-lm's own conversion of the fixture body (applies its 8-bit router predicate itself)."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("moe-convert") / "mlx"
    convert(str(MOE / "body"), str(out), quantize=True, q_group_size=64, q_bits=4)
    return out


def test_body_is_bit_identical_to_mlx_lm_convert(moe_builds, converted):
    ours, ref = tensors(moe_builds["gguf"]), tensors(converted)
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert mx.array_equal(ours[k], v).item(), k
    assert ours["language_model.model.layers.0.mlp.gate.weight"].shape == (8, 16)           # 8-bit router
    assert ours["language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"].shape == (8, 64, 8)  # 4-bit
    for layout in ("gguf_fused", "fused", "numbered"):
        for f in ("model.safetensors",):
            assert (moe_builds[layout] / f).read_bytes() == (moe_builds["gguf"] / f).read_bytes()


def test_config_carries_mlx_lm_per_module_quant_entries(moe_builds, converted):
    ours = json.loads((moe_builds["gguf"] / "config.json").read_text())
    ref = json.loads((converted / "config.json").read_text())
    assert ours["quantization"] == ref["quantization"] == ours["quantization_config"]
    router = ours["quantization"]["language_model.model.layers.3.mlp.gate"]
    assert router == {"group_size": 64, "bits": 8}           # no "mode" key, as mlx-lm writes it
    assert ours["quantization"]["language_model.model.layers.3.mlp.shared_expert_gate"] == router


def _source_head() -> dict[str, np.ndarray]:
    """The fused HF head as float32 numpy, mapped by hand: gate = first half of axis -2, norms + 1."""
    raw = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(MOE / "head_fused.safetensors")).items()}
    head = {}
    for k, v in raw.items():
        if k.endswith("experts.gate_up_proj"):
            half = v.shape[-2] // 2
            head["mtp.layers.0.mlp.switch_mlp.gate_proj.weight"] = v[:, :half, :]
            head["mtp.layers.0.mlp.switch_mlp.up_proj.weight"] = v[:, half:, :]
        elif k.endswith("experts.down_proj"):
            head["mtp.layers.0.mlp.switch_mlp.down_proj.weight"] = v
        elif v.ndim == 1:
            head[k] = v + 1.0            # every HF head norm is zero-centred
        else:
            head[k] = v
    return head


def test_head_is_the_20_switch_mlp_keys_bf16_equal_to_the_source(moe_builds):
    from mtplx.constants import EXPECTED_QWEN_MOE_SWITCH_MLP_MTP_KEYS

    want = _source_head()
    for layout, out in moe_builds.items():
        head = mx.load(str(out / "mtp.safetensors"))
        assert set(head) == set(EXPECTED_QWEN_MOE_SWITCH_MLP_MTP_KEYS) == set(want), layout
        for k, v in head.items():
            assert v.dtype == mx.bfloat16, (layout, k)
            assert np.array_equal(np.array(v.astype(mx.float32)), want[k]), (layout, k)


def test_every_head_layout_gives_a_byte_identical_head(moe_builds):
    heads = {layout: (out / "mtp.safetensors").read_bytes() for layout, out in moe_builds.items()}
    assert set(heads) == {"gguf", "gguf_fused", "fused", "numbered"}
    assert all(h == heads["gguf"] for h in heads.values())


def test_fused_gguf_experts_are_the_hf_fused_tensor_bit_for_bit():
    """llama.cpp's ffn_gate_up_exps (ne {H, 2I, E}, gate rows first) reads back through gguf-py as
    [E, 2I, H], the very layout and bytes of the checkpoint's own experts.gate_up_proj."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(MOE / "head_gate_up.gguf")).tensors}
    fused = tensors["blk.4.ffn_gate_up_exps.weight"]
    assert [int(n) for n in fused.shape] == [64, 128, 8]
    assert "blk.4.ffn_gate_exps.weight" not in tensors and "blk.4.ffn_up_exps.weight" not in tensors
    hf = mx.load(str(MOE / "head_fused.safetensors"))["mtp.layers.0.mlp.experts.gate_up_proj"]
    assert np.array_equal(np.array(fused.data).view(np.uint16), np.array(hf.view(mx.uint16)))


def test_mtplx_inspection_gate_passes(moe_builds):
    from mtplx.artifacts import inspect_model

    report = inspect_model(str(moe_builds["gguf"].resolve()))
    assert report.mtp.passes_tensor_gate, report.mtp


def test_forgekit_probe_acceptance_and_every_step_passed(moe_builds):
    report = json.loads((moe_builds["gguf"] / "forgekit-report.json").read_text())
    steps = {s["step"]: s for s in report["results"]}
    assert all(s["passed"] for s in steps.values()), steps
    acceptance = steps["mtp"]["summary"]["acceptance"]
    assert all(a >= t for a, t in zip(acceptance, (0.90, 0.85, 0.80))), acceptance
    assert steps["structural"]["summary"]["head_keys"] == 20


# ---------------------------------------------------------------- MTPLX's runtime on the MoE build


@pytest.mark.skipif(sys.platform == "darwin", reason="the stand-in and the float32 gather_mm are for Linux CPU")
def test_mtplx_runtime_decodes_with_mtp_equal_to_ar(moe_builds):
    """MTPLX 2.12's own runtime: greedy MTP output == AR output, acceptance by MTPLX's counters.
    mlx's CPU gather_mm is float32-only, so (test code only) it runs in float32 and casts back."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the libSystem stand-in")
    import mtplx_standin

    from forgekit.recipe import VERIFY_STEP
    from forgekit.verify import run_step

    mtplx_standin.install()
    import mtplx.generation  # noqa: F401  (the modules that run the MoE, imported before patching)
    import mtplx.runtime  # noqa: F401

    mtplx_standin.gather_mm_in_float32()
    step = next(VERIFY_STEP.validate_python(s) for s in yaml.safe_load(MOE_RECIPE.read_text())["verify"] if s["step"] == "mtplx")
    result = run_step(step, moe_builds["gguf"], None)
    assert result["passed"] and "skipped" not in result, result
    summary = result["summary"]
    assert summary["equals_ar"]
    assert all(a >= t for a, t in zip(summary["acceptance"], (0.90, 0.85, 0.80))), summary["acceptance"]
    assert summary["by_depth"][-1]["drafted_by_depth"][0] > 0


# ---------------------------------------------------------------- mis-builds fail by name


def _swapped(table: str) -> str:
    """The base recipe's `table` with the fused gate_up split's outputs in the wrong order."""
    rules = yaml.safe_load(BASE.read_text())["remap"][table]
    for rule in rules:
        if "split" in rule:
            rule["split"]["to"] = list(reversed(rule["split"]["to"]))
    return yaml.safe_dump({"remap": {table: rules}}, width=1000)


@pytest.mark.parametrize("table,head,tensor", [
    ("mtp_hf", "fused", "mtp.layers.0.mlp.switch_mlp.gate_proj.weight"),
    ("mtp", "gguf_fused", "mtp.layers.0.mlp.switch_mlp.gate_proj.weight"),
    ("body", "gguf", "language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"),
])
def test_gate_up_halves_swapped_fail_by_name_and_nothing_is_published(tmp_path, table, head, tensor):
    recipe = moe_recipe(tmp_path, "swapped", HEADS[head], STRUCTURAL_ONLY + _swapped(table))
    proc = run_doit(recipe, tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"'{tensor}'" in out and "differs from its source" in out, out
    assert not (tmp_path / "swapped").exists()


def _edit_build(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _run_structural(directory: Path, recipe: Path) -> dict:
    from forgekit.plan import make_plan
    from forgekit.recipe import load_recipe
    from forgekit.verify import structural

    from forgekit.verify_params import StructuralParams

    return structural.run(directory, make_plan(load_recipe(recipe)), StructuralParams(head_dtype="BF16"))


def test_router_at_4_bits_where_the_recipe_says_8_fails_by_name(moe_builds, tmp_path):
    """A build whose router was quantized at the default 4 bits (rule ignored, config consistent with it)."""
    recipe = moe_recipe(tmp_path, "fused", HEADS["fused"])
    assert _run_structural(moe_builds["fused"], recipe)["passed"]    # the check passes the correct build

    def requantize_router(d: Path):
        w = tensors(d)
        key = "language_model.model.layers.2.mlp.gate"
        dense = mx.dequantize(w[key + ".weight"], w[key + ".scales"], w[key + ".biases"], group_size=64, bits=8)
        w[key + ".weight"], w[key + ".scales"], w[key + ".biases"] = mx.quantize(dense, group_size=64, bits=4)
        mx.save_safetensors(str(d / "model.safetensors"), w, metadata={"format": "mlx"})
        config = json.loads((d / "config.json").read_text())
        for q in ("quantization", "quantization_config"):
            config[q].pop(key)
        (d / "config.json").write_text(json.dumps(config))

    broken = _edit_build(moe_builds["fused"], tmp_path / "broken", requantize_router)
    result = _run_structural(broken, recipe)
    assert not result["passed"]
    assert "'language_model.model.layers.2.mlp.gate.weight'" in result["cause"], result
    assert "8-bit g64" in result["cause"] and "router-8bit" in result["cause"], result


def test_quantized_moe_head_is_refused(tmp_path):
    """A recipe that forgets the head's bf16 rule quantizes the head (router 8-bit, the rest at the
    4-bit default): refused while planning, in one line naming the head, before any task runs."""
    recipe = moe_recipe(tmp_path, "qhead", HEADS["fused"], STRUCTURAL_ONLY + (
        "quantization:\n  rules:\n    - {name: router-8bit, match: '.*(?:mlp\\.gate|shared_expert_gate)', "
        "bits: 8, group_size: 64}\n"))
    proc = run_doit(recipe, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the MTP head mixes 4-bit g64 affine, 8-bit g64 affine" in lines[0], proc.stderr
    assert not (tmp_path / "qhead").exists()


def test_one_expert_changed_in_the_head_fails_the_value_check_by_name(moe_builds, tmp_path):
    """MTPLX binds the head with strict=False and its gate checks names: the values are forgekit's check."""
    from forgekit.plan import make_plan
    from forgekit.recipe import load_recipe
    from forgekit.verify import values

    recipe = moe_recipe(tmp_path, "numbered", HEADS["numbered"])
    assert values.run(moe_builds["numbered"], make_plan(load_recipe(recipe)), {})["passed"]

    def bump_expert_5(d: Path):
        head = dict(mx.load(str(d / "mtp.safetensors")))
        key = "mtp.layers.0.mlp.switch_mlp.down_proj.weight"
        head[key] = mx.concatenate([head[key][:5], head[key][5:6] * 2, head[key][6:]])
        mx.save_safetensors(str(d / "mtp.safetensors"), head, metadata={"format": "mlx"})

    broken = _edit_build(moe_builds["numbered"], tmp_path / "broken", bump_expert_5)
    result = values.run(broken, make_plan(load_recipe(recipe)), {})
    assert not result["passed"]
    assert "'mtp.layers.0.mlp.switch_mlp.down_proj.weight'" in result["cause"], result
    assert "mtp.layers.0.mlp.experts.0.down_proj.weight" in result["cause"], result
