"""Hostile input that does not fit the corpus pattern (tests/test_corpus.py): sources named
directly, header fields checked in-process, and the proof that the limits leave correct
recipes alone. Anything that could hang runs in a subprocess under HOSTILE_TIMEOUT."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest

from conftest import BODY, HEAD_GGUF, ROOT, run_doit
from forgekit.errors import RecipeError, SourceError
from forgekit.recipe import load_recipe
from forgekit.recipe_yaml import MAX_DEPTH
from forgekit.regex_risk import backtracking_risk
from forgekit.plan.remap import Table
from forgekit.sources.safetensors_dir import read_header, read_index
from test_corpus import GOOD, HOSTILE_TIMEOUT

BASE = ROOT / "recipes" / "qwen3.5-dense-mtp.yaml"


def refused_fast(tmp, text: str, expected: str) -> str:
    """Run the recipe for real; it must end within HOSTILE_TIMEOUT with exit 2 and one line."""
    (tmp / "recipe.yaml").write_text(text)
    proc = run_doit(tmp / "recipe.yaml", tmp, timeout=HOSTILE_TIMEOUT)
    output = proc.stdout + proc.stderr
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert re.search(expected, output), f"expected /{expected}/ in:\n{output}"
    assert not (tmp / "out" / ".forgekit" / "manifest.json").exists()
    return output


# ------------------------------------------------------------ correct recipes still load

LEGIT_ANCHORS = f"""extends: {BASE}
name: anchors-ok
sources:
  body: {{path: {BODY}}}
  mtp: {{path: {HEAD_GGUF}}}
verify:
  - &structural {{step: structural, params: {{head_dtype: BF16}}}}
  - *structural
runtime:
  defaults: &defaults {{draft_depth: 2, temperature: 0.0}}
  profiles: [*defaults, *defaults]
quantization:
  rules:
    - {{name: late-layers, match: 'language_model\\.model\\.layers\\.(\\d+)\\..*', bits: 8, optional: true}}
"""


def test_recipe_with_small_anchors_and_a_normal_regex_validates(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(LEGIT_ANCHORS)
    recipe = load_recipe(path)
    assert recipe.verify[0] == recipe.verify[1] and recipe.verify[0].params.head_dtype == "BF16"
    assert recipe.runtime["profiles"] == [{"draft_depth": 2, "temperature": 0.0}] * 2
    rule = recipe.quantization.rules[0]
    assert re.fullmatch(rule.match, "language_model.model.layers.3.mlp.up_proj")


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_pass_the_limits(path):
    recipe = load_recipe(path)
    patterns = [r.match for rules in recipe.remap.values() for r in rules]
    patterns += [r.match for r in recipe.quantization.rules] + [s.match for s in recipe.output.sidecars]
    assert patterns and all(backtracking_risk(p.replace("{mtp_block}", "0")) is None for p in patterns)


def test_the_remap_table_still_maps_with_a_normal_regex():
    from forgekit.recipe import RemapRule

    rule = RemapRule(name="layers", match=r"language_model\.model\.layers\.(\d+)\..*", to=r"layers.\1")
    result = Table((rule,)).apply(["language_model.model.layers.12.mlp.up_proj.weight"])
    assert [m.output_key for m in result.mapped] == ["layers.12"]


RISKY = [r"(a+)+", r"(a*)*", r"(a|a)*", r"(a|ab)+c", r"(\w+\.?)*x", r"(?:x|(?:a+)+)b", r".*a.*a.*a.*b"]
SAFE = [r"language_model\.model\.layers\.(\d+)\..*", r".*\.layers\.(\d+)\..*", r"(?!mtp\.).*", r"(a|b)*",
        r"(q|k|v)_proj", r"(?:foo|bar|baz)*x", r"\d{1,3}(\.\d+){3}", r"blk\.\d+\.[a-z_.0-9]+"]


@pytest.mark.parametrize("pattern", RISKY)
def test_backtracking_risk_flags_risky_patterns(pattern):
    assert backtracking_risk(pattern)


@pytest.mark.parametrize("pattern", SAFE)
def test_backtracking_risk_passes_ordinary_patterns(pattern):
    assert backtracking_risk(pattern) is None


def test_nesting_up_to_the_limit_loads_and_one_more_level_is_refused(tmp_path):
    def nested(levels: int) -> str:  # `runtime:` is one level, the document mapping another
        return f"extends: {BASE}\nname: n\nruntime: {{x: " + "[" * levels + "]" * levels + "}\n"

    ok = tmp_path / "ok.yaml"
    ok.write_text(nested(MAX_DEPTH - 3))
    assert load_recipe(ok).runtime["x"] is not None
    deep = tmp_path / "deep.yaml"
    deep.write_text(nested(MAX_DEPTH))
    with pytest.raises(RecipeError, match=r"deep\.yaml:3: nested more than"):
        load_recipe(deep)


# ------------------------------------------------------------ extends never echoes a foreign file

@pytest.mark.parametrize("ref", ["{secret}", "{secret_dir}/", "../secret"])
def test_extends_refuses_non_recipes_without_reading_them(tmp_path, ref):
    (tmp_path / "secret").write_text("SECRET-LINE: do not print\nroot:x:0:0\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    text = f"extends: {ref}\nname: x\n".format(secret=tmp_path / "secret", secret_dir=tmp_path)
    (sub / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(sub / "r.yaml")
    assert "is not a recipe" in str(err.value) and "SECRET" not in str(err.value) and "root:x" not in str(err.value)


def test_recipe_path_on_the_command_line_must_be_a_recipe(tmp_path):
    (tmp_path / "secret").write_text("SECRET-LINE: x\n")
    proc = run_doit(tmp_path / "secret", tmp_path, timeout=HOSTILE_TIMEOUT)
    assert proc.returncode == 2 and "SECRET" not in proc.stdout + proc.stderr
    assert "is not a recipe" in proc.stderr


# ------------------------------------------------------------ sources named directly

@pytest.fixture
def sandbox(tmp_path):
    shutil.copytree(BODY, tmp_path / "body")
    shutil.copy(HEAD_GGUF, tmp_path / "head.gguf")
    return tmp_path


def fill(text: str, tmp) -> str:
    return text.replace("{body}", str(tmp / "body")).replace("{gguf}", str(tmp / "head.gguf"))


def test_fifo_listed_in_the_index_is_refused_unopened(sandbox):
    shard = sorted((sandbox / "body").glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    refused_fast(sandbox, fill(GOOD, sandbox), rf"{shard.name}: safetensors file is not a regular file")


def test_fifo_named_as_the_head_gguf_is_refused_unopened(sandbox):
    (sandbox / "head.gguf").unlink()
    os.mkfifo(sandbox / "head.gguf")
    refused_fast(sandbox, fill(GOOD, sandbox), r"head\.gguf: source 'mtp' is neither")


def test_fifo_named_as_a_single_safetensors_source_is_refused_unopened(sandbox):
    os.mkfifo(sandbox / "pipe.safetensors")
    text = fill(GOOD, sandbox).replace(str(sandbox / "body"), str(sandbox / "pipe.safetensors"))
    refused_fast(sandbox, text, r"pipe\.safetensors: safetensors file is not a regular file")


def test_missing_config_is_reported_as_missing_not_as_defaults(sandbox):
    (sandbox / "body" / "config.json").unlink()
    out = refused_fast(sandbox, fill(GOOD, sandbox), r"config\.json: the body source's config\.json is missing")
    assert "config says" not in out


# ------------------------------------------------------------ header fields, in-process

def st_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_shape_product_that_wraps_in_int64_is_refused(tmp_path):
    """2**32 * 2**32 * 2 elements of 2 bytes is 2**66 bytes: 0 in int64 arithmetic, which would
    agree with empty data offsets. Python integers keep the true size."""
    p = tmp_path / "w.safetensors"
    st_file(p, {"t": {"dtype": "BF16", "shape": [2**32, 2**32, 2], "data_offsets": [0, 0]}})
    with pytest.raises(SourceError, match=r"w\.safetensors: tensor 't': BF16\[4294967296, 4294967296, 2\] needs 7378697629483820646\d bytes"):
        read_header(p)


@pytest.mark.parametrize("entry,message", [
    ({"dtype": "BF16", "shape": [True, 2], "data_offsets": [0, 4]}, "shape must be a list"),
    ({"dtype": "BF16", "shape": [2], "data_offsets": [0, 4, 8]}, "data_offsets must be two"),
    ({"dtype": {"x": 1}, "shape": [2], "data_offsets": [0, 4]}, "dtype must be a string, got dict"),
    ({"dtype": "BF16", "shape": [1] * 9, "data_offsets": [0, 2]}, "shape must be a list of at most 8"),
    ({"dtype": "BF16", "shape": [2], "data_offsets": [4, 0]}, "needs 4 bytes but the header gives -4"),
    ({"shape": [2], "data_offsets": [0, 4]}, "dtype must be a string, got NoneType"),
])
def test_every_header_field_is_type_checked(tmp_path, entry, message):
    p = tmp_path / "w.safetensors"
    st_file(p, {"t": entry}, b"\0" * 8)
    with pytest.raises(SourceError, match=re.escape(message)):
        read_header(p)


def test_deeply_nested_header_json_is_one_error(tmp_path):
    p = tmp_path / "w.safetensors"
    raw = b"[" * 100_000 + b"]" * 100_000
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(SourceError, match="header is not valid JSON"):
        read_header(p)


def test_overlong_tensor_name_is_refused(tmp_path):
    p = tmp_path / "w.safetensors"
    st_file(p, {"x" * 600: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0" * 8)
    with pytest.raises(SourceError, match="name longer than 512 characters"):
        read_header(p)


def test_a_well_formed_header_still_reads(tmp_path):
    p = tmp_path / "w.safetensors"
    st_file(p, {"__metadata__": {"format": "pt"}, "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    header, start = read_header(p)
    assert header["t"]["shape"] == [2] and start == p.stat().st_size - 8


@pytest.mark.parametrize("shard", ["/abs/x.safetensors", "../x.safetensors", "a/../../x.safetensors",
                                   "x.bin", "a\\..\\x.safetensors", ""])
def test_index_shard_names_stay_inside_the_model_dir(tmp_path, shard):
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"t": shard}}))
    with pytest.raises(SourceError, match="is not a \\*\\.safetensors file inside the model directory"):
        read_index(idx, str(idx))


def test_index_with_plain_and_nested_shard_names_reads(tmp_path):
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "sub/model-2.safetensors"}}))
    assert read_index(idx, str(idx)) == {"a": "model-1.safetensors", "b": "sub/model-2.safetensors"}


def test_gguf_array_count_past_the_file_is_refused_fast(sandbox):
    """gguf-py alone loops over a doctored array count long past the end of the file."""
    import numpy as np

    from test_corpus import write_gguf

    head = sandbox / "head.gguf"
    write_gguf(head, "qwen35", 1, {"output_norm.weight": np.ones(64, np.float32)})
    raw = bytearray(head.read_bytes())
    key = b"qwen35.nextn_predict_layers"
    w = __import__("gguf").GGUFWriter(sandbox / "arr.gguf", "qwen35")
    w.add_array("doctored.counts", [1, 2, 3])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    arr = (sandbox / "arr.gguf").read_bytes()
    name = b"doctored.counts"
    at = arr.index(name) + len(name)
    entry = arr[at - len(name) - 8: at + 4 + 4 + 8 + 3 * 4]  # key string, type ARRAY, elem type, count, items
    pos = raw.index(key) - 8
    raw[pos:pos] = entry
    kv = struct.unpack_from("<Q", raw, 16)[0]
    struct.pack_into("<Q", raw, 16, kv + 1)
    count_at = pos + 8 + len(name) + 4 + 4
    assert struct.unpack_from("<Q", raw, count_at)[0] == 3
    struct.pack_into("<Q", raw, count_at, 2**62)
    head.write_bytes(bytes(raw))
    refused_fast(sandbox, fill(GOOD, sandbox), r"head\.gguf: not a readable GGUF file: ")
