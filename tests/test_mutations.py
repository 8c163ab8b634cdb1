"""Mutation tests: deliberately mis-built models must fail verification, naming the step
and the cause. Recipe mutations run real `doit build`s over a previously published good
build (which must stay untouched, the new one unmarked); file mutations doctor a copy of
the good build and run verify_directory on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from conftest import ROOT, demo_recipe, run_doit
from forgekit.build.memo import StatMemo
from forgekit.errors import VerifyError
from forgekit.build.names import MANIFEST
from forgekit.recipe import VERIFY_STEP
from forgekit.verify import run_step, verify_directory

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BASE = yaml.safe_load((ROOT / "recipes" / "qwen3.5-dense-mtp.yaml").read_text())


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A published good build in work/out, plus its recipe and manifest."""
    work = tmp_path_factory.mktemp("mutations")
    recipe = demo_recipe(work, name="good.yaml")
    proc = run_doit(recipe, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verification:" in proc.stdout and "acceptance by depth" in proc.stdout
    return {"work": work, "out": work / "out", "recipe": recipe, "manifest": (work / "out" / MANIFEST).read_text()}


def child(**sections) -> str:
    return yaml.safe_dump(sections, sort_keys=False)


def table(name: str, edit) -> list[dict]:
    """A copy of a base remap table with `edit(rule)` applied to every rule."""
    rules = [dict(r) for r in BASE["remap"][name]]
    for r in rules:
        edit(r)
    return rules


def assert_build_fails(good, name: str, extra: str, step: str, *causes: str) -> None:
    recipe = demo_recipe(good["work"], extra=extra, name=f"{name}.yaml")
    proc = run_doit(recipe, good["work"])
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert f"verify step '{step}' failed" in text, text
    for cause in causes:
        assert cause in text, text
    out = good["out"]
    assert (out / MANIFEST).read_text() == good["manifest"], "the published good build was touched"
    memo = StatMemo()
    for file, digest in json.loads(good["manifest"])["files"].items():
        assert memo.digest(out / file) == digest, file
    staging = out.with_name(out.name + ".staging")
    assert staging.is_dir() and not (staging / MANIFEST).exists(), "the failed build looks published"


def doctored(good, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(good["out"], copy)
    return copy


def assert_verify_fails(good, directory: Path, step: str, *causes: str) -> None:
    with pytest.raises(VerifyError) as err:
        verify_directory(directory, str(good["recipe"]))
    assert err.value.step == step, err.value
    for cause in causes:
        assert cause in err.value.cause, err.value.cause


def edit_head(directory: Path, fn) -> None:
    head = mx.load(str(directory / "mtp.safetensors"))
    head = fn(dict(head))
    mx.save_safetensors(str(directory / "mtp.safetensors"), head, metadata={"format": "mlx"})


# ------------------------------------------------------------ recipe mutations (doit)


def test_a_trunk_norms_shifted_twice(good):
    def twice(rule):
        if rule["name"] == "zero-centred-norms":
            rule["transforms"] = ["norm_shift", "norm_shift"]
    assert_build_fails(good, "a", child(remap={"body": table("body", twice)}),
                       "norms", "shifted twice", "MTPLX's refusal line")


def test_b_head_norms_left_zero_centred(good):
    def unshift(rule):
        if rule["name"].endswith("norm"):         # the seven mtp-*norm rules
            rule["transforms"] = ["norm_unshift"]
    extra = child(remap={"mtp": table("mtp", unshift)})
    assert extra.count("norm_unshift") == 7
    assert_build_fails(good, "b", extra, "norms", "7 norm(s) in mtp.safetensors left zero-centred",
                       "MTPLX would classify the head as zero-centred")


def test_i_head_norms_shifted_twice(good):
    """The GGUF's head norms are already absolute (its output_norm proves the convention); a build
    that shifts them once more is +1 over what the source proves."""
    def twice(rule):
        if rule["name"].endswith("norm"):         # the seven mtp-*norm rules
            rule["transforms"] = ["norm_shift"]
    extra = child(remap={"mtp": table("mtp", twice)})
    assert extra.count("norm_shift") == 7
    assert_build_fails(good, "i", extra, "norms",
                       "7 norm(s) in mtp.safetensors shifted twice (+1 over a source already absolute)")


def test_c_config_claims_the_swapped_concat_order(good):
    extra = child(config={"set": {"mtplx_mtp_contract": {"concat_order": "hidden_embedding"}}})
    assert_build_fails(good, "c", extra, "mtp", "acceptance depth 1", "collapsed", "concat_order hidden_embedding")


def test_f_head_quantized_to_4_bit(good):
    assert_build_fails(good, "f", child(quantization={"rules": []}), "structural",
                       "the head is quantized", "demands BF16")


def test_g_one_head_tensor_missing(good):
    rules = [r for r in BASE["remap"]["mtp"] if r["name"] != "mtp-k-norm"]   # the GGUF tensor falls to the drop rule
    assert_build_fails(good, "g", child(remap={"mtp": rules}), "structural",
                       "missing ['mtp.layers.0.self_attn.k_norm.weight']")


# ------------------------------------------------------------ file mutations (verify_directory)


def test_good_copy_passes(good, tmp_path):
    assert verify_directory(doctored(good, tmp_path), str(good["recipe"]))["passed"]


def test_c_fc_halves_swapped_in_the_file(good, tmp_path):
    d = doctored(good, tmp_path)

    def swap(head):
        w = head["mtp.fc.weight"]
        h = w.shape[0]
        head["mtp.fc.weight"] = mx.concatenate([w[:, h:], w[:, :h]], axis=1)
        return head
    edit_head(d, swap)
    assert_verify_fails(good, d, "mtp", "acceptance depth 1", "collapsed")


def test_d_mtp_prefix_missing(good, tmp_path):
    d = doctored(good, tmp_path)
    edit_head(d, lambda head: {k.removeprefix("mtp."): v for k, v in head.items()})
    assert_verify_fails(good, d, "structural", "lack the 'mtp.' prefix")


def test_d_head_key_misnamed(good, tmp_path):
    d = doctored(good, tmp_path)

    def rename(head):
        head["mtp.layers.0.attn.q_norm.weight"] = head.pop("mtp.layers.0.self_attn.q_norm.weight")
        return head
    edit_head(d, rename)
    assert_verify_fails(good, d, "structural", "missing ['mtp.layers.0.self_attn.q_norm.weight']",
                        "unexpected ['mtp.layers.0.attn.q_norm.weight']")


def test_e_head_written_into_the_model_file(good, tmp_path):
    d = doctored(good, tmp_path)
    trunk = dict(mx.load(str(d / "model.safetensors")))
    trunk.update(mx.load(str(d / "mtp.safetensors")))
    mx.save_safetensors(str(d / "model.safetensors"), trunk, metadata={"format": "mlx"})
    assert_verify_fails(good, d, "structural", "model.safetensors holds MTP key 'mtp.")


def test_e_head_file_named_like_a_trunk_shard(good, tmp_path):
    d = doctored(good, tmp_path)
    (d / "mtp.safetensors").rename(d / "model-mtp.safetensors")
    config = json.loads((d / "config.json").read_text())
    config["mlx_lm_extra_tensors"]["mtp_file"] = "model-mtp.safetensors"
    (d / "config.json").write_text(json.dumps(config))
    assert_verify_fails(good, d, "structural", "would be loaded by mlx-lm as a trunk shard")


def test_g_one_head_tensor_deleted_from_the_file(good, tmp_path):
    d = doctored(good, tmp_path)
    edit_head(d, lambda head: {k: v for k, v in head.items() if k != "mtp.layers.0.mlp.up_proj.weight"})
    assert_verify_fails(good, d, "structural", "missing ['mtp.layers.0.mlp.up_proj.weight']")


def _random_like(head: dict, keep_norms: bool, seed: int = 123) -> dict:
    """Same keys, shapes and dtype; random values with each tensor's own mean and spread."""
    mx.random.seed(seed)
    out = {}
    for k, v in head.items():
        if keep_norms and v.ndim == 1:
            out[k] = v
            continue
        f = v.astype(mx.float32)
        out[k] = (mx.random.normal(v.shape) * mx.std(f) + mx.mean(f)).astype(v.dtype)
    return out


def test_h_head_of_another_model_fails_the_probe(good, tmp_path):
    d = doctored(good, tmp_path)
    edit_head(d, lambda head: _random_like(head, keep_norms=True))
    assert_verify_fails(good, d, "mtp", "collapsed")


def test_h_head_of_another_model_fails_the_norm_comparison(good, tmp_path):
    d = doctored(good, tmp_path)
    edit_head(d, lambda head: _random_like(head, keep_norms=False))
    assert_verify_fails(good, d, "norms", "does not match its source")


# ------------------------------------------------------------ the base recipe's default (teacher-forced) probe

BASE_MTP = VERIFY_STEP.validate_python(next(s for s in BASE["verify"] if s["step"] == "mtp"))


def _shift_head_norms(head: dict) -> dict:
    return {k: (v.astype(mx.float32) + 1).astype(v.dtype) if v.ndim == 1 else v for k, v in head.items()}


def _swap_fc(head: dict) -> dict:
    w = head["mtp.fc.weight"]
    half = w.shape[1] // 2
    return {**head, "mtp.fc.weight": mx.concatenate([w[:, half:], w[:, :half]], axis=1)}


def test_the_default_text_probe_passes_the_good_build(good):
    assert BASE_MTP.params.trace == "text"
    result = run_step(BASE_MTP, good["out"], None)
    assert result["summary"]["acceptance"][0] >= 0.9, result["summary"]


@pytest.mark.parametrize("mutation", ["fc halves swapped", "head of another model", "head norms shifted twice"])
def test_the_default_text_probe_fails_the_head_mutations(good, tmp_path, mutation):
    edit = {"fc halves swapped": _swap_fc, "head of another model": lambda h: _random_like(h, keep_norms=True),
            "head norms shifted twice": _shift_head_norms}[mutation]
    d = doctored(good, tmp_path)
    edit_head(d, edit)
    with pytest.raises(VerifyError) as err:
        run_step(BASE_MTP, d, None)
    assert err.value.step == "mtp" and "depth 1" in err.value.cause, err.value.cause

