"""The head source is a choice, not a hard-wired path: the shipped qwen3.5-9b recipe (head from
the body's own safetensors, HF convention) and the MiMo graft recipe (a headless finetune body
+ the base model's head) built for real on fixture variants, through huggingface_hub's offline
cache layout exactly as they would resolve on the Hub."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import yaml
from test_hub import populate_hub_cache

from conftest import BODY, BODY_WITH_MTP, DEMO_RECIPE, ROOT, run_doit, write_recipe
from forgekit.recipe import load_recipe
from forgekit.verify.structural import expected_head

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HEAD_NORM = ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "mtp.norm", "input_layernorm", "post_attention_layernorm",
             "q_norm", "k_norm")


def tiny_verify() -> str:
    """The demo's verify steps (probes written in the fixture's token language) as recipe YAML:
    the shipped recipes' own probes are English text, meaningless to the tiny tokenizer."""
    steps = [s.model_dump() for s in load_recipe(DEMO_RECIPE).verify]
    return yaml.safe_dump({"verify": steps}, sort_keys=False)


def files_of(directory) -> dict:
    return {p.name: p for p in directory.iterdir() if p.is_file()}


def hub_env(tmp_path, hub) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path / "hf-home")}


def assert_same_tensors(a_file, b_file) -> None:
    a, b = mx.load(str(a_file)), mx.load(str(b_file))
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


def expected_absolute_head(hf_head: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF-convention head -> what mtp.safetensors must hold: zero-centred norms + 1, in bf16."""
    return {k: (v + 1.0 if any(n in k for n in HEAD_NORM) else v).astype(mx.bfloat16) for k, v in hf_head.items()}


def test_recipes_name_their_real_sources():
    base = load_recipe(ROOT / "recipes" / "qwen3.5-9b.yaml")
    assert base.sources["body"].repo == base.sources["mtp"].repo == "Qwen/Qwen3.5-9B"
    assert base.table_for("mtp") == "mtp_hf" and base.sources["mtp"].file is None
    graft = load_recipe(ROOT / "recipes" / "mimo-v2.6-qwen3.5-9b-graft.yaml")
    assert graft.sources["body"].repo == "XiaomiMiMo/MiMo-V2.6-Distill-Qwen-9B"
    assert graft.sources["mtp"] == base.sources["mtp"]          # inherited: the base model's own head
    assert [s.step for s in graft.verify] == [s.step for s in base.verify]


def test_qwen35_9b_recipe_takes_the_head_from_the_body_repo(tmp_path, built_demo):
    """Body and head from one repo whose safetensors carry mtp.* (like Qwen/Qwen3.5-9B)."""
    hub = tmp_path / "hub"
    commit = populate_hub_cache(hub, "Qwen/Qwen3.5-9B", files_of(BODY_WITH_MTP))
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'qwen3.5-9b.yaml'}\nname: qwen-offline\n"
                                    f"output: {{dir: {out}}}\n" + tiny_verify())
    proc = run_doit(recipe, tmp_path, env=hub_env(tmp_path, hub))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The head lifted from HF mtp.* keys equals the one lifted from the GGUF, bit for bit, and
    # the trunk equals the demo's (same weights): the two head paths agree.
    assert_same_tensors(out / "mtp.safetensors", built_demo / "mtp.safetensors")
    assert_same_tensors(out / "model.safetensors", built_demo / "model.safetensors")
    assert not [k for k in mx.load(str(out / "model.safetensors")) if "mtp" in k]
    sources = {s["role"]: s for s in json.loads((out / "mtplx_runtime.json").read_text())["provenance"]["sources"]}
    assert sources["body"]["repo"] == sources["mtp"]["repo"] == "Qwen/Qwen3.5-9B"
    assert sources["body"]["commit"] == sources["mtp"]["commit"] == commit
    report = json.loads((out / "forgekit-report.json").read_text())
    assert report["passed"] is True


def test_graft_recipe_builds_a_headless_finetune_with_the_base_head(tmp_path, built_demo):
    """MiMo-style release (no mtp.* keys) + the base repo's head, as the shipped graft recipe says."""
    hub = tmp_path / "hub"
    body_commit = populate_hub_cache(hub, "XiaomiMiMo/MiMo-V2.6-Distill-Qwen-9B", files_of(BODY))
    head_commit = populate_hub_cache(hub, "Qwen/Qwen3.5-9B", files_of(BODY_WITH_MTP))
    assert body_commit != head_commit
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'mimo-v2.6-qwen3.5-9b-graft.yaml'}\n"
                                    f"name: graft-offline\noutput: {{dir: {out}}}\n" + tiny_verify())
    proc = run_doit(recipe, tmp_path, env=hub_env(tmp_path, hub))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_tensors(out / "mtp.safetensors", built_demo / "mtp.safetensors")
    assert_same_tensors(out / "model.safetensors", built_demo / "model.safetensors")
    runtime = json.loads((out / "mtplx_runtime.json").read_text())
    sources = {s["role"]: s for s in runtime["provenance"]["sources"]}
    assert (sources["body"]["repo"], sources["body"]["commit"]) == ("XiaomiMiMo/MiMo-V2.6-Distill-Qwen-9B", body_commit)
    assert (sources["mtp"]["repo"], sources["mtp"]["commit"]) == ("Qwen/Qwen3.5-9B", head_commit)
    card = (out / "README.md").read_text()
    assert "XiaomiMiMo/MiMo-V2.6-Distill-Qwen-9B" in card and "Qwen/Qwen3.5-9B" in card
    # The verify report is what says whether the grafted head drafts well for this trunk.
    report = json.loads((out / "forgekit-report.json").read_text())
    assert report["passed"] is True and report["steps"] == [s.step for s in load_recipe(recipe).verify]
    if "mtp" in report["steps"]:
        acceptance = report["summary"]["mtp"]["acceptance"]
        assert len(acceptance) == 3 and min(acceptance) > 0.05, acceptance
    lock = json.loads((tmp_path / "out.lock.json").read_text())
    assert lock["sources"]["body"]["commit"] == body_commit and lock["sources"]["mtp"]["commit"] == head_commit


def test_graft_of_another_models_head_takes_that_head(tmp_path):
    """A donor model whose head differs from the body's: the output head is the donor's, shifted."""
    donor = tmp_path / "donor"
    donor.mkdir()
    tensors = mx.load(str(BODY_WITH_MTP / "model.safetensors"))
    config = json.loads((BODY_WITH_MTP / "config.json").read_text())
    rng = np.random.default_rng(7)
    head = {}
    for k, shape in expected_head(config).items():
        scale = 0.05 if len(shape) == 1 else 0.02
        head[k] = mx.array(rng.normal(0, scale, size=shape).astype(np.float32)).astype(mx.bfloat16)
    assert set(head) == {k for k in tensors if k.startswith("mtp.")}
    tensors.update(head)
    mx.save_safetensors(str(donor / "model.safetensors"), tensors, {"format": "pt"})
    shutil.copyfile(BODY_WITH_MTP / "config.json", donor / "config.json")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'mimo-v2.6-qwen3.5-9b-graft.yaml'}\n"
                                    f"name: graft-random-head\nsources:\n  body: {{path: {BODY}}}\n"
                                    f"  mtp: {{path: {donor}, table: mtp_hf}}\noutput: {{dir: {out}}}\n"
                                    f"verify: [{{step: structural}}]   # a random head would not draft\n")
    proc = run_doit(recipe, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = mx.load(str(out / "mtp.safetensors"))
    want = expected_absolute_head(head)
    assert sorted(built) == sorted(want)
    for k in want:
        assert built[k].dtype == mx.bfloat16 and mx.array_equal(built[k], want[k]).item(), k
    norms = [k for k in want if any(n in k for n in HEAD_NORM)]
    assert len(norms) == 7 and all(abs(float(built[k].astype(mx.float32).mean()) - 1.0) < 0.05 for k in norms)
