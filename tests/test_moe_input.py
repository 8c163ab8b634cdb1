"""Bad MoE input is one line naming the file and tensor, exit 2, nothing published: numbered
experts with a gap, a duplicate or one too many, a dense GGUF head under the MoE base (and the
reverse), an expert count that disagrees with the body's config, a fused tensor of odd size (HF
`experts.gate_up_proj` or llama.cpp's GGUF `ffn_gate_up_exps`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import HEAD_GGUF, ROOT, run_doit, write_recipe
from test_moe import HEADS, MOE, moe_recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NUMBERED = "mtp.layers.0.mlp.experts.{}.{}_proj.weight"


def _head(tmp: Path, edit, source: str = "head_numbered.safetensors") -> str:
    head = dict(mx.load(str(MOE / source)))
    edit(head)
    path = tmp / "head.safetensors"
    mx.save_safetensors(str(path), head, metadata={"format": "pt"})
    return f"{{path: {path}, table: mtp_hf}}"


def _refused(tmp: Path, recipe: Path, *needles: str) -> str:
    proc = run_doit(recipe, tmp)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forgekit: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not any(p.is_dir() and p.name not in ("cache",) for p in tmp.iterdir()), list(tmp.iterdir())
    return lines[0]


def test_missing_expert_index_is_named(tmp_path):
    def drop_5(head):
        for part in ("gate", "up", "down"):
            head.pop(NUMBERED.format(5, part))
    line = _refused(tmp_path, moe_recipe(tmp_path, "gap", _head(tmp_path, drop_5)), "no source tensor for index 5",
                    "text_config.num_experts = 8", "mtp-experts-numbered")
    assert "head.safetensors" in line


def test_duplicate_expert_index_is_named(tmp_path):
    def duplicate(head):
        for part in ("gate", "up", "down"):
            head[NUMBERED.format("03", part)] = head[NUMBERED.format(3, part)]
    _refused(tmp_path, moe_recipe(tmp_path, "dup", _head(tmp_path, duplicate)), "both give index 3")


def test_one_expert_too_many_is_named(tmp_path):
    def extra(head):
        for part in ("gate", "up", "down"):
            head[NUMBERED.format(8, part)] = head[NUMBERED.format(0, part)]
    _refused(tmp_path, moe_recipe(tmp_path, "extra", _head(tmp_path, extra)), "has index 8", "only 0..7")


def test_fused_tensor_of_odd_size_is_named(tmp_path):
    def odd(head):
        head["mtp.layers.0.mlp.experts.gate_up_proj"] = head["mtp.layers.0.mlp.experts.gate_up_proj"][:, :127]
    recipe = moe_recipe(tmp_path, "odd", _head(tmp_path, odd, "head_fused.safetensors"))
    _refused(tmp_path, recipe, "'mtp.layers.0.mlp.experts.gate_up_proj'", "odd size 127", "head.safetensors")


def test_fused_gguf_tensor_of_odd_size_is_named(tmp_path):
    """llama.cpp's fused ffn_gate_up_exps [E, 2I, H] with an odd axis -2 cannot be halved."""
    import variants  # noqa: F401  (puts tests/fixtures on sys.path)
    from make_tiny_variants import read_gguf, write_gguf

    fields, tensors = read_gguf(MOE / "head_gate_up.gguf")
    odd = [(n, type(t)(t.dtype, t.data[:, :127]) if ".ffn_gate_up_exps." in n else t) for n, t in tensors]
    write_gguf(tmp_path / "odd.gguf", fields, odd)
    recipe = moe_recipe(tmp_path, "odd", f"{{path: {tmp_path / 'odd.gguf'}}}")
    _refused(tmp_path, recipe, "odd.gguf", "'blk.4.ffn_gate_up_exps.weight'", "odd size 127", "mtp-experts-gate-up")


def test_expert_count_that_disagrees_with_the_config_is_named(tmp_path):
    body = tmp_path / "body16"
    shutil.copytree(MOE / "body", body)
    config = json.loads((body / "config.json").read_text())
    config["text_config"]["num_experts"] = 16
    (body / "config.json").write_text(json.dumps(config))
    recipe = moe_recipe(tmp_path, "count", HEADS["gguf"], body=body)
    # (the recipe's output dir must not be the copied body's parent: it is its own subdir)
    line = _refused_allowing(tmp_path, recipe, {"body16"})
    assert "leading axis 8" in line and "text_config.num_experts is 16" in line, line


def _refused_allowing(tmp: Path, recipe: Path, keep: set[str]) -> str:
    proc = run_doit(recipe, tmp)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forgekit: "), proc.stderr
    assert not any(p.is_dir() and p.name not in keep | {"cache"} for p in tmp.iterdir()), list(tmp.iterdir())
    return lines[0]


def test_dense_gguf_head_under_the_moe_base_is_named(tmp_path):
    recipe = moe_recipe(tmp_path, "dense-head", f"{{path: {HEAD_GGUF}}}")
    _refused(tmp_path, recipe, "tiny-MTP-BF16.gguf", "blk.4.ffn_")


def test_moe_gguf_head_under_the_dense_base_is_named(tmp_path):
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'qwen3.5-dense-mtp.yaml'}\nname: moe-head\n"
                                    f"sources:\n  body: {{path: {ROOT / 'tests/fixtures/tiny/body'}}}\n"
                                    f"  mtp: {{path: {MOE / 'head.gguf'}}}\noutput: {{dir: {tmp_path / 'o'}}}\n"
                                    f"verify: []\n")
    _refused(tmp_path, recipe, "head.gguf", "mtp-gate")
