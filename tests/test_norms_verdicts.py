"""The `norms` step fails only on what is proven and says loudly what is not: a trained model
whose full-attention q_norm gains sit near 0.94 (outside the old heuristic band) builds, with a
warning in the build log and the report; the recipe can opt in to failing on it. A head GGUF
whose norms are +1 over the convention a source proves (the body's own copy of the head) fails
by name; without such a source the build says the head's convention is not proven."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import BODY, BODY_WITH_MTP, HEAD_GGUF, ROOT, run_doit, write_recipe
from forgekit.sources.safetensors_dir import SafetensorsSource

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BASE = ROOT / "recipes" / "qwen3.5-dense-mtp.yaml"
Q_NORM = "model.language_model.layers.3.self_attn.q_norm.weight"     # the fixture's full-attention layer
NORMS_ONLY = "verify:\n  - step: structural\n  - step: norms\n    params: {q_norm_mean: [1.25, 2.4]%s}\n"


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a safetensors model dir with `edit(key, value)` applied to every tensor of every file."""
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        tensors, meta = mx.load(str(f), return_metadata=True)
        mx.save_safetensors(str(f), {k: edit(k, v) for k, v in tensors.items()}, metadata=meta)
    return dst


def recipe(work: Path, name: str, body: Path, extra: str) -> Path:
    return write_recipe(work, f"extends: {BASE}\nname: {name}\nsources:\n  body: {{path: {body}}}\n"
                              f"  mtp: {{path: {HEAD_GGUF}}}\noutput: {{dir: {work / name}}}\n{extra}", f"{name}.yaml")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("norms")


@pytest.fixture(scope="module")
def trained_094(work):
    """The fixture body with its full-attention q_norm moved to an absolute mean of 0.94 (stored
    zero-centred, as HF does: mean -0.06)."""
    def edit(key, v):
        if key != Q_NORM:
            return v
        w = v.astype(mx.float32)
        return (w - mx.mean(w) - 0.06).astype(v.dtype)
    body = edited_copy(BODY, work / "body-094", edit)
    assert abs(float(mx.mean(SafetensorsSource("b", body).read(Q_NORM).astype(mx.float32))) + 1 - 0.94) < 0.005
    return body


def test_a_trained_q_norm_near_094_passes_norms_with_a_warning(work, trained_094):
    proc = run_doit(recipe(work, "q094", trained_094, NORMS_ONLY % ""), work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = work / "q094"
    q = mx.load(str(out / "model.safetensors"))["language_model.model.layers.3.self_attn.q_norm.weight"]
    assert abs(float(mx.mean(q.astype(mx.float32))) - 0.94) < 0.005         # the output carries the same gains
    assert re.search(r"verify norms: WARNING: heuristic: trunk 'language_model\.model\.layers\.3\.self_attn\.q_norm"
                     r"\.weight' mean 0\.9[34]\d is outside the absolute range q_norm_mean \[1\.25, 2\.4\]",
                     proc.stdout), proc.stdout
    report = json.loads((out / "forgekit-report.json").read_text())
    assert report["passed"] and any("outside the absolute range" in w for w in report["warnings"])
    runtime = json.loads((out / "mtplx_runtime.json").read_text())
    assert any("outside the absolute range" in w for w in runtime["verified_on"]["warnings"])


def test_the_recipe_can_opt_in_to_fail_on_the_heuristic(work, trained_094):
    proc = run_doit(recipe(work, "q094strict", trained_094, NORMS_ONLY % ", fail_on_heuristics: true"), work)
    assert proc.returncode != 0
    assert "verify step 'norms' failed" in proc.stdout + proc.stderr
    assert "outside the absolute range q_norm_mean [1.25, 2.4] (fail_on_heuristics)" in proc.stdout + proc.stderr


def test_an_unproven_head_convention_is_said_loudly(work):
    proc = run_doit(recipe(work, "plain", BODY, NORMS_ONLY % ""), work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING: the head's norm convention is NOT proven by its source" in proc.stdout
    report = json.loads((work / "plain" / "forgekit-report.json").read_text())
    assert report["summary"]["norms"]["head_convention_proven"] is False


def test_a_head_proven_by_the_bodys_own_copy_passes(work):
    proc = run_doit(recipe(work, "proven", BODY_WITH_MTP, NORMS_ONLY % ""), work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((work / "proven" / "forgekit-report.json").read_text())["summary"]["norms"]
    assert summary["head_convention_proven"] is True and summary["head_reference"]["offsets"] == {"0.0": 7}
    assert "NOT proven" not in proc.stdout


def test_a_head_gguf_shifted_twice_against_the_proven_convention_fails(work):
    """The body's own head one shift lower than the GGUF's: exactly what a GGUF converted from a
    checkpoint whose head norms were already absolute looks like next to that checkpoint."""
    def lower(key, v):
        return (v.astype(mx.float32) - 1).astype(v.dtype) if key.startswith("mtp.") and v.ndim == 1 else v
    body = edited_copy(BODY_WITH_MTP, work / "body-head-lower", lower)
    proc = run_doit(recipe(work, "twice", body, NORMS_ONLY % ""), work)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "verify step 'norms' failed" in text
    assert "7 head norm(s) shifted twice: +1 over source 'body''s own head in absolute form" in text, text


def test_the_base_recipes_default_verify_list_builds_the_demo(work):
    """No `verify:` in the child: the base recipe's default list (prose prompts, which the fixture's
    byte tokenizer reads) runs unchanged on the tiny demo; mtplx reports itself skipped here."""
    proc = run_doit(recipe(work, "defaults", BODY, ""), work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((work / "defaults" / "forgekit-report.json").read_text())
    assert report["steps"] == ["structural", "norms", "load", "parity", "mtp", "mtplx"]
    assert report["passed"] and report["verified_on"]["mlx"] == mx.__version__
    assert report["verified_on"]["head"] == "as stored in its source"


def test_the_source_reference_is_cached_by_its_digest(work):
    """A second build from the same source (here: another output) reuses the bf16 source's
    log-probs instead of loading the source again; the verdict numbers are the same."""
    first = json.loads((work / "defaults" / "forgekit-report.json").read_text())["summary"]["parity"]
    proc = run_doit(recipe(work, "defaults-again", BODY, ""), work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = json.loads((work / "defaults-again" / "forgekit-report.json").read_text())["summary"]["parity"]
    assert first["reference"] == "computed" and again["reference"] == "cached"
    assert (again["top1"], again["mean_kl"]) == (first["top1"], first["mean_kl"])
