"""A no-op build costs only start-up: no task runs, no file is hashed, and the heavy model
libraries are not imported. Proven by counting (FORGEKIT_PROFILE's per-phase call counts,
forgekit/build/profile.py), never by timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, ran_tasks, run_doit
from forgekit.build.profile import read
from forgekit.mlx_models import OWN_PACKAGE
from test_incremental import base_recipe, build


def profiled(recipe, work, name: str):
    """A real doit build with FORGEKIT_PROFILE; (process, phases of the build process and helpers)."""
    prof = work / f"{name}.jsonl"
    proc = build(recipe, work, env={"FORGEKIT_PROFILE": str(prof)})
    phases = read(prof)
    merged: dict[str, list] = {}
    for role in phases.values():
        for k, v in role.items():
            merged.setdefault(k, [0.0, 0, 0])
            merged[k] = [a + b for a, b in zip(merged[k], v)]
    return proc, merged


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    work = tmp_path_factory.mktemp("noop")
    recipe = base_recipe(work)
    proc, phases = profiled(recipe, work, "cold")
    return work, recipe, proc, phases


def test_cold_build_profile_counts_hashing_and_compute(cold):
    """The counter the no-op test relies on sees hashing when there is some."""
    _, _, proc, phases = cold
    assert "build:publish" in ran_tasks(proc)
    assert phases["hash"][1] > 0 and phases["hash"][2] > 0          # sources and outputs hashed
    assert phases["quantize"][1] > 0 and phases["read"][2] > 0
    assert phases["process lifetime"][0] > 0


def test_first_noop_after_a_build_runs_no_task_and_hashes_nothing(cold):
    work, recipe, _, _ = cold
    for i in range(2):   # the first one right after the build, and the next
        proc, phases = profiled(recipe, work, f"noop-{i}")
        assert ran_tasks(proc) == [], proc.stdout
        assert "hash" not in phases, phases


def test_a_lost_stat_memo_makes_the_next_build_hash_again(cold):
    """Mis-case for the test above: with the memo gone, sources and outputs are re-hashed (and
    nothing is rebuilt), so the count does see re-hashing when it happens."""
    work, recipe, _, _ = cold
    (work / "cache" / "stat-memo.sqlite3").unlink()
    proc, phases = profiled(recipe, work, "no-memo")
    assert phases["hash"][1] >= 1
    assert not [t for t in ran_tasks(proc) if t.startswith("build:shard:")]


def test_build_process_start_up_does_not_import_the_model_libraries():
    """mlx_lm (and transformers behind it) cost seconds of start-up, more when a large build
    has pushed them out of the page cache; only a verify step needs them."""
    code = "import sys, forgekit.doit; print(sorted(m for m in ('mlx_lm', 'transformers', 'mlx.core') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout


def imported(proc) -> set[str]:
    """Top-level packages a doit run imported (from PYTHONPROFILEIMPORTTIME's stderr lines)."""
    names = (line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:"))
    return {n.split(".")[0] for n in names}


def test_a_noop_build_imports_no_model_library(cold):
    """Planning checks every tensor's shape against mlx-lm's model class; the answer is memoised
    under the cache (forgekit/plan/shapes.py), so a no-op never pays mlx-lm's import (and
    transformers behind it: most of a no-op's time)."""
    work, recipe, _, _ = cold
    proc = build(recipe, work, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert ran_tasks(proc) == [], proc.stdout
    seen = imported(proc)
    assert "doit" in seen and "forgekit" in seen           # the import log is read at all
    assert not seen & {"mlx_lm", "transformers", OWN_PACKAGE}, sorted(seen & {"mlx_lm", "transformers", OWN_PACKAGE})


def test_without_the_shapes_memo_a_noop_reads_mlx_lms_model_files_and_writes_it_back(cold):
    """Mis-case for the test above: with the memo gone, planning reads mlx-lm's model files again, still runs
    no task, and the memo is back for the next run."""
    from forgekit.plan.shapes import SHAPES_MEMO

    work, recipe, _, _ = cold
    memo = work / "cache" / SHAPES_MEMO
    assert memo.is_file()
    memo.unlink()
    proc = build(recipe, work, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert ran_tasks(proc) == [], proc.stdout
    assert OWN_PACKAGE in imported(proc)
    assert memo.is_file()


def test_a_damaged_shapes_memo_is_asked_again_not_trusted(cold):
    """A memo entry that is not a table of integer shapes is ignored and replaced."""
    import json

    from forgekit.plan.shapes import SHAPES_MEMO

    work, recipe, _, _ = cold
    memo = work / "cache" / SHAPES_MEMO
    key = next(iter(json.loads(memo.read_text())))
    memo.write_text(json.dumps({key: {"trunk": {"model.embed_tokens.weight": ["x"]}, "head": {}}}))
    proc = build(recipe, work, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert ran_tasks(proc) == [] and OWN_PACKAGE in imported(proc)
    entry = json.loads(memo.read_text())[key]
    assert all(isinstance(d, int) for shape in entry["trunk"].values() for d in shape)


def test_a_cold_build_imports_neither_mlx_lm_nor_transformers(tmp_path):
    """Without the memo (a fresh cache), planning and the structural step read mlx-lm's model files
    through forgekit/mlx_models.py: mlx_lm's package start-up (and transformers behind it, ~0.6 s
    CPU of every build) is not paid; the same log does show them where a process imports them."""
    proc = build(base_recipe(tmp_path), tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert "build:verify:0:structural" in ran_tasks(proc)
    seen = imported(proc)
    assert OWN_PACKAGE in seen and "forgekit" in seen      # mlx-lm's model files were read
    assert not seen & {"mlx_lm", "transformers"}, sorted(seen & {"mlx_lm", "transformers"})
    probe = subprocess.run([sys.executable, "-c", "import mlx_lm"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert {"mlx_lm", "transformers"} <= imported(probe)


@pytest.mark.parametrize("recipe", ["tiny-demo", "tiny-moe"])
def test_own_model_files_are_the_ones_mlx_lm_picks_with_the_same_shapes(recipe):
    """For the model type each shipped base writes, forgekit's copy of mlx-lm's models package
    gives classes from the file mlx_lm.utils._get_classes picks (no remapping), with equal shapes."""
    import inspect

    from mlx_lm.utils import _get_classes

    from forgekit.build.outputs import config_json
    from forgekit.mlx_models import UNMAPPED, model_classes, own_module
    from forgekit.plan import make_plan
    from forgekit.plan.shapes import _shapes
    from forgekit.recipe import load_recipe

    config = config_json(make_plan(load_recipe(ROOT / "recipes" / f"{recipe}.yaml")))
    assert config["model_type"] in UNMAPPED
    theirs, their_args = _get_classes(config)
    own = own_module(config["model_type"])
    assert own.Model is not theirs and inspect.getfile(own.Model) == inspect.getfile(theirs)
    assert model_classes(config) == (theirs, their_args)     # mlx_lm is loaded here: mlx-lm's own
    assert _shapes(own.Model(own.ModelArgs.from_dict(config))) == _shapes(theirs(their_args.from_dict(config)))


def test_a_head_that_runs_is_built_from_mlx_lms_own_modules(cold):
    """Only planning and the shape checks use forgekit's copy of the model files: the verify steps'
    head (load_head) is mlx-lm's own DecoderLayer, even in a process that planned first."""
    work = cold[0]
    code = ("import json, sys; from pathlib import Path; from forgekit.plan.shapes import head_shapes; "
            "from forgekit.verify.load import load_head; out = Path(sys.argv[1]); "
            "config = json.loads((out / 'config.json').read_text()); head_shapes(config); "
            "planned = 'mlx_lm' in sys.modules; layer = load_head(out, config).mtp.layers[0]; "
            "print(planned, type(layer).__module__)")
    proc = subprocess.run([sys.executable, "-c", code, str(work / "out")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.split() == ["False", "mlx_lm.models.qwen3_5"], proc.stdout + proc.stderr


def _tiny_config(**text) -> dict:
    from forgekit.build.outputs import config_json
    from forgekit.plan import make_plan
    from forgekit.recipe import load_recipe

    config = config_json(make_plan(load_recipe(ROOT / "recipes" / "tiny-demo.yaml")))
    config["text_config"].update(text)
    return config


def test_one_shapes_memo_answers_each_config_with_its_own_shapes(tmp_path, monkeypatch):
    """Two configs in one cache (the memo is shared by every model a cache builds): each gets the
    shapes its own config gives, from mlx-lm and then from the memo, and with_head is part of the key."""
    from forgekit.plan.shapes import SHAPES_MEMO, expected_shapes

    monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path))
    small, large = _tiny_config(), _tiny_config(vocab_size=512)
    embed = "language_model.model.embed_tokens.weight"
    vocab = small["text_config"]["vocab_size"]
    assert vocab != 512
    entries = []
    for _ in range(2):   # first asked, then answered from the memo (no new entry)
        assert expected_shapes(small, "a", False)[0][embed] == (vocab, 64)
        assert expected_shapes(large, "b", False)[0][embed] == (512, 64)
        entries.append(len(json.loads((tmp_path / SHAPES_MEMO).read_text())))
    assert entries[0] == entries[1] >= 2
    trunk, head = expected_shapes(small, "a", True)
    assert head["mtp.fc.weight"] == (64, 128) and trunk[embed] == (vocab, 64)


def test_an_empty_shapes_memo_entry_is_asked_again(tmp_path, monkeypatch):
    """An entry whose tables are empty would check nothing: it is damaged, not an answer."""
    from forgekit.plan.shapes import SHAPES_MEMO, _memo_key, expected_shapes

    monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path))
    config = _tiny_config()
    for with_head in (False, True):
        key = _memo_key(config, with_head)
        (tmp_path / SHAPES_MEMO).write_text(json.dumps({key: {"trunk": {}, "head": {}}}))
        trunk, head = expected_shapes(config, "a", with_head)
        assert "language_model.model.norm.weight" in trunk and bool(head) == with_head
        assert json.loads((tmp_path / SHAPES_MEMO).read_text())[key]["trunk"]


def test_a_memo_write_removes_the_temp_files_a_killed_writer_left(cold):
    """A build killed while writing a memo leaves `.model-shapes.json.<pid>.<random>.tmp` in the
    cache root; the next memo write removes those of dead writers only, and never a symlink."""
    import subprocess as sp

    from forgekit.plan.shapes import SHAPES_MEMO

    work, recipe, _, _ = cold
    root = work / "cache"
    gone = sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = root / f".{SHAPES_MEMO}.{int(gone.stdout)}.abc123.tmp"
    alive = root / f".{SHAPES_MEMO}.{os.getpid()}.def456.tmp"       # this test's process is running
    link = root / f".{SHAPES_MEMO}.{int(gone.stdout)}.link99.tmp"
    target = work / "not-the-caches.txt"
    for p in (dead, alive, target):
        p.write_text("{")
    link.symlink_to(target)
    (root / SHAPES_MEMO).unlink()                                      # the next plan writes the memo
    proc = build(recipe, work)
    assert ran_tasks(proc) == [], proc.stdout
    assert (root / SHAPES_MEMO).is_file()
    assert not dead.exists() and alive.exists() and link.is_symlink() and target.read_text() == "{"
    alive.unlink(), link.unlink(), target.unlink()
