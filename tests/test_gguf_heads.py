"""GGUF heads stored in llama.cpp block types (Q8_0, Q4_K, Q5_K, Q6_K) or F16, as `--mtp`
head-only files, whole or split by gguf-split: built for real on the wide fixture
(tests/fixtures/make_kquant_heads.py), each head equal to `gguf.quants.dequantize` of the stored
blocks, and "dequantized from <type>" said in the build log, card, report and runtime json."""

from __future__ import annotations

import json
import re
import sys

import gguf
import mlx.core as mx
import numpy as np
import pytest

from conftest import FIXTURE, ROOT, run_doit, write_recipe

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_kquant_heads as kq  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
BLOCK_TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")
HEAD_NAMES = dict(line.split(" -> ") for line in """\
nextn.eh_proj.weight -> mtp.fc.weight
attn_q.weight -> mtp.layers.0.self_attn.q_proj.weight
ffn_down.weight -> mtp.layers.0.mlp.down_proj.weight
nextn.enorm.weight -> mtp.pre_fc_norm_embedding.weight""".splitlines())


@pytest.fixture(scope="session")
def wide(tmp_path_factory):
    """The wide body (hidden 256, random weights, seed 0) and the model it came from."""
    root = tmp_path_factory.mktemp("wide")
    args, trunk, head = kq.build_wide(seed=0)
    kq.write_wide_body(root / "body", trunk)
    return {"root": root, "body": root / "body", "args": args, "trunk": trunk, "head": head}


def head_file(wide, type_name: str, split: int = 0, name: str | None = None):
    """A `--mtp` head-only GGUF of the wide model, matrices stored as type_name (split: tensors per part)."""
    path = wide["root"] / (name or f"wide-MTP-{type_name}.gguf")
    if not path.exists() and not list(path.parent.glob(f"{path.stem}-*-of-*.gguf")):
        kq.write_head_gguf(path, wide["args"], wide["trunk"], wide["head"], type_name, split_max_tensors=split)
    return path


def build(tmp_path, wide, mtp_path, verify="[{step: structural}, {step: load}]"):
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'qwen3.5-dense-mtp.yaml'}\nname: wide-head\n"
                                    f"sources:\n  body: {{path: {wide['body']}}}\n  mtp: {{path: {mtp_path}}}\n"
                                    f"output: {{dir: {tmp_path / 'out'}}}\nverify: {verify}\n")
    return run_doit(recipe, tmp_path)


def dequantized_head(paths) -> dict[str, mx.array]:
    """What the head must hold: gguf-py's dequantization of every stored head tensor, cast to bf16."""
    out = {}
    for path in paths:
        for t in gguf.GGUFReader(str(path)).tensors:
            short = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else None
            if short in HEAD_NAMES:
                values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                out[HEAD_NAMES[short]] = mx.array(values.reshape(shape).astype(np.float32)).astype(mx.bfloat16)
    return out


def assert_head_is(out, expected: dict[str, mx.array]) -> None:
    built = mx.load(str(out / "mtp.safetensors"))
    assert len(expected) == len(HEAD_NAMES)
    for key, want in expected.items():
        assert built[key].dtype == mx.bfloat16 and mx.array_equal(built[key], want).item(), key


@pytest.mark.parametrize("type_name", BLOCK_TYPES + ("F16",))
def test_head_stored_as_type_equals_gguf_dequantize_and_says_so(tmp_path, wide, type_name):
    path = head_file(wide, type_name)
    proc = build(tmp_path, wide, path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert_head_is(out, dequantized_head([path]))
    said = f"dequantized from {type_name}"
    runtime = json.loads((out / "mtplx_runtime.json").read_text())
    report = json.loads((out / "forgekit-report.json").read_text())
    card = (out / "README.md").read_text()
    if type_name in BLOCK_TYPES:
        assert re.search(rf"built mtp\.safetensors: .*{said}", proc.stdout), proc.stdout   # build log
        assert f"MTP head: bf16, {said}" in proc.stdout
        assert said in card
        assert report["mtp_head"]["source"] == said
        assert runtime["mtp_head_source"] == said and runtime["mtp_sidecar"] == "bf16"
    else:   # F16 is a float format read exactly (then cast to bf16): nothing was dequantized
        assert "dequantized" not in proc.stdout + card + json.dumps(report) + json.dumps(runtime)
        assert runtime["mtp_head_source"] == "original precision (no dequantization)"


def test_split_gguf_head_equals_the_whole_file_head(tmp_path, wide):
    parts = sorted(wide["root"].glob("wide-split-Q8_0-*-of-*.gguf")) or kq.write_head_gguf(
        wide["root"] / "wide-split-Q8_0.gguf", wide["args"], wide["trunk"], wide["head"], "Q8_0", split_max_tensors=6)
    assert len(parts) == 3 and parts[0].name == "wide-split-Q8_0-00001-of-00003.gguf"
    proc = build(tmp_path, wide, parts[1])    # any part names the set
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_head_is(tmp_path / "out", dequantized_head(parts))
    assert_head_is(tmp_path / "out", dequantized_head([head_file(wide, "Q8_0")]))


def refused(tmp_path, wide, mtp_path, pattern: str) -> None:
    proc = build(tmp_path, wide, mtp_path)
    output = proc.stdout + proc.stderr
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert re.search(pattern, output), output
    assert not (tmp_path / "out").exists()


def test_split_gguf_with_a_missing_part_is_refused(tmp_path, wide):
    split = tmp_path / "split"
    split.mkdir()
    parts = kq.write_head_gguf(split / "h.gguf", wide["args"], wide["trunk"], wide["head"], "Q8_0", split_max_tensors=6)
    parts[1].unlink()
    refused(tmp_path, wide, parts[0], r"h-00002-of-00003\.gguf of 3 is missing")


def test_truncated_k_quant_block_is_refused(tmp_path, wide):
    src = head_file(wide, "Q4_K")
    reader = gguf.GGUFReader(str(src))
    last = [t for t in reader.tensors if t.tensor_type.name == "Q4_K"][-1]
    cut = tmp_path / "cut-Q4_K.gguf"
    cut.write_bytes(src.read_bytes()[: int(last.data_offset) + int(last.n_bytes) - 100])   # mid-block
    refused(tmp_path, wide, cut, rf"GGUF tensor '{re.escape(last.name)}' \(Q4_K\) data runs past the end .*truncated")
