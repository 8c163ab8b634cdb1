"""`forgekit publish` against the fake Hub on 127.0.0.1 (huggingface_hub's real upload code talks
to it), and `forgekit verify DIR` finding the recipe in the manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from conftest import demo_recipe, run_doit
from fake_hub import FakeHub, serve
from forgekit.build import card
from forgekit.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REPO = "acme/tiny-demo-mlx"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    fake = FakeHub()
    with serve(fake) as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield fake


def artifact_files(directory) -> list[str]:
    """What a build wrote for users: the regular files at the top of the dir (.forgekit/ is internal)."""
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def publish(capsys, *args) -> tuple[int, str, str]:
    code = main(["publish", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def copy_of_demo(built_demo, tmp_path):
    directory = tmp_path / "tiny-demo"
    shutil.copytree(built_demo, directory)
    return directory


def test_dry_run_lists_exactly_the_files_and_uploads_nothing(hub, capsys, built_demo):
    code, out, err = publish(capsys, built_demo, "--repo", REPO, "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    manifest = json.loads((built_demo / ".forgekit" / "manifest.json").read_text())
    assert lines[0].startswith(f"would publish {built_demo} to {REPO}@main: {len(artifact_files(built_demo))} file(s); "
                               f"commit 'Upload demo-under-test (forgekit build {manifest['build_key'][:16]})'")
    assert [line.split()[0] for line in lines[1:]] == artifact_files(built_demo)
    assert hub.log == [] and hub.commits == [] and hub.created == {}


def test_publish_uploads_the_artifact_minus_internals(hub, capsys, copy_of_demo):
    (copy_of_demo / "notes.txt").write_text("a file the build did not write")
    (copy_of_demo / ".forgekit" / "scratch").write_text("internal")
    expected = sorted(set(artifact_files(copy_of_demo)) - {"notes.txt"})
    code, out, err = publish(capsys, copy_of_demo, "--repo", REPO, "--private", "--revision", "dev")
    assert code == 0, err
    assert out.startswith(f"published {copy_of_demo} to {REPO}@dev: {len(expected)} file(s)")
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo, commit.revision) == (REPO, "dev") and (REPO, "dev") in hub.branches
    assert hub.created[REPO].get("visibility") == "private" or hub.created[REPO].get("private") is True
    assert sorted(commit.files) == expected
    for name in expected:
        if name != "README.md":
            assert commit.files[name] == (copy_of_demo / name).read_bytes(), name
    build_key = json.loads((copy_of_demo / ".forgekit" / "manifest.json").read_text())["build_key"]
    assert build_key[:16] in commit.summary and build_key in commit.description
    uploaded_card = commit.files["README.md"].decode()
    assert f"MODEL={REPO}   #" in uploaded_card and card.UNVERIFIED_BANNER not in uploaded_card
    assert ModelCard(uploaded_card).data.to_dict()["library_name"] == "mlx"


def test_a_tampered_directory_is_refused_in_one_line(hub, capsys, copy_of_demo):
    data = bytearray((copy_of_demo / "mtp.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy_of_demo / "mtp.safetensors").write_bytes(bytes(data))
    code, out, err = publish(capsys, copy_of_demo, "--repo", REPO)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"forgekit: {copy_of_demo}: not published: 1 file(s) no longer match the build's "
                                f"manifest (mtp.safetensors) (rebuild it, or pass --force)"]
    assert hub.commits == [] and hub.created == {}

    code, out, err = publish(capsys, copy_of_demo, "--repo", REPO, "--force")
    assert code == 0, err
    uploaded_card = hub.commits[0].files["README.md"].decode()
    assert card.UNVERIFIED_BANNER in uploaded_card and "mtp.safetensors" in uploaded_card
    assert hub.commits[0].files["mtp.safetensors"] == bytes(data)


def test_an_unverified_build_is_refused(hub, capsys, tmp_path):
    recipe = demo_recipe(tmp_path, extra="verify: []\n")
    proc = run_doit(recipe, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code, out, err = publish(capsys, tmp_path / "out", "--repo", REPO)
    assert code == 2
    assert err.splitlines() == [f"forgekit: {tmp_path / 'out'}: not published: its verification did not pass "
                                f"(status unverified_no_forgekit_checks_ran) (rebuild it, or pass --force)"]
    code, out, err = publish(capsys, tmp_path / "out", "--repo", REPO, "--dry-run")
    assert code == 2 and out.startswith("would refuse") and hub.log == []


def test_a_directory_without_a_manifest_is_refused(hub, capsys, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code, out, err = publish(capsys, tmp_path / "model", "--repo", REPO)
    assert code == 2 and err.splitlines() == [
        f"forgekit: {tmp_path / 'model'}: not a forgekit output (no readable .forgekit/manifest.json)"]


def test_verify_without_recipe_uses_the_manifest(built_demo, tmp_path):
    manifest = json.loads((built_demo / ".forgekit" / "manifest.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "forgekit.cli", "verify", str(built_demo)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "FORGEKIT_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    recorded = (built_demo / manifest["recipe_file"]).resolve()     # kept relative to the output dir
    assert proc.stdout.splitlines()[-1].startswith(f"ok: {built_demo} verified against recipe {recorded}")
