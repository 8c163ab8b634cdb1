"""Typed verify params: a typo in any step's params, or a list threshold of the wrong length,
is a recipe error naming file:line and the key at validate time (exit 2), never a silently
weakened check."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import BODY, DEMO_RECIPE, HEAD_GGUF, write_recipe
from forgekit.errors import RecipeError
from forgekit.recipe import load_recipe
from forgekit.verify_params import PARAMS

BASE = DEMO_RECIPE.parent / "qwen3.5-dense-mtp.yaml"
PROMPTS = {"prompts": ["<|im_start|>ab"]}
# Per step: valid params, and a typo of one real key.
TYPOS = {
    "structural": ({}, "head_dtyp"),
    "values": ({}, "experts"),
    "norms": ({"q_norm_mean": [1.25, 2.4]}, "tolerence"),
    "load": ({}, "token"),
    "parity": (PROMPTS, "min_top_1"),
    "mtp": ({**PROMPTS, "depth": 3, "min_agreement": [0.5, 0.4, 0.3]}, "min_agreemnt"),
    "mtplx": ({**PROMPTS, "depth": 2}, "min_aceptance"),
}


def recipe_with(tmp_path, steps: list[dict]) -> str:
    text = (f"extends: {BASE}\nname: t\nsources:\n  body: {{path: {BODY}}}\n  mtp: {{path: {HEAD_GGUF}}}\n"
            f"output: {{dir: out}}\n" + yaml.safe_dump({"verify": steps}, sort_keys=False))
    return str(write_recipe(tmp_path, text))


def test_every_step_has_a_typed_params_model():
    assert set(TYPOS) == set(PARAMS)
    for model in PARAMS.values():
        assert model.model_config["frozen"] and model.model_config["extra"] == "forbid"


@pytest.mark.parametrize("step", sorted(TYPOS))
def test_a_typo_in_the_params_of_each_step_is_an_error_naming_the_key(tmp_path, step):
    good, typo = TYPOS[step]
    steps = [{"step": "structural"}, {"step": step, "params": {**good, typo: 1}}]
    path = recipe_with(tmp_path, steps)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    line = open(path).read().splitlines().index(f"    {typo}: 1") + 1
    assert re.fullmatch(rf".*recipe\.yaml:{line}: verify\[1\]\.params\.{typo}: unknown key", str(err.value)), err.value
    load_recipe(recipe_with(tmp_path, [{"step": step, "params": good}]))     # the same params without it are fine


@pytest.mark.parametrize("step,key", [("mtp", "min_agreement"), ("mtplx", "min_acceptance")])
def test_a_list_threshold_needs_one_value_per_depth(tmp_path, step, key):
    steps = [{"step": step, "params": {**PROMPTS, "depth": 3, key: [0.9, 0.8]}}]
    with pytest.raises(RecipeError, match=rf"recipe\.yaml:\d+: verify\[0\]\.params: {key} has 2 values; depth is 3"):
        load_recipe(recipe_with(tmp_path, steps))


def test_validate_exits_2_with_one_line(tmp_path):
    path = recipe_with(tmp_path, [{"step": "mtp", "params": {**PROMPTS, "min_agreemnt": [0.5, 0.4, 0.3]}}])
    proc = subprocess.run([sys.executable, "-m", "forgekit.cli", "validate", path], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"recipe\.yaml:\d+: verify\[0\]\.params\.min_agreemnt: unknown key", proc.stderr), proc.stderr


def test_the_shipped_recipes_validate():
    for path in sorted(DEMO_RECIPE.parent.glob("*.yaml")):
        try:
            load_recipe(path)
        except RecipeError as exc:   # recipes whose sources are remote still validate their schema
            assert "verify" not in str(exc), exc
