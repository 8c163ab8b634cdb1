"""Verification steps on the correct demo build: every step passes with the tiny fixture's
numbers, verify_directory works on an existing directory, and the pieces each step relies
on (chain statistics, MTPLX's head detector, the GGUF convention proof) compute what their
definitions say."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import HEAD_GGUF, demo_recipe
from forgekit.errors import VerifyError
from forgekit.verify import report_table, verify_directory
from forgekit.verify.mtp import chain_stats
from forgekit.verify_params import LoadParams
from forgekit.verify.norms import gguf_convention, head_is_zero_centred, mtplx_says_zero_centred

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STEPS = ["structural", "norms", "load", "parity", "mtp", "mtplx"]   # mtplx reports itself skipped without mtplx
DEPTH_THRESHOLDS = [0.95, 0.90, 0.85]


def test_demo_build_passes_every_step_with_margin(built_demo):
    report = json.loads((built_demo / "forgekit-report.json").read_text())
    assert report["passed"] and report["steps"] == STEPS
    mtp = report["summary"]["mtp"]
    assert mtp["depth"] == 3 and len(mtp["acceptance"]) == 3
    for got, want in zip(mtp["acceptance"], DEPTH_THRESHOLDS):
        assert got >= want, mtp
    assert mtp["mean_accepted"] >= 2.5 and mtp["rounds"] > 100
    assert mtp["trunk_tokens"] > 0 and mtp["seconds"]["trace"] >= 0
    parity = report["summary"]["parity"]
    assert parity["top1"] >= 0.9 and parity["mean_kl"] < 0.1, parity
    norms = report["summary"]["norms"]
    assert norms["source_conventions"] == {"body": "zero_centred", "mtp": "absolute"}
    assert norms["gguf_norms_proven"] == "absolute" and norms["max_abs_deviation"] < 0.01
    assert norms["head_detector_zero_centred"] is False and norms["mtplx_detector_zero_centred"] is False
    runtime = json.loads((built_demo / "mtplx_runtime.json").read_text())
    assert runtime["exactness_baseline"]["results"]["mtp"]["acceptance"] == mtp["acceptance"]


def test_verify_directory_runs_the_recipe_steps_and_prints_a_table(built_demo, tmp_path, capsys):
    report = verify_directory(built_demo, str(demo_recipe(tmp_path, out=tmp_path / "unused")))
    assert report["passed"] and report["steps"] == STEPS
    out = capsys.readouterr().out
    assert "verification:" in out
    for step in STEPS:
        assert f"  {step} " in out
    assert "acceptance by depth" in out


def test_report_table_shows_failures_with_their_cause():
    table = report_table([{"step": "structural", "passed": True, "seconds": 0.1, "summary": {"shards": 1}},
                          {"step": "norms", "passed": False, "cause": "'x' is all zeros"}])
    assert "structural  ok" in table and "FAILED" in table and "'x' is all zeros" in table


def test_chain_stats_follow_their_definitions():
    # trace of 8 tokens, prompt 2: rounds t = 1 .. 8-2-2 = 4 (depth 2)
    tokens = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    drafts = np.zeros((2, 1, 7), dtype=int)
    drafts[0, 0] = [9, 3, 4, 9, 6, 9, 9]          # depth 1 at t drafts t+2: right at t=1,2,4
    drafts[1, 0] = [9, 4, 9, 6, 9, 9, 9]          # depth 2 at t drafts t+3: right at t=1,3
    s = chain_stats(drafts, tokens, prompt_len=2)
    assert s["rounds"] == 4
    assert s["marginal"] == [0.75, 0.5]
    assert s["cumulative"] == [0.75, 0.25]        # both right only at t=1
    assert s["acceptance"] == [0.75, pytest.approx(1 / 3, abs=1e-4)]
    assert s["mean_accepted"] == 1.0              # accepted counts 2, 1, 0, 1


def _head_norms(qk: float, low: float) -> dict[str, mx.array]:
    names = {"mtp.layers.0.self_attn.q_norm.weight": qk, "mtp.layers.0.self_attn.k_norm.weight": qk - 0.1,
             "mtp.layers.0.input_layernorm.weight": low, "mtp.layers.0.post_attention_layernorm.weight": low + 0.2,
             "mtp.pre_fc_norm_embedding.weight": low + 0.1, "mtp.pre_fc_norm_hidden.weight": low + 0.3,
             "mtp.norm.weight": 2.0}
    return {k: mx.full((8,), v, dtype=mx.bfloat16) for k, v in names.items()}


@pytest.mark.parametrize("qk, low, expected", [(1.8, 1.0, False), (0.8, 0.0, True), (0.8, 0.9, False),
                                               (1.3, 0.1, False), (1.2, 0.45, True)])
def test_head_detector_matches_mtplx(qk, low, expected):
    norms = _head_norms(qk, low)
    ours, _ = head_is_zero_centred(norms)
    assert ours is expected
    assert mtplx_says_zero_centred(norms) is expected


def test_gguf_convention_is_proven_or_must_be_stated(tmp_path):
    from forgekit.sources.gguf_file import GGUFSource

    source = GGUFSource("mtp", HEAD_GGUF)
    g = source.read("output_norm.weight").astype(mx.float32)
    assert gguf_convention(source, g, None, 0.01)[0] == "absolute"
    assert gguf_convention(source, g + 1.0, None, 0.01)[0] == "zero_centred"
    conv, problem, _ = gguf_convention(source, g * 0.5 + 3.0, None, 0.01)
    assert conv is None and "gguf_norms" in problem and "another model" in problem
    assert gguf_convention(source, g * 0.5 + 3.0, "absolute", 0.01)[0] == "absolute"
    conv, problem, _ = gguf_convention(source, g, "zero_centred", 0.01)
    assert conv is None and "proves absolute" in problem


def test_a_stated_convention_that_contradicts_the_proof_fails_the_norms_step(built_demo, tmp_path):
    extra = ("verify:\n  - step: norms\n    params: {gguf_norms: zero_centred}\n")
    with pytest.raises(VerifyError) as err:
        verify_directory(built_demo, str(demo_recipe(tmp_path, extra=extra)))
    assert err.value.step == "norms" and "proves absolute" in err.value.cause


def test_a_degraded_head_fails_the_threshold_not_the_collapse_line(built_demo, tmp_path):
    """Noise on one head matrix: acceptance drops to ~0.6, below 0.95 but far from collapse."""
    def noisy(head):
        key = "mtp.layers.0.mlp.down_proj.weight"
        w = head[key].astype(mx.float32)
        mx.random.seed(5)
        head[key] = (w + 2.0 * mx.std(w) * mx.random.normal(w.shape)).astype(mx.bfloat16)
        return head
    copy = _copy_with_head(built_demo, tmp_path, noisy)
    with pytest.raises(VerifyError) as err:
        verify_directory(copy, str(demo_recipe(tmp_path)))
    assert err.value.step == "mtp", err.value
    assert "depth 1 acceptance" in err.value.cause and "< threshold 0.95" in err.value.cause
    assert "collapsed" not in err.value.cause


def _copy_with_head(built_demo, tmp_path, edit):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built_demo, copy)
    head = edit(dict(mx.load(str(copy / "mtp.safetensors"))))
    mx.save_safetensors(str(copy / "mtp.safetensors"), head, metadata={"format": "mlx"})
    return copy


def test_load_step_loads_the_head_strictly(built_demo, tmp_path):
    from forgekit.plan import make_plan
    from forgekit.recipe import load_recipe
    from forgekit.verify import load

    def wrong_shape(head):
        head["mtp.fc.weight"] = head["mtp.fc.weight"][:, :64]
        return head
    copy = _copy_with_head(built_demo, tmp_path, wrong_shape)
    result = load.run(copy, make_plan(load_recipe(demo_recipe(tmp_path))), LoadParams())
    assert not result["passed"] and "does not load strictly" in result["cause"] and "mtp.fc.weight" in result["cause"]


def test_load_step_rejects_non_finite_logits(built_demo, tmp_path):
    from forgekit.plan import make_plan
    from forgekit.recipe import load_recipe
    from forgekit.verify import load

    def nan_norm(head):
        head["mtp.norm.weight"] = mx.full(head["mtp.norm.weight"].shape, float("nan"), dtype=mx.bfloat16)
        return head
    copy = _copy_with_head(built_demo, tmp_path, nan_norm)
    result = load.run(copy, make_plan(load_recipe(demo_recipe(tmp_path))), LoadParams())
    assert not result["passed"] and result["cause"].startswith("head logits on fixed tokens are not finite")


def test_chain_stats_on_teacher_text_judge_a_depth_only_on_the_trunks_path():
    # text of 8 tokens; the trunk's greedy choice after each position; context 2: rounds t = 1 .. 4
    tokens = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    greedy = np.array([[1, 2, 9, 4, 5, 6, 7, 8]])   # the text leaves the greedy path only at t=2 (9 != 3)
    drafts = np.zeros((2, 1, 7), dtype=int)
    drafts[0, 0] = [9, 8, 4, 5, 6, 9, 9]            # depth 1 at t is judged against greedy[t+1]
    drafts[1, 0] = [9, 9, 5, 9, 7, 9, 9]            # depth 2 at t against greedy[t+2], where text[t+2] == greedy[t+1]
    s = chain_stats(drafts, tokens, 2, greedy)
    assert s["rounds"] == 4
    assert s["marginal"] == [0.75, 0.5]             # t=2,3,4 right at depth 1; t=2,4 at depth 2
    # depth 2 is evaluable where depth 1 was accepted AND text[t+2] == greedy[t+1]: t=2, 3, 4 (not t=1,
    # where depth 1 is wrong and text[3]=3 != greedy[2]=9); of those, depth 2 is right at t=2 and t=4.
    assert s["evaluable_by_depth"] == [4, 3]
    assert s["acceptance"] == [0.75, pytest.approx(2 / 3, abs=1e-4)]


def test_the_report_says_where_it_ran_and_that_a_head_was_dequantized(tmp_path):
    from test_cli import quantized_head_gguf

    from forgekit.build.outputs import runtime_json
    from forgekit.plan import make_plan
    from forgekit.recipe import load_recipe
    from forgekit.verify.where import verified_where

    q8 = quantized_head_gguf(tmp_path / "src" / "head-Q8_0.gguf")
    plan = make_plan(load_recipe(demo_recipe(tmp_path, extra=f"sources:\n  mtp: {{path: {q8}}}\n")))
    where = verified_where(plan)
    assert where["head"] == "dequantized from Q8_0" and where["head_from_quantized_types"] == ["Q8_0"]
    assert where["mlx"] == mx.__version__ and where["device"] == str(mx.default_device())
    runtime = runtime_json(plan, {}, {"results": [], "verified_on": where, "warnings": ["norms: x"]})
    assert runtime["verified_on"]["head"] == "dequantized from Q8_0" and runtime["verified_on"]["warnings"] == ["norms: x"]
    (tmp_path / "plain").mkdir()
    plain = verified_where(make_plan(load_recipe(demo_recipe(tmp_path / "plain"))))
    assert plain["head"] == "as stored in its source" and plain["head_from_quantized_types"] == []
