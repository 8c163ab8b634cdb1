"""Lock file (`<output dir>.lock.json`): a build records the sources' commits, file lists and
xxh3 digests; `doit build recipe=X locked=1` (and `forgekit ... --locked`) refuses to build
when a source moved: a hub revision that now resolves to another commit, a changed local file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from test_hub import populate_hub_cache

from conftest import BODY, HEAD_GGUF, run_doit, write_recipe
from forgekit.build.memo import hash_file
from forgekit.cli import main
from forgekit.build.lock import lock_differences

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path / "cache"))


def test_build_writes_lock_and_locked_build_refuses_a_changed_source(tmp_path):
    head = tmp_path / "src" / "head.gguf"
    head.parent.mkdir()
    shutil.copyfile(HEAD_GGUF, head)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"extends: qwen3.5-dense-mtp\nname: locked-demo\nsources:\n"
                                    f"  body: {{path: {BODY}}}\n  mtp: {{path: {head}}}\noutput: {{dir: {out}}}\n"
                                    f"verify: [{{step: structural}}]\n")
    proc = run_doit(recipe, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lock_file = tmp_path / "out.lock.json"
    lock = json.loads(lock_file.read_text())
    assert lock["lock_version"] == 1 and lock["recipe"] == "locked-demo"
    body, mtp = lock["sources"]["body"], lock["sources"]["mtp"]
    assert body["path"] == str(BODY) and mtp["path"] == str(head)
    shards = sorted(p.name for p in BODY.glob("model-*.safetensors"))
    assert set(shards) | {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(body["files"])
    for name in shards + ["config.json"]:
        assert body["files"][name] == {"xxh3": hash_file(BODY / name), "size": (BODY / name).stat().st_size}
    assert mtp["files"] == {"head.gguf": {"xxh3": hash_file(head), "size": head.stat().st_size}}

    # Unchanged sources: a locked build is a no-op, and the lock file is not rewritten.
    before = lock_file.stat().st_mtime_ns
    proc = run_doit(recipe, tmp_path, args=())
    assert proc.returncode == 0
    proc = _run_locked(recipe, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lock_file.stat().st_mtime_ns == before

    # The head file changes in place: --locked refuses, names the file, leaves the output alone.
    data = bytearray(head.read_bytes())
    data[-8:] = bytes(8)
    head.write_bytes(bytes(data))
    model_before = (out / "mtp.safetensors").read_bytes()
    proc = _run_locked(recipe, tmp_path)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("forgekit: sources moved since ")
    assert str(lock_file) in err[0] and "mtp: file head.gguf changed (xxh3 " in err[0]
    assert "Traceback" not in proc.stderr
    assert (out / "mtp.safetensors").read_bytes() == model_before
    assert json.loads(lock_file.read_text()) == lock

    # Without --locked the build accepts the new source and records it.
    proc = run_doit(recipe, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(lock_file.read_text())["sources"]["mtp"]["files"]["head.gguf"]["xxh3"] == hash_file(head)
    assert _run_locked(recipe, tmp_path).returncode == 0


def _run_locked(recipe: Path, cwd: Path):
    """run_doit with locked=1 (doit takes name=value pairs after the task name)."""
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ)
    env["FORGEKIT_CACHE"] = str(cwd / "cache")
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(cwd), "build",
           f"recipe={recipe}", "locked=1"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _second_snapshot(hub: Path, repo_id: str, files: dict[str, Path], commit: str) -> None:
    """Another commit of the same repo in huggingface_hub's cache, and move refs/main to it."""
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs" / "main").write_text(commit)


def test_lock_command_and_moved_hub_revision(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    body_files = {p.name: p for p in BODY.iterdir() if p.is_file()}
    first = populate_hub_cache(hub, "org/finetune", body_files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    recipe = write_recipe(tmp_path, f"extends: qwen3.5-dense-mtp\nname: hub-lock\nsources:\n"
                                    f"  body: {{repo: org/finetune, revision: main}}\n  mtp: {{path: {HEAD_GGUF}}}\n"
                                    f"output: {{dir: {tmp_path / 'build' / 'hub-lock'}}}\n"
                                    f"verify: [{{step: structural}}]\n")
    lock_file = tmp_path / "build" / "hub-lock.lock.json"

    code, out, err = cli(capsys, "lock", recipe, "--check")
    assert code == 2 and out == ""
    assert err == (f"forgekit: no lock file {lock_file}: build once without --locked (or run `forgekit lock RECIPE`) "
                   f"to record the sources\n")

    code, out, err = cli(capsys, "lock", recipe)
    assert code == 0, err
    assert out.splitlines()[0] == f"wrote {lock_file}"
    assert f"  body: repo org/finetune@main (commit {first[:12]})" in out
    lock = json.loads(lock_file.read_text())
    assert lock["sources"]["body"]["commit"] == first and lock["sources"]["body"]["revision"] == "main"
    assert "model-00001-of-00002.safetensors" in lock["sources"]["body"]["files"]

    code, out, err = cli(capsys, "lock", recipe, "--check")
    assert (code, out) == (0, f"ok: sources match {lock_file}\n")
    code, out, err = cli(capsys, "plan", recipe, "--locked", "--summary")
    assert code == 0 and "totals per file" in out

    # Upstream pushes a new commit with the same files: main moves, --locked refuses.
    second = "b" * 40
    _second_snapshot(hub, "org/finetune", body_files, second)
    code, out, err = cli(capsys, "lock", recipe, "--check")
    assert code == 2
    assert err.startswith(f"forgekit: sources moved since {lock_file} was written: body: org/finetune@main now "
                          f"resolves to commit {second[:12]}, the lock has {first[:12]} (--locked refuses")
    code, out, err = cli(capsys, "validate", recipe, "--locked", "--json")
    assert code == 2 and json.loads(out)["valid"] is False and "now resolves to commit" in json.loads(out)["error"]
    # The same refusal through doit, before any task runs.
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path / "hf-home")}
    proc = run_doit(recipe, tmp_path, env=env, args=())
    assert proc.returncode == 0, proc.stdout + proc.stderr  # unlocked: builds from the new commit
    lock = json.loads(lock_file.read_text())
    assert lock["sources"]["body"]["commit"] == second  # ...and records it


def test_lock_differences_name_each_change():
    base = {"sources": {"body": {"path": "/a", "files": {"x": {"xxh3": "1" * 32}, "y": {"xxh3": "2" * 32}}},
                        "mtp": {"repo": "o/h", "revision": "main", "file": "h.gguf", "commit": "c" * 40,
                                "remote": {"etag": "e1"}, "files": {}}}}
    same = json.loads(json.dumps(base))
    assert lock_differences(base, same) == []
    moved = json.loads(json.dumps(base))
    moved["sources"]["body"]["files"]["x"]["xxh3"] = "3" * 32
    del moved["sources"]["body"]["files"]["y"]
    moved["sources"]["body"]["files"]["z"] = {"xxh3": "4" * 32}
    moved["sources"]["mtp"]["file"] = "other.gguf"
    assert lock_differences(base, moved) == [
        "body: file x changed (xxh3 333333333333, the lock has 111111111111)",
        "body: file y is in the lock but no longer in the source",
        "body: file z is new (not in the lock)",
        "mtp: file is now 'other.gguf', the lock has 'h.gguf'",
    ]
    etag = json.loads(json.dumps(base))
    etag["sources"]["mtp"]["remote"]["etag"] = "e2"
    assert lock_differences(base, etag) == ["mtp: h.gguf has etag e2, the lock has e1"]
    gone = {"sources": {"body": base["sources"]["body"]}}
    assert lock_differences(base, gone) == ["source 'mtp' is no longer in the recipe"]
