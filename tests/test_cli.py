"""`forgekit validate|plan|inspect|new|lock|verify` on the tiny fixture: the output content is
asserted, not just exit codes. Most calls run `forgekit.cli.main` in process (fast); the
console script itself runs in a subprocess where exit codes and stderr matter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from test_hub import populate_hub_cache

from conftest import BODY, BODY_WITH_MTP, HEAD_GGUF, ROOT, demo_recipe, run_doit, write_recipe
from forgekit.cli import main
from forgekit.sources.safetensors_dir import read_header

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FORGEKIT = Path(sys.executable).with_name("forgekit")


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([str(FORGEKIT), *map(str, args)], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path / "cache"))


def body_tensor_names() -> list[str]:
    return sorted(json.loads((BODY / "model.safetensors.index.json").read_text())["weight_map"])


def quantized_head_gguf(dst: Path) -> Path:
    """The fixture's head re-stored as a Q8_0 GGUF (matrices quantized, norms F32), like a
    release that only ships a quantized file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(HEAD_GGUF))
    fields = reader.fields
    count = int(fields["qwen35.block_count"].parts[-1][0])
    nextn = int(fields["qwen35.nextn_predict_layers"].parts[-1][0])
    block = count - nextn
    w = gguf.GGUFWriter(str(dst), "qwen35")
    w.add_block_count(count)
    w.add_nextn_predict_layers(nextn)
    for t in reader.tensors:
        if not t.name.startswith(f"blk.{block}."):
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        if len(shape) == 2:
            w.add_tensor(t.name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ---------------------------------------------------------------- validate


def test_validate_reports_sources_files_and_optional_rules(tmp_path, capsys):
    recipe = demo_recipe(tmp_path)
    code, out, err = cli(capsys, "validate", recipe)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"ok: recipe 'demo-under-test' is valid ({recipe})"
    assert lines[1] == "  chain:   qwen3.5-dense-mtp.yaml -> tiny-demo.yaml -> demo.yaml"
    n_body = len(body_tensor_names())
    assert f"  source body: path {BODY}: {n_body} tensors, {n_body - 2} mapped, 2 dropped" in lines
    assert any(line.startswith(f"  source mtp: path {HEAD_GGUF}: ") and line.endswith(", 15 mapped, "
                                                                                      f"{_gguf_count() - 15} dropped")
               for line in lines), out
    assert "mtp.safetensors (15 tensors, " in out and "model.safetensors (" in out
    assert "  warning: remap.body[1] rule 'body-own-mtp-head' (optional) matches no tensor of source 'body'" in lines

    code, out, _ = cli(capsys, "validate", recipe, "--json")
    data = json.loads(out)
    assert code == 0 and data["valid"] is True and data["recipe"] == "demo-under-test"
    assert data["files"]["mtp.safetensors"] == {"tensors": 15, "bytes": data["files"]["mtp.safetensors"]["bytes"],
                                                "indexed": False, "quantized": 0}
    assert data["files"]["model.safetensors"]["indexed"] is True
    assert data["tensor_count"] == n_body - 2 + 15
    assert data["dropped"]["body"] == {"vision-tower": 2}
    assert {s["role"]: s["path"] for s in data["sources"]} == {"body": str(BODY), "mtp": str(HEAD_GGUF)}


def _gguf_count() -> int:
    return len(gguf.GGUFReader(str(HEAD_GGUF)).tensors)


def test_validate_errors_are_one_line_with_file_and_line(tmp_path):
    bad = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'tiny-demo.yaml'}\nname: bad\n"
                                 "remap:\n  body:\n    - {name: typo, match: 'model\\.visul\\..*', drop: true}\n"
                                 "    - {name: rest, match: '.*', drop: true}\n")
    proc = run_cli("validate", bad)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"forgekit: {bad}:5: remap.body[0] rule 'typo' matched no tensor of source 'body' "
                           f"({BODY}); fix the pattern or mark it optional: true\n")
    proc = run_cli("validate", bad, "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"valid": False, "error": proc.stderr.removeprefix("forgekit: ").strip(),
                                       "error_type": "PlanError"}
    schema = write_recipe(tmp_path, "extends: qwen3.5-dense-mtp\nname: s\nsources:\n  body: {path: x, revison: 1}\n",
                          "schema.yaml")
    proc = run_cli("validate", schema, "--schema-only")
    assert proc.returncode == 2
    assert proc.stderr == f"forgekit: {schema}:4: sources.body.revison: unknown key\n"


# ---------------------------------------------------------------- plan


def test_plan_table_and_json_agree_with_the_built_files(tmp_path, capsys, built_demo):
    recipe = demo_recipe(tmp_path, out=built_demo)
    code, out, err = cli(capsys, "plan", recipe, "--json")
    assert code == 0, err
    report = json.loads(out)
    for name, info in report["files"].items():
        header, _ = read_header(built_demo / name)
        built_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        assert info["bytes"] == built_bytes, name
        assert info["tensors"] == len([r for r in report["tensors"] if r["file"] == name])
    assert report["total_bytes"] == sum(f["bytes"] for f in report["files"].values())
    rows = {r["output"]: r for r in report["tensors"]}
    conv = rows["language_model.model.layers.0.linear_attn.conv1d.weight"]
    assert conv["transforms"] == ["conv1d_layout"] and conv["source"] == "body:model.language_model.layers.0.linear_attn.conv1d.weight"
    fc = rows["mtp.fc.weight"]
    assert fc["file"] == "mtp.safetensors" and fc["source"] == "mtp:blk.4.nextn.eh_proj.weight"
    assert fc["stored_as"] == "BF16" and fc["quant"] == "bfloat16" and fc["quant_rule"] == "mtp-head-bf16"
    q = rows["language_model.model.layers.3.self_attn.q_proj.weight"]
    assert q["quant"] == "4-bit g64 affine" and q["quant_rule"] == "default"
    assert rows["language_model.model.norm.weight"]["transforms"] == ["norm_shift"]

    code, out, err = cli(capsys, "plan", recipe)
    assert code == 0, err
    assert out.splitlines()[0] == f"plan for recipe 'demo-under-test' ({recipe}) -> {built_demo}"
    assert "mtp.safetensors  (15 tensors, " in out and "sidecar: not in the index" in out
    table_rows = [line for line in out.splitlines() if "mtp.fc.weight" in line]
    assert len(table_rows) == 1
    for cell in ("mtp:blk.4.nextn.eh_proj.weight [BF16]", "bfloat16 (mtp-head-bf16)", "64x128"):
        assert cell in table_rows[0]
    conv_row = next(line for line in out.splitlines() if "layers.0.linear_attn.conv1d.weight" in line)
    assert "conv1d_layout" in conv_row
    total_row = next(line for line in out.splitlines() if "all files" in line)
    assert str(report["total_bytes"]) in total_row and str(report["tensor_count"]) in total_row
    assert "warnings (1):" in out and "! remap.body[1] rule 'body-own-mtp-head' (optional)" in out

    code, out, _ = cli(capsys, "plan", recipe, "--summary")
    assert "totals per file" in out and "mtp.fc.weight" not in out


def test_plan_warns_about_group_sizes_and_a_quantized_head(tmp_path, capsys):
    q8 = quantized_head_gguf(tmp_path / "src" / "head-Q8_0.gguf")
    recipe = demo_recipe(tmp_path, extra=f"sources:\n  mtp: {{path: {q8}}}\n"
                                         "quantization: {default: {bits: 4, group_size: 128}}\n")
    code, out, err = cli(capsys, "plan", recipe, "--json")
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert ("language_model.model.layers.0.mlp.gate_proj.weight: kept in bfloat16: last dim 64 not divisible "
            "by group size 128") in warnings
    assert (f"mtp.fc.weight: source {q8} stores 'blk.4.nextn.eh_proj.weight' as Q8_0; it is dequantized, "
            f"not original precision") in warnings
    assert "remap.mtp[15] rule 'gguf-trunk' (optional) matches no tensor of source 'mtp'" in warnings
    rows = {r["output"]: r for r in json.loads(out)["tensors"]}
    assert rows["language_model.model.layers.0.mlp.down_proj.weight"]["quant"] == "4-bit g128 affine"
    assert rows["language_model.model.layers.0.mlp.gate_proj.weight"]["quant"] == "bfloat16"
    code, out, _ = cli(capsys, "plan", recipe, "--summary")
    assert "as Q8_0; it is dequantized" in out and "not divisible by group size 128" in out


# ---------------------------------------------------------------- inspect


def test_inspect_safetensors_dir_gguf_and_norm_conventions(tmp_path, capsys):
    code, out, err = cli(capsys, "inspect", BODY)
    assert code == 0, err
    names = body_tensor_names()
    assert out.splitlines()[0].startswith(f"{BODY}: safetensors, 2 file(s), {len(names)} tensors, ")
    assert "  architectures = ['Qwen3_5ForConditionalGeneration']" in out
    assert "  text_config.hidden_size = 64" in out
    assert "MTP head: 0 tensors" in out
    assert "! config declares an MTP head but the weights carry no mtp.* keys" in out
    embed = next(line for line in out.splitlines() if "model.language_model.embed_tokens.weight" in line)
    assert "128x64" in embed and "bfloat16" in embed and str(128 * 64 * 2) in embed

    code, out, _ = cli(capsys, "inspect", BODY, "--json")
    data = json.loads(out)
    assert sorted(t["name"] for t in data["tensors"]) == names and data["tensor_count"] == len(names)
    a_log = next(t for t in data["tensors"] if t["name"].endswith("layers.0.linear_attn.A_log"))
    assert a_log["dtype"] == "float32" and a_log["stored_as"] == "F32"

    code, out, _ = cli(capsys, "inspect", HEAD_GGUF, "--match", r"^blk\.4\.")
    assert "  general.architecture = qwen35" in out and "  qwen35.nextn_predict_layers = 1" in out
    assert "MTP head: block blk.4 15 tensors (BF16, F32)" in out
    q = next(line for line in out.splitlines() if "blk.4.attn_q.weight" in line)
    assert "BF16" in q and "bfloat16" in q and "token_embd" not in out.split("MTP head")[1]

    code, out, _ = cli(capsys, "inspect", BODY_WITH_MTP, "--norms", "--summary")
    assert "MTP head: 15 tensors" in out
    assert "MTP head norms look zero-centred (HF: applied as 1+w)" in out
    assert "  mtp.pre_fc_norm_embedding.weight = " in out and "  model.language_model.norm.weight = " in out
    assert "layers.0.input_layernorm" not in out.replace("mtp.layers.0.input_layernorm", "")  # trunk norms: --json
    assert "final norm mean" in out and "zero-centred (HF)" in out.split("final norm mean")[1]
    code, out, _ = cli(capsys, "inspect", HEAD_GGUF, "--norms", "--summary")
    assert "MTP head norms look absolute (MLX/GGUF)" in out
    assert "  blk.4.nextn.enorm.weight = " in out and "  output_norm.weight = " in out and "blk.0." not in out
    assert "absolute (MLX/GGUF)" in out.split("final norm mean")[1]

    code, out, _ = cli(capsys, "inspect", HEAD_GGUF, "--stats", r"blk\.4\.nextn\.enorm\.weight", "--summary")
    stats = next(line for line in out.splitlines() if line.startswith("stats blk.4.nextn.enorm.weight: mean "))
    mean = float(stats.split("mean ")[1].split()[0])
    assert 0.5 < mean < 3.0

    q8 = quantized_head_gguf(tmp_path / "src" / "head-Q8_0.gguf")
    code, out, _ = cli(capsys, "inspect", q8, "--summary")
    assert "MTP head: block blk.4 15 tensors (F32, Q8_0)" in out
    assert "! head stored quantized: a head built from it is dequantized, not original precision" in out


def test_inspect_repo_id_from_the_local_hub_cache(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    commit = populate_hub_cache(hub, "org/finetune", {p.name: p for p in BODY.iterdir() if p.is_file()})
    populate_hub_cache(hub, "org/finetune-GGUF", {"ft-MTP-BF16.gguf": HEAD_GGUF})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, out, err = cli(capsys, "inspect", "org/finetune", "--summary")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith(f"org/finetune@main (cache: {hub}") and commit in first
    assert f"safetensors, 2 file(s), {len(body_tensor_names())} tensors" in first
    code, out, _ = cli(capsys, "inspect", "org/finetune-GGUF", "--summary")
    assert "file ft-MTP-BF16.gguf: gguf" in out.splitlines()[0] and "MTP head: block blk.4 15 tensors" in out
    code, out, err = cli(capsys, "inspect", "org/not-downloaded")
    assert code == 2 and out == ""
    assert err == "forgekit: org/not-downloaded: not in the local Hugging Face cache at revision main (inspect never downloads)\n"
    code, out, err = cli(capsys, "inspect", "no-such-thing")
    assert code == 2 and err == "forgekit: no-such-thing: neither an existing file or directory nor an HF repo id (org/name)\n"


# ---------------------------------------------------------------- new


def test_new_writes_a_validated_recipe_and_doit_builds_it(tmp_path, built_demo):
    out_dir = tmp_path / "build" / "my-finetune"
    # --base tiny-demo: the demo's verify probes speak the fixture's token language (the default
    # base, qwen3.5-dense-mtp, probes with English text; see test_new_with_hf_head_and_refusals).
    proc = run_cli("new", "my-finetune", "--body", BODY, "--mtp", HEAD_GGUF, "--output", out_dir, "--base", "tiny-demo",
                   "--description", "My finetune", cwd=tmp_path, env={"FORGEKIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    recipe = tmp_path / "recipes" / "my-finetune.yaml"
    text = recipe.read_text()
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "extends: tiny-demo", "name: my-finetune", 'description: "My finetune"', "sources:",
        f'  body: {{path: "{BODY}"}}', f'  mtp:  {{path: "{HEAD_GGUF}"}}', f'output: {{dir: "{out_dir}"}}']
    lines = proc.stdout.splitlines()
    assert lines[0] == f"wrote {recipe}"
    assert any(line.startswith("validated: ") and "output tensors in 2 files" in line for line in lines)
    assert lines[-1] == "build it: forgekit build my-finetune"
    assert not [p for p in recipe.parent.iterdir() if p.name != "my-finetune.yaml"]

    build = run_doit("my-finetune", tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    for name in ("model.safetensors", "mtp.safetensors"):
        ours, ref = mx.load(str(out_dir / name)), mx.load(str(built_demo / name))
        assert sorted(ours) == sorted(ref)
        assert all(mx.array_equal(ours[k], ref[k]).item() for k in ref), name
    assert (tmp_path / "build" / "my-finetune.lock.json").is_file()

    again = run_cli("new", "my-finetune", "--body", BODY, "--mtp", HEAD_GGUF, cwd=tmp_path)
    assert again.returncode == 2 and again.stderr == f"forgekit: {recipe} already exists (use --force to overwrite)\n"


def test_new_with_hf_head_and_refusals(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "new", "with-own-head", "--body", BODY_WITH_MTP, "--mtp", "body", "--no-validate")
    assert code == 0, err
    text = (tmp_path / "recipes" / "with-own-head.yaml").read_text()
    assert "\nextends: qwen3.5-dense-mtp\nname: with-own-head\n" in text
    assert f'  mtp:  {{path: "{BODY_WITH_MTP}", table: "mtp_hf"}}   # head in HF convention (mtp.* keys)' in text
    code, out, err = cli(capsys, "validate", tmp_path / "recipes" / "with-own-head.yaml", "--json")
    assert code == 0 and json.loads(out)["files"]["mtp.safetensors"]["tensors"] == 15

    # A body without a head cannot be its own head source: the recipe is not written.
    code, out, err = cli(capsys, "new", "no-head", "--body", BODY, "--mtp", "body")
    assert code == 2 and out == ""
    target = tmp_path / "recipes" / "no-head.yaml"
    assert err.startswith("forgekit: ") and len(err.splitlines()) == 1
    assert "--mtp body: no MTP head tensors there" in err and "graft one" in err   # found by inspecting
    assert not target.exists() and sorted(p.name for p in target.parent.iterdir()) == ["with-own-head.yaml"]

    code, out, err = cli(capsys, "new", "hub", "--body", "org/ft@v1.0", "--mtp", "org/ft-GGUF/ft-MTP-BF16.gguf",
                         "--no-validate")
    assert code == 0
    text = (tmp_path / "recipes" / "hub.yaml").read_text()
    assert '  body: {repo: "org/ft", revision: "v1.0"}' in text
    assert '  mtp:  {repo: "org/ft-GGUF", revision: "main", file: "ft-MTP-BF16.gguf"}' in text
    code, out, err = cli(capsys, "new", "bad name", "--body", BODY, "--mtp", HEAD_GGUF)
    assert code == 2 and "recipe name 'bad name' must be letters" in err
    code, out, err = cli(capsys, "new", "x", "--body", tmp_path / "missing", "--mtp", HEAD_GGUF)
    assert code == 2 and err == f"forgekit: --body {tmp_path / 'missing'}: neither an existing path nor an HF repo (org/name[/file.gguf][@revision])\n"


# ---------------------------------------------------------------- verify


def test_verify_an_existing_directory(tmp_path, built_demo):
    recipe = demo_recipe(tmp_path, out=built_demo)
    proc = run_cli("verify", built_demo, "--recipe", recipe, env={"FORGEKIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "verification:" in proc.stdout and "structural" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith(f"ok: {built_demo} verified against recipe {recipe} (structural")
    proc = run_cli("verify", built_demo, "--recipe", recipe, "--json", env={"FORGEKIT_CACHE": str(tmp_path / "cache")})
    report = json.loads(proc.stdout)
    assert report["passed"] is True and report["steps"][0] == "structural"

    broken = tmp_path / "broken"
    shutil.copytree(built_demo, broken)
    (broken / "mtp.safetensors").unlink()
    proc = run_cli("verify", broken, "--recipe", recipe, env={"FORGEKIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("forgekit: verify step 'structural' failed: ")
    assert "mtp.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_cache_ls_and_gc_after_output_is_gone(tmp_path):
    """`forgekit cache ls` shows the demo's objects as used; once the output dir is gone, `gc` prunes them."""
    recipe = demo_recipe(tmp_path, extra="verify: []\n")
    assert run_doit(recipe, tmp_path).returncode == 0
    cache = tmp_path / "cache"

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "forgekit.cli", "cache", *argv, "--root", str(cache)],
                              capture_output=True, text=True, timeout=300)

    listed = json.loads(cli("ls", "--json").stdout)
    files = sorted(r["file"] for r in listed)
    assert "mtp.safetensors" in files and any(f.startswith("model") for f in files)
    assert all(r["referenced"] and "demo-under-test" in r["used_by"] for r in listed)
    kept = json.loads(cli("gc", "--json").stdout)
    assert kept["removed"] == [] and len(cli("ls", "--json").stdout) > 2
    shutil.rmtree(tmp_path / "out")
    dry = json.loads(cli("gc", "--dry-run", "--json").stdout)
    assert len(dry["removed"]) == len(listed) and json.loads(cli("ls", "--json").stdout)
    gone = json.loads(cli("gc", "--json").stdout)
    assert gone["freed_bytes"] == sum(r["size"] for r in listed)
    assert json.loads(cli("ls", "--json").stdout) == []
