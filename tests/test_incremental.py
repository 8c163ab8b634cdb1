"""Incremental builds, proven by counting the doit tasks that ran (real doit runs in temp dirs).

Every test builds the tiny fixture with a small `output.max_shard_bytes`, so the trunk has
several shards (lm_head+embed, then one decoder layer per shard), then changes one thing and
checks exactly which tasks doit executed and which output bytes changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BODY_WITH_MTP, DEMO_RECIPE, ROOT, ran_tasks, run_doit, write_recipe

SHARD_BYTES = 100_000
STRUCTURAL = "verify: [{step: structural, params: {head_dtype: BF16}}]"
MTP_RULE = r"{name: mtp-head-bf16, match: 'mtp\..*', quantize: false}"
LATE = ["build:stage", "build:verify:0:structural", "build:publish"]


def base_recipe(work: Path, name: str = "inc", out: Path | None = None, verify: str = STRUCTURAL,
                extra: str = "", file: str = "recipe.yaml") -> Path:
    out = out or work / "out"
    text = (f"# incremental-build test recipe\nextends: {DEMO_RECIPE}\nname: {name}\n"
            f"output: {{dir: {out}, max_shard_bytes: {SHARD_BYTES}}}\n{verify}\n{extra}")
    return write_recipe(work, text, file)


def child_recipe(work: Path, parent: Path, text: str, file: str = "child.yaml", name: str = "inc") -> Path:
    return write_recipe(work, f"extends: {parent}\nname: {name}\n{text}", file)


def build(recipe: Path, work: Path, **kw) -> subprocess.CompletedProcess:
    proc = run_doit(recipe, work, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def shards_ran(proc) -> list[str]:
    return [t.removeprefix("build:shard:") for t in ran_tasks(proc) if t.startswith("build:shard:")]


def trunk_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("model*.safetensors"))


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def model_bytes(out: Path) -> dict[str, bytes]:
    """The files that must not change unless their inputs do (the report holds verify timings)."""
    return {n: b for n, b in file_bytes(out).items() if n.endswith(".safetensors") or n.endswith(".json")
            and n not in ("forgekit-report.json", "mtplx_runtime.json")}


def model_bytes_of(files: dict[str, bytes]) -> dict[str, bytes]:
    return {n: b for n, b in files.items() if n.endswith(".safetensors") or n.endswith(".json")
            and n not in ("forgekit-report.json", "mtplx_runtime.json")}


def layer_files(out: Path, layer: int) -> set[str]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    return {f for k, f in index.items() if k.startswith(f"language_model.model.layers.{layer}.")}


@pytest.fixture
def built(tmp_path):
    """A cold build of the base test recipe; returns (work dir, recipe, output dir, cold proc)."""
    recipe = base_recipe(tmp_path)
    proc = build(recipe, tmp_path)
    out = tmp_path / "out"
    return tmp_path, recipe, out, proc


def test_cold_build_has_several_shards_and_runs_every_task(built):
    work, recipe, out, proc = built
    files = trunk_files(out)
    assert len(files) >= 4, files
    assert sorted(shards_ran(proc)) == sorted(files + ["mtp.safetensors"])
    assert ran_tasks(proc)[-3:] == LATE
    # Stable layout: every decoder layer lives in exactly one shard.
    for layer in range(4):
        assert len(layer_files(out, layer)) == 1
    # One progress line per shard (stdout is not a TTY here).
    for f in files + ["mtp.safetensors"]:
        assert sum(line.strip().startswith(f"built {f}:") for line in proc.stdout.splitlines()) == 1, proc.stdout


def test_noop_rebuild_runs_nothing(built):
    work, recipe, out, _ = built
    before = file_bytes(out)
    proc = build(recipe, work)
    assert ran_tasks(proc) == [], proc.stdout
    assert file_bytes(out) == before


def test_comment_and_formatting_edit_rebuilds_nothing(built):
    work, recipe, out, _ = built
    text = recipe.read_text()
    recipe.write_text("# a new comment at the top\n\n" + text.replace("\n", "   # trailing comment\n", 1) + "\n# end\n")
    proc = build(recipe, work)
    assert ran_tasks(proc) == [], proc.stdout


def test_quant_rule_on_one_layer_rebuilds_only_that_layers_shard(built):
    work, recipe, out, _ = built
    before = file_bytes(out)
    target = layer_files(out, 1)
    child = child_recipe(work, recipe, "quantization:\n  rules:\n"
                         f"    - {MTP_RULE}\n"
                         r"    - {name: layer1-8bit, match: 'language_model\.model\.layers\.1\..*', bits: 8}" "\n")
    proc = build(child, work)
    assert sorted(shards_ran(proc)) == sorted(target), proc.stdout
    assert ran_tasks(proc)[-3:] == LATE
    after = file_bytes(out)
    assert trunk_files(out) == sorted(f for f in before if f.startswith("model-")), "shard boundaries moved"
    for name in before:
        if name.endswith(".safetensors"):
            assert (after[name] == before[name]) == (name not in target), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["language_model.model.layers.1.mlp.down_proj"]["bits"] == 8
    # And back: the old object is still in the cache, so nothing is recomputed.
    proc = build(recipe, work)
    assert sorted(shards_ran(proc)) == sorted(target) and ran_tasks(proc)[-3:] == LATE, proc.stdout
    assert all(f"cached {f}" in proc.stdout for f in target), proc.stdout
    assert model_bytes(out) == {n: b for n, b in before.items() if n in model_bytes(out)}


def test_head_source_change_rebuilds_only_mtp(built):
    work, recipe, out, _ = built
    before = file_bytes(out)
    child = child_recipe(work, recipe, f"sources:\n  mtp: {{path: {BODY_WITH_MTP}, table: mtp_hf}}\n")
    proc = build(child, work)
    assert shards_ran(proc) == ["mtp.safetensors"], proc.stdout
    assert ran_tasks(proc)[-3:] == LATE
    after = file_bytes(out)
    for name in trunk_files(out):
        assert after[name] == before[name], name


def test_mtp_quant_rule_change_rebuilds_only_mtp(tmp_path):
    recipe = base_recipe(tmp_path, verify="verify: []")
    build(recipe, tmp_path)
    out = tmp_path / "out"
    before = file_bytes(out)
    child = child_recipe(tmp_path, recipe, "quantization:\n  rules:\n"
                         r"    - {name: mtp-head-8bit, match: 'mtp\..*', bits: 8}" "\n")
    proc = build(child, tmp_path)
    assert shards_ran(proc) == ["mtp.safetensors"], proc.stdout
    assert ran_tasks(proc) == ["build:shard:mtp.safetensors", "build:stage", "build:publish"]
    after = file_bytes(out)
    # The trunk's quantization entries are untouched; the config now names the quantized head modules.
    old_config, new_config = json.loads(before["config.json"]), json.loads(after["config.json"])
    head_entries = {k: v for k, v in new_config["quantization"].items() if k.startswith("mtp.")}
    assert len(head_entries) == 8 and all(v["bits"] == 8 for v in head_entries.values())
    assert {k: v for k, v in new_config["quantization"].items() if k not in head_entries} == old_config["quantization"]
    assert new_config.pop("mtplx_mtp_quantization")["bits"] == 8
    for key in ("quantization", "quantization_config"):
        new_config.pop(key), old_config.pop(key)
    assert new_config == old_config
    assert after["mtp.safetensors"] != before["mtp.safetensors"]
    for name in trunk_files(out):
        assert after[name] == before[name], name


def test_sibling_recipes_share_body_objects(built):
    work, recipe, out, _ = built
    sibling = base_recipe(work, name="inc-sibling", out=work / "out-sibling", file="sibling.yaml",
                          extra=f"sources:\n  mtp: {{path: {BODY_WITH_MTP}, table: mtp_hf}}\n")
    proc = build(sibling, work)
    ran = shards_ran(proc)
    assert "mtp.safetensors" in ran
    sibling_out = work / "out-sibling"
    # The body shards ran as doit tasks of the sibling's graph, but were served from the cache.
    for f in trunk_files(sibling_out):
        assert f"cached {f}" in proc.stdout, proc.stdout
        assert f"built {f}:" not in proc.stdout
        assert (sibling_out / f).read_bytes() == (out / f).read_bytes()
    assert "built mtp.safetensors:" in proc.stdout
    objects = list((work / "cache" / "objects").glob("*/*.safetensors"))
    assert len(objects) == len(trunk_files(out)) + 2  # shared body + two heads
    # Each output keeps its own doit state: alternating builds stay no-ops.
    assert ran_tasks(build(recipe, work)) == []
    assert ran_tasks(build(sibling, work)) == []


def _flip_byte(path: Path, restore_mtime: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size - 3)
        b = f.read(1)
        f.seek(st.st_size - 3)
        f.write(bytes([b[0] ^ 0x01]))
    if restore_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["plain", "mtime-restored"])
def test_tampered_cache_object_is_detected_and_rebuilt(built, restore_mtime):
    work, recipe, out, _ = built
    before = file_bytes(out)
    store = work / "cache" / "objects"
    target = trunk_files(out)[1]
    record = next(json.loads(p.read_text()) | {"path": p} for p in store.glob("*/*.json")
                  if json.loads(p.read_text()).get("file") == target)
    obj = record["path"].with_suffix(".safetensors")
    _flip_byte(obj, restore_mtime)
    proc = build(recipe, work)
    assert shards_ran(proc) == [target], proc.stdout
    assert f"built {target}:" in proc.stdout
    assert model_bytes(out) == model_bytes_of(before), "a corrupt object was served"
    from forgekit.build.memo import hash_file

    assert hash_file(obj) == record["digest"]
    # A tampered object is never served into a fresh output either.
    _flip_byte(obj, restore_mtime)
    sibling = base_recipe(work, out=work / "out2", file="again.yaml")
    proc = build(sibling, work)
    assert f"built {target}:" in proc.stdout
    assert model_bytes(work / "out2") == model_bytes_of(before)


def test_output_identical_cold_from_cache_and_after_interrupted_build(tmp_path):
    # cold
    a = tmp_path / "a"
    a.mkdir()
    recipe_a = base_recipe(a, verify="verify: []")
    build(recipe_a, a)
    cold = file_bytes(a / "out")
    # from cache: same recipe name, another output dir, the warm cache of `a`
    b = tmp_path / "b"
    b.mkdir()
    proc = build(base_recipe(b, verify="verify: []"), b, cache=a / "cache")
    assert "built " not in proc.stdout.replace("built inc:", ""), proc.stdout  # every object came from the cache
    assert file_bytes(b / "out") == cold
    # interrupted: SIGKILL the doit process tree while a shard is being written on the pool
    c = tmp_path / "c"
    c.mkdir()
    recipe_c = base_recipe(c, verify="verify: []")
    env = dict(os.environ, FORGEKIT_CACHE=str(c / "cache"), FORGEKIT_TEST_PIECE_DELAY="0.1",
               FORGEKIT_TEST_JOB_BYTES="1", FORGEKIT_TEST_POOL_MIN_BYTES="0", FORGEKIT_JOBS="2")
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(c), "build", f"recipe={recipe_c}"]
    doit = subprocess.Popen(cmd, cwd=c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    objects = c / "cache" / "objects"
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            committed = list(objects.glob("*/*.json"))
            temps = list(objects.glob("*/.*.tmp"))
            if committed and temps:
                break
            assert doit.poll() is None, doit.stdout.read().decode()
            time.sleep(0.02)
        else:
            pytest.fail("no shard was in progress within 60 s")
        time.sleep(0.15)
    finally:
        os.killpg(doit.pid, signal.SIGKILL)
        doit.wait()
    assert not (c / "out" / ".forgekit" / "manifest.json").exists()
    assert list(objects.glob("*/.*.tmp")), "the interrupted shard left no temp file (killed too late?)"
    proc = build(recipe_c, c)
    assert file_bytes(c / "out") == cold
    assert not list(objects.glob("*/.*.tmp")), "stale temp files were not cleaned up"
    assert ran_tasks(build(recipe_c, c)) == []


def test_pool_and_doit_process_parallelism_give_identical_bytes(tmp_path):
    serial = tmp_path / "serial"
    serial.mkdir()
    build(base_recipe(serial, verify="verify: []"), serial, env={"FORGEKIT_JOBS": "1"})
    expected = file_bytes(serial / "out")
    pool = tmp_path / "pool"
    pool.mkdir()
    proc = build(base_recipe(pool, verify="verify: []"), pool,
                 env={"FORGEKIT_JOBS": "2", "FORGEKIT_TEST_POOL_MIN_BYTES": "0", "FORGEKIT_TEST_JOB_BYTES": "4096",
                      "FORGEKIT_TEST_HASH_IN_POOL_BYTES": "0"})
    assert "2 workers" in proc.stdout, proc.stdout
    assert file_bytes(pool / "out") == expected
    manifest = lambda d: json.loads((d / "out" / ".forgekit" / "manifest.json").read_text())  # noqa: E731
    assert manifest(pool)["build_key"] == manifest(serial)["build_key"]  # sources hashed on the pool: same keys
    multi = tmp_path / "multi"
    multi.mkdir()
    proc = build(base_recipe(multi, verify="verify: []"), multi, args=("-n", "2", "-P", "process"))
    assert len(shards_ran(proc)) == len(trunk_files(serial / "out")) + 1, proc.stdout
    assert file_bytes(multi / "out") == expected


# ---------------------------------------------------------------- doit list / clean / forget


def _doit(work: Path, *args: str, recipe: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FORGEKIT_CACHE=str(work / "cache"))
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(work), *args, f"recipe={recipe}"]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_doit_list_shows_the_graph(built):
    work, recipe, out, _ = built
    proc = _doit(work, "list", recipe=recipe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "build"
    proc = _doit(work, "list", "--all", recipe=recipe)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    expected = {f"build:shard:{f}" for f in trunk_files(out) + ["mtp.safetensors"]} | set(LATE) | {"build"}
    assert set(names) == expected, proc.stdout
    proc = _doit(work, "list", "--all", "--status", recipe=recipe)
    status = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {s for name, s in status.items() if name != "build"} == {"U"}, proc.stdout  # all up to date


def test_doit_clean_removes_only_the_output_dir(built):
    work, recipe, out, _ = built
    before = file_bytes(out)
    objects = sorted((work / "cache" / "objects").glob("*/*.safetensors"))
    proc = _doit(work, "clean", recipe=recipe)
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()
    assert sorted((work / "cache" / "objects").glob("*/*.safetensors")) == objects
    proc = build(recipe, work)
    assert ran_tasks(proc) == LATE, proc.stdout  # shards stay cached; only assembly runs
    assert model_bytes(out) == model_bytes_of(before)


def test_doit_forget_runs_tasks_again_but_serves_objects_from_cache(built):
    work, recipe, out, _ = built
    before = file_bytes(out)
    proc = _doit(work, "forget", recipe=recipe)
    assert proc.returncode == 0, proc.stderr
    proc = build(recipe, work)
    files = trunk_files(out) + ["mtp.safetensors"]
    assert sorted(shards_ran(proc)) == sorted(files)
    assert ran_tasks(proc)[-3:] == LATE
    for f in files:
        assert f"cached {f}" in proc.stdout
    assert model_bytes(out) == model_bytes_of(before)
    # forget one task: only it runs
    proc = _doit(work, "forget", "build:shard:mtp.safetensors", recipe=recipe)
    assert proc.returncode == 0, proc.stderr
    assert ran_tasks(build(recipe, work)) == ["build:shard:mtp.safetensors"]


def test_recipe_error_is_one_line_for_list_and_build(tmp_path):
    bad = write_recipe(tmp_path, f"extends: {DEMO_RECIPE}\nname: bad\noutptu: {{dir: x}}\n")
    for args in (("list",), ("build",)):
        proc = _doit(tmp_path, *args, recipe=bad)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert "outptu: unknown key" in proc.stderr
