"""Shared test helpers: real doit runs in temp dirs on the committed tiny fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = (ROOT / "tests" / "fixtures" / "tiny").resolve()  # ships in forgekit/recipes/tiny (package data)
BODY = FIXTURE / "body"
BODY_WITH_MTP = FIXTURE / "body-with-mtp"
HEAD_GGUF = FIXTURE / "tiny-MTP-BF16.gguf"
DEMO_RECIPE = (ROOT / "recipes" / "tiny-demo.yaml").resolve()


def write_recipe(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def demo_recipe(directory: Path, out: Path | None = None, extra: str = "", name: str = "demo.yaml") -> Path:
    """A recipe extending the shipped demo, writing into `out` (default: directory/out)."""
    out = out or directory / "out"
    return write_recipe(directory, f"extends: {DEMO_RECIPE}\nname: demo-under-test\noutput: {{dir: {out}}}\n{extra}", name)


def run_doit(recipe: Path | str, cwd: Path, cache: Path | None = None, env: dict | None = None,
             args: tuple[str, ...] = (), timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `doit build recipe=...` for real, in a subprocess, with its cache under `cache`;
    past `timeout` seconds it is killed and subprocess.TimeoutExpired fails the test."""
    full_env = dict(os.environ)
    full_env["FORGEKIT_CACHE"] = str(cache or cwd / "cache")
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(cwd), *args,
           "build", f"recipe={recipe}"]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def ran_tasks(proc: subprocess.CompletedProcess) -> list[str]:
    """Tasks doit executed (lines '.  task'), as opposed to skipped ('-- task')."""
    return [line[3:].strip() for line in proc.stdout.splitlines() if line.startswith(".  ")]


def heldout() -> list[list[int]]:
    data = json.loads((FIXTURE / "heldout.json").read_text())
    return data["sequences"] if isinstance(data, dict) else data


@pytest.fixture(scope="session")
def built_demo(tmp_path_factory) -> Path:
    """The demo recipe built once per session by a real doit run; returns the output dir."""
    work = tmp_path_factory.mktemp("demo")
    recipe = demo_recipe(work)
    proc = run_doit(recipe, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / "out"


@pytest.fixture(scope="session")
def mlx_lm_converted(tmp_path_factory):
    """`convert(source, **flags)`: mlx-lm's own conversion of a checkpoint (`mlx_lm convert --hf-path
    SOURCE -q --q-bits 4 --q-group-size 64` unless `flags` say otherwise; in-process, the function that
    command calls with the same arguments), run once per session per (checkpoint, flags) and shared by
    the tests that compare a build with it (they only read it)."""
    done: dict = {}

    def convert(source: Path, **flags) -> Path:
        from mlx_lm import convert as mlx_lm_convert

        flags = {"q_bits": 4, "q_group_size": 64, **flags}
        key = (str(Path(source).resolve()), tuple(sorted(flags.items())))
        if key not in done:
            out = tmp_path_factory.mktemp("mlx-lm-convert") / "mlx"
            mlx_lm_convert(str(source), str(out), quantize=True, **flags)
            done[key] = out
        return done[key]

    return convert
