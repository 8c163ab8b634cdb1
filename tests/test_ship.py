"""Using forgekit outside a checkout: packaged recipes found from any directory, `forgekit build`
running the same doit graph and state as `doit build`, one cache wherever a command runs.
(The wheel itself is built, installed into a fresh venv and run from an empty dir by .ci/run.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, demo_recipe, ran_tasks, run_doit
from forgekit import settings
from forgekit.recipe import find_recipe, packaged_recipes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def forgekit(*args, cwd: Path, cache: Path | None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FORGEKIT_CACHE"}
    if cache is not None:
        env["FORGEKIT_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "forgekit.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_packaged_recipes_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert packaged_recipes() == ROOT / "forgekit" / "recipes"
    assert find_recipe("qwythos-9b") == ROOT / "forgekit" / "recipes" / "qwythos-9b.yaml"
    demo = find_recipe("tiny-demo")
    assert (demo.parent / "tiny" / "body" / "config.json").is_file()  # the fixture ships beside it
    mine = tmp_path / "recipes" / "qwythos-9b.yaml"
    mine.parent.mkdir()
    mine.write_text("extends: qwythos-9b\nname: qwythos-9b\n")
    assert find_recipe("qwythos-9b") == mine  # ./recipes/ first: a user's recipe shadows a packaged one


def test_validate_from_an_empty_directory(tmp_path):
    proc = forgekit("validate", "qwythos-9b", "--schema-only", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert f"  output:  build{os.sep}qwythos-9b" in proc.stdout.splitlines()
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cache_root_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path / "mine"))
    assert settings.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("FORGEKIT_CACHE")
    monkeypatch.chdir(tmp_path)
    assert settings.checkout_root() == ROOT and settings.cache_root() == ROOT / "cache"  # not ./cache
    monkeypatch.setattr(settings, "checkout_root", lambda: None)  # as an installed package
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.cache_root() == tmp_path / "xdg" / "forgekit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.cache_root() == tmp_path / "home" / ".cache" / "forgekit"


def test_forgekit_build_and_doit_build_share_tasks_and_state(tmp_path):
    recipe = demo_recipe(tmp_path, extra="verify: [{step: structural, params: {head_dtype: BF16}}]\n")
    cache = tmp_path / "cache"
    first = forgekit("build", recipe, cwd=tmp_path, cache=cache)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "build:publish" in ran_tasks(first) and (tmp_path / "out" / "mtp.safetensors").is_file()
    again = run_doit(recipe, tmp_path, cache=cache)  # dodo.py sees forgekit build's state: nothing to do
    assert again.returncode == 0 and ran_tasks(again) == [], again.stdout + again.stderr
    listed = forgekit("build", recipe, "list", "--all", cwd=tmp_path, cache=cache)
    assert listed.returncode == 0 and "build:verify:0:structural" in listed.stdout, listed.stderr
    ls = forgekit("cache", "ls", cwd=tmp_path / "out", cache=cache)  # same cache from another directory
    assert ls.stdout.splitlines()[-1].startswith("2 object(s)"), ls.stdout + ls.stderr


def test_forgekit_build_refuses_a_bad_recipe_in_one_line(tmp_path):
    proc = forgekit("build", "no-such-recipe", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "recipe 'no-such-recipe' not found" in proc.stderr


def test_new_leaves_no_empty_recipes_dir_when_it_refuses(tmp_path):
    proc = forgekit("new", "x", "--body", tmp_path / "missing", "--mtp", "body", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 2 and not (tmp_path / "recipes").exists()
    proc = forgekit("new", "x", "--body", ROOT / "tests" / "fixtures" / "tiny" / "body", "--mtp",
                    ROOT / "tests" / "fixtures" / "tiny" / "body", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stdout  # the body carries no mtp.* keys: refused while validating
    assert not (tmp_path / "recipes").exists()
