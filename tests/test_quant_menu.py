"""The quantization menu: every row's body equals `mlx_lm.convert` with the same flags, tensor
by tensor, byte for byte, on the tiny fixture; and mlx's refusals are validate-time errors."""

from __future__ import annotations

import itertools

import mlx.core as mx
import pytest
from mlx_lm.convert import convert

from conftest import BODY, HEAD_GGUF, ROOT, write_recipe
from forgekit.build.shard import write_shard
from forgekit.errors import RecipeError
from forgekit.plan import make_plan
from forgekit.quant_modes import QUANT_MODES
from forgekit.recipe import load_recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
QUANT = ROOT / "recipes" / "quant"
SOURCES = f"sources:\n  body: {{path: {BODY}}}\n  mtp: {{path: {HEAD_GGUF}}}\n"

# (row id, recipe text after `extends`, mlx_lm.convert keyword arguments)
AFFINE = [(f"affine-{b}bit-g{g}", f"{ROOT / 'recipes' / 'qwen3.5-dense-mtp.yaml'}\n"
           f"quantization: {{default: {{bits: {b}, group_size: {g}}}}}\n",
           {"q_bits": b, "q_group_size": g})
          for b, g in itertools.product((2, 3, 4, 5, 6, 8), (32, 64, 128))]
MODES = [(m, f"{QUANT / (m + '.yaml')}\n", {"q_mode": m}) for m in ("mxfp4", "nvfp4", "mxfp8")]
MIXED = [(p, f"{QUANT / (p + '.yaml')}\n", {"quant_predicate": p, "q_group_size": 64})
         for p in ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")]
FP16 = [("fp16-body", f"{QUANT / 'fp16-body.yaml'}\n", {"dtype": "float16"})]
ROWS = AFFINE + MODES + MIXED + FP16


def safetensors_of(directory) -> dict[str, mx.array]:
    out = {}
    for f in sorted(directory.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def module_params(config: dict, path: str) -> tuple:
    q = config["quantization"]
    entry = q.get(path, q)
    return (entry["bits"], entry["group_size"], entry.get("mode", "affine"))


@pytest.mark.parametrize("row,extends,flags", ROWS, ids=[r[0] for r in ROWS])
def test_menu_row_equals_mlx_lm_convert(row, extends, flags, tmp_path):
    ref = tmp_path / "mlx-lm"
    convert(str(BODY), str(ref), quantize=True, **flags)
    recipe = load_recipe(write_recipe(tmp_path, f"extends: {extends}name: menu-{row}\n{SOURCES}"
                                                f"output: {{dir: {tmp_path / 'out'}}}\nverify: []\n"))
    plan = make_plan(recipe)
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    for f in plan.indexed_files:
        write_shard(ours_dir / f, plan.files[f], plan.sources)
    ours, theirs = safetensors_of(ours_dir), safetensors_of(ref)
    assert sorted(ours) == sorted(theirs)
    for k, theirs_k in theirs.items():
        assert ours[k].dtype == theirs_k.dtype and ours[k].shape == theirs_k.shape, k
        assert bytes(memoryview(ours[k])) == bytes(memoryview(theirs_k)), f"{k} differs from mlx_lm.convert"
    import json

    from forgekit.build.outputs import config_json
    ours_config, theirs_config = config_json(plan), json.loads((ref / "config.json").read_text())
    for k in (k for k in theirs if k.endswith(".scales")):   # config.json loads each module the same way
        path = k[: -len(".scales")]
        assert module_params(ours_config, path) == module_params(theirs_config, path), path


def test_mode_table_is_what_the_installed_mlx_accepts():
    a = mx.random.normal((4, 256))
    for mode, group, bits in itertools.product(QUANT_MODES, (16, 32, 64, 128), (2, 3, 4, 5, 6, 8)):
        spec = QUANT_MODES[mode]
        try:
            parts = mx.quantize(a, group_size=group, bits=bits, mode=mode)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == (bits in spec.bits and group in spec.group_sizes), (mode, group, bits)
        if accepted:
            assert len(parts) == (3 if spec.biases else 2) and (parts[1].dtype == mx.uint8) != spec.float_scales


@pytest.mark.parametrize("quant,words", [
    ("{default: {bits: 4, group_size: 16}}", ["quantization.default", "mode affine takes", "group size 16"]),
    ("{default: {bits: 4, group_size: 64, mode: mxfp4}}", ["quantization.default", "mode mxfp4 takes bits 4 at group size 32"]),
    ("{rules: [{name: head-fp8, match: 'mtp\\..*', mode: mxfp8}]}", ["quantization.rules[0] rule 'head-fp8'", "mode mxfp8"]),
    ("{rules: [{name: v-more, match: '.*v_proj', bits: 6, layers: {below: [1, 8]}}]}", ["rule 'v-more'", "(?P<layer>"]),
])
def test_combination_mlx_refuses_is_a_validate_error_naming_the_rule(tmp_path, quant, words):
    path = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'tiny-demo.yaml'}\nname: bad-quant\n"
                                  f"quantization: {quant}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: "), message
    for w in words:
        assert w in message, message


def test_a_child_anywhere_extends_a_shipped_snippet_by_relative_path(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, f"extends: quant/mxfp4.yaml\nname: snippet-child\n{SOURCES}"))
    assert recipe.recipe_files[-2] == str((QUANT / "mxfp4.yaml").resolve())
    assert recipe.quantization.default.mode == "mxfp4" and recipe.quantization.default.group_size == 32
