"""The qwythos recipe's hub code path, exercised offline through huggingface_hub's real
cache layout (models--org--name/{blobs,refs,snapshots}) holding the tiny fixture."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from huggingface_hub import ModelCard

from conftest import BODY, HEAD_GGUF, ROOT, run_doit, write_recipe

from forgekit.recipe import load_recipe


def populate_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], revision: str = "main") -> str:
    """Lay files out exactly as huggingface_hub does: content blobs, a ref, a snapshot of symlinks."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


def test_qwythos_recipe_builds_from_offline_hub_cache(tmp_path):
    qwythos = load_recipe(ROOT / "recipes" / "qwythos-9b.yaml")
    body_repo, mtp = qwythos.sources["body"].repo, qwythos.sources["mtp"]
    assert body_repo == "empero-ai/Qwythos-9B-Claude-Mythos-5-1M"
    assert mtp.repo == "empero-ai/Qwythos-9B-Claude-Mythos-5-1M-GGUF"
    assert mtp.file == "Qwythos-9B-Claude-Mythos-5-1M-MTP-BF16.gguf"

    hub = tmp_path / "hub"
    body_card = tmp_path / "body-README.md"  # the body repo's own card: its license is inherited
    body_card.write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n# Qwythos\n")
    body_files = {p.name: p for p in BODY.iterdir() if p.is_file()} | {"README.md": body_card}
    body_commit = populate_hub_cache(hub, body_repo, body_files, qwythos.sources["body"].revision)
    head_commit = populate_hub_cache(hub, mtp.repo, {mtp.file: HEAD_GGUF}, mtp.revision)

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'qwythos-9b.yaml'}\nname: qwythos-offline\n"
                                    f"output: {{dir: {out}}}\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path / "hf-home")}
    proc = run_doit(recipe, tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "mtp.safetensors").is_file() and (out / "model.safetensors").is_file()
    runtime = json.loads((out / "mtplx_runtime.json").read_text())
    sources = {s["role"]: s for s in runtime["provenance"]["sources"]}
    assert sources["body"]["repo"] == body_repo and sources["body"]["commit"] == body_commit
    assert sources["mtp"]["repo"] == mtp.repo and sources["mtp"]["commit"] == head_commit
    card = (out / "README.md").read_text()
    assert f"| body | `{body_repo}` | `{body_commit}` |" in card
    assert f"| mtp | `{mtp.repo}` | `{head_commit}` | `{mtp.file}` |" in card
    data = ModelCard(card).data.to_dict()
    assert (data["license"], data["base_model"], data["library_name"]) == ("apache-2.0", body_repo, "mlx")
    assert "License: `apache-2.0`, inherited from the body (empero-ai/Qwythos-9B-Claude-Mythos-5-1M)." in card
    assert str(tmp_path) not in card


def test_offline_hub_without_cached_repo_fails_cleanly(tmp_path):
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'qwythos-9b.yaml'}\nname: q\noutput: {{dir: out}}\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HOME": str(tmp_path / "h")}
    proc = run_doit(recipe, tmp_path, env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "hub source empero-ai/Qwythos-9B-Claude-Mythos-5-1M@main: cannot resolve" in proc.stderr
    assert not (tmp_path / "out").exists()
