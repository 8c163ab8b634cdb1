"""Concurrent builds, with real doit processes started at the same moment.

Two `doit build` of one output dir: the build lock (`<out>.build-lock`, an flock taken when the
dodo loads the recipe, see forgekit/build/output_lock.hold_build_lock) lets one work; the other waits
and then finds everything up to date (default), or, with FORGEKIT_LOCK_WAIT=0, exits at once
with one line. Either way the output is one clean build, never interleaved. Builds of different
output dirs sharing one cache run side by side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_RECIPE, ROOT, ran_tasks, run_doit, write_recipe
from forgekit.build.gc import cache_verify
from forgekit.build.memo import hash_file

SLOW_PIECES = {"FORGEKIT_TEST_PIECE_DELAY": "0.02"}   # ~130 pieces: the build holds the lock for seconds
WAITING = re.compile(r"^forgekit: .*/out: another build is writing this output \(pid \d+\); waiting for it to finish$")
REFUSED = re.compile(r"^forgekit: .*/out: another build is writing this output \(pid \d+\); "
                     r"run again when it has finished$")


def recipe(work: Path, out: str = "out", name: str = "recipe.yaml") -> Path:
    return write_recipe(work, f"extends: {DEMO_RECIPE}\nname: conc\noutput: {{dir: {out}, max_shard_bytes: 100000}}\n"
                              f"verify: []\n", name)


def start(recipe_path: Path, work: Path, env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, "FORGEKIT_CACHE": str(work / "cache"), **(env or {})}
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(work), "build", f"recipe={recipe_path}"]
    return subprocess.Popen(cmd, cwd=work, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_consistent(work: Path, out: Path) -> None:
    manifest = json.loads((out / ".forgekit" / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hash_file(out / name) == digest, name
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.is_file())
    assert cache_verify(work / "cache", remove=False) == []
    assert not list((work / "cache" / "objects").rglob("*.tmp")) and not list(work.glob("*.staging"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, bytes]:
    work = tmp_path_factory.mktemp("clean")
    proc = run_doit(recipe(work), work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tree(work / "out")


def test_second_build_waits_then_finds_everything_done(tmp_path, clean):
    r = recipe(tmp_path)
    a, b = start(r, tmp_path, SLOW_PIECES), start(r, tmp_path, SLOW_PIECES)
    results = [finish(a), finish(b)]
    for p in results:
        assert p.returncode == 0, p.stdout + p.stderr
        assert "Traceback" not in p.stderr
    waited = [p for p in results if any(WAITING.match(line) for line in p.stderr.splitlines())]
    assert len(waited) == 1, [p.stderr for p in results]
    worker = next(p for p in results if p is not waited[0])
    assert len(ran_tasks(worker)) == 8 and worker.stdout.count("  built ") == 6, worker.stdout  # 6 shards, stage, publish
    assert ran_tasks(waited[0]) == [], waited[0].stdout  # it ran after the other finished: all up to date
    assert tree(tmp_path / "out") == clean
    assert_consistent(tmp_path, tmp_path / "out")


def test_with_no_wait_the_second_build_exits_with_one_line(tmp_path, clean):
    r = recipe(tmp_path)
    env = {**SLOW_PIECES, "FORGEKIT_LOCK_WAIT": "0"}
    a, b = start(r, tmp_path, env), start(r, tmp_path, env)
    results = [finish(a), finish(b)]
    refused = [p for p in results if p.returncode != 0]
    assert len(refused) == 1, [(p.returncode, p.stderr) for p in results]
    p = refused[0]
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert len(p.stderr.splitlines()) == 1 and REFUSED.match(p.stderr.strip()), p.stderr
    assert tree(tmp_path / "out") == clean
    assert_consistent(tmp_path, tmp_path / "out")


def test_a_killed_build_leaves_no_lock_behind(tmp_path, clean):
    """The kernel drops an flock with its process: after a SIGKILL the next build starts at once."""
    r = recipe(tmp_path)
    a = start(r, tmp_path, SLOW_PIECES)
    objects = tmp_path / "cache" / "objects"
    deadline = time.time() + 60
    while not list(objects.glob("*/*.json")):  # the build holds the lock and has committed a shard
        assert time.time() < deadline and a.poll() is None, finish(a).stderr
        time.sleep(0.02)
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    proc = run_doit(r, tmp_path, env={"FORGEKIT_LOCK_WAIT": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tree(tmp_path / "out") == clean
    assert_consistent(tmp_path, tmp_path / "out")


def test_builds_of_different_outputs_share_a_cache_side_by_side(tmp_path, clean):
    r1, r2 = recipe(tmp_path), recipe(tmp_path, out="out2", name="other.yaml")
    a, b = start(r1, tmp_path, SLOW_PIECES), start(r2, tmp_path, SLOW_PIECES)
    results = [finish(a), finish(b)]
    for p in results:
        assert p.returncode == 0, p.stdout + p.stderr
        assert "another build" not in p.stderr, p.stderr  # they do not wait for each other
    for out in ("out", "out2"):
        assert {n: b for n, b in tree(tmp_path / out).items() if n.endswith(".safetensors")} == \
               {n: b for n, b in clean.items() if n.endswith(".safetensors")}
        assert_consistent(tmp_path, tmp_path / out)
