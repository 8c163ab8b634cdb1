"""A quantized MTP head as a deliberate recipe choice (recipes/quant/head-8bit.yaml,
head-4bit.yaml): built for real, every verify step runs the quantized head, MTPLX's
prequantized tensor gate accepts it, config.json and mtplx_runtime.json say what it is."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import BODY, DEMO_RECIPE, HEAD_GGUF, ROOT, run_doit, write_recipe
from forgekit.errors import VerifyError
from forgekit.plan import make_plan
from forgekit.recipe import load_recipe
from forgekit.verify import verify_directory

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def child(directory, snippet: str, verify: list[dict]) -> str:
    text = (f"extends: {ROOT / 'recipes' / 'quant' / snippet}\nname: head-under-test\n"
            f"sources:\n  body: {{path: {BODY}}}\n  mtp: {{path: {HEAD_GGUF}}}\n"
            f"output: {{dir: {directory / 'out'}}}\n" + yaml.safe_dump({"verify": verify}, sort_keys=False))
    return write_recipe(directory, text)


@pytest.fixture(scope="module")
def head8(tmp_path_factory):
    """The 8-bit head built with the demo's full verify list (structural, norms, load, parity, mtp, mtplx)."""
    work = tmp_path_factory.mktemp("head8")
    recipe = child(work, "head-8bit.yaml", [s.model_dump() for s in load_recipe(DEMO_RECIPE).verify])
    proc = run_doit(recipe, work)
    return {"proc": proc, "out": work / "out", "recipe": recipe}


def test_8bit_head_build_passes_every_verify_step(head8):
    proc = head8["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((head8["out"] / "forgekit-report.json").read_text())
    ran = {r["step"]: r for r in report["results"]}
    assert all(ran[s]["passed"] and not ran[s].get("skipped") for s in ("structural", "norms", "load", "parity", "mtp"))
    assert ran["structural"]["summary"]["head_keys"] == 15 + 2 * 8       # fc + 7 linears carry scales and biases
    assert min(ran["mtp"]["summary"]["acceptance"]) >= 0.85
    assert report["mtp_head"] == {"sidecar": "prequantized-mlx-affine-8bit-g64",
                                  "source": "original precision (no dequantization)"}


def test_8bit_head_passes_mtplx_prequantized_gate(head8):
    from mtplx.artifacts import inspect_model

    inspection = inspect_model(str(head8["out"].resolve()))
    assert inspection.mtp.passes_tensor_gate, inspection.mtp
    assert inspection.mtp.sidecar_format == "prequantized-mlx-affine" and inspection.passes_primary_gate


def test_8bit_head_config_and_runtime_say_what_it_is(head8):
    config = json.loads((head8["out"] / "config.json").read_text())
    assert config["quantization"]["mtp.fc"] == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert config["quantization"]["mtp.layers.0.mlp.down_proj"]["bits"] == 8
    assert "mtp.norm" not in config["quantization"]
    assert config["mtplx_mtp_quantization"] == {"prequantized": True, "policy": "all", "bits": 8, "group_size": 64,
                                                "mode": "affine", "quantized_modules": 8}
    runtime = json.loads((head8["out"] / "mtplx_runtime.json").read_text())
    assert runtime["mtp_sidecar"] == "prequantized-mlx-affine-8bit-g64"


def test_quantized_head_plan_warns_about_acceptance(tmp_path):
    plan = make_plan(load_recipe(child(tmp_path, "head-4bit.yaml", [])))
    assert any("MTP head is quantized (4-bit g64 affine)" in w and "accepted less often" in w for w in plan.warnings)
    default = make_plan(load_recipe(DEMO_RECIPE))
    assert not any("MTP head is quantized" in w for w in default.warnings)


def test_4bit_head_builds_and_loads(tmp_path):
    proc = run_doit(child(tmp_path, "head-4bit.yaml", [{"step": "structural"}, {"step": "load"}]), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MTP head: prequantized-mlx-affine-4bit-g64" in proc.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mtplx_mtp_quantization"]["bits"] == 4


def doctor_config(head8, tmp_path, edit) -> str:
    copy = tmp_path / "copy"
    shutil.copytree(head8["out"], copy)
    config = json.loads((copy / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        edit(config[key])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_structural_fails_when_config_does_not_name_the_quantized_head(head8, tmp_path):
    copy = doctor_config(head8, tmp_path, lambda q: [q.pop(k) for k in [k for k in q if k.startswith("mtp.")]])
    with pytest.raises(VerifyError) as err:
        verify_directory(copy, str(head8["recipe"]))
    assert err.value.step == "structural" and "names no mtp.* module" in err.value.cause


def test_load_fails_when_config_gives_the_head_other_bits(head8, tmp_path):
    def four_bits(q):
        for k in [k for k in q if k.startswith("mtp.")]:
            q[k] = {**q[k], "bits": 4}
    copy = doctor_config(head8, tmp_path, four_bits)
    with pytest.raises(VerifyError) as err:
        verify_directory(copy, str(head8["recipe"]))
    # structural compares config.json's quantization entries with the recipe's rules first; where
    # it did not, load would refuse the head (it does not load strictly)
    assert (err.value.step == "structural" and "the recipe's rules decide" in err.value.cause) or \
        (err.value.step == "load" and "does not load strictly" in err.value.cause), (err.value.step, err.value.cause)


def test_good_copy_of_the_8bit_head_build_verifies(head8, tmp_path):
    assert verify_directory(doctor_config(head8, tmp_path, lambda q: None), str(head8["recipe"]))["passed"]


def test_mtplx_runtime_decodes_with_the_8bit_head(head8):
    """MTPLX's own runtime (made importable on Linux by the test-only stand-in) loads the
    prequantized head from config.json and decodes with it, equal to plain decoding."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the libSystem stand-in")
    import mtplx_standin

    from forgekit.verify import run_step

    mtplx_standin.install()
    step = next(s for s in load_recipe(DEMO_RECIPE).verify if s.step == "mtplx")
    result = run_step(step, head8["out"], None)
    assert result["passed"] and not result.get("skipped"), result
    assert result["summary"]["equals_ar"] is True and min(result["summary"]["acceptance"]) >= 0.85, result
