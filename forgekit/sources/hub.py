"""Hugging Face Hub sources, resolved through huggingface_hub (its cache, its offline mode).

Only what the build needs is fetched: the metadata files first, then just the
weight shards holding tensors the recipe does not drop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import SourceError
from .safetensors_dir import read_index

META_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                 "merges.txt", "preprocessor_config.json", "model.safetensors.index.json", "README.md")


def _hub_error(repo: str, revision: str | None, exc: Exception) -> SourceError:
    return SourceError(
        f"hub source {repo}@{revision or 'main'}: cannot resolve ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    )


def snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    """Download (or find in the cache, offline) the files matching `patterns`; return the snapshot dir."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub raises many types; all mean "cannot resolve"
        raise _hub_error(repo, revision, exc) from None


def commit_of(snapshot_dir: Path) -> str:
    """Snapshot directories are named by the commit sha they hold."""
    return snapshot_dir.name


def fetch_model_dir(repo: str, revision: str | None, keep: Callable[[str], bool]) -> tuple[Path, list[str] | None, list[str]]:
    """Fetch a safetensors model repo. `keep(tensor_name)` says whether the plan needs a tensor.

    Returns the snapshot dir, the weight files fetched (None: all of them) and the
    tensor names skipped because they live only in shards that were not fetched.
    """
    root = snapshot(repo, revision, list(META_PATTERNS))
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        return snapshot(repo, revision, list(META_PATTERNS) + ["*.safetensors"]), None, []
    weight_map = read_index(index, f"{repo}: model.safetensors.index.json")
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    needed = sorted(f for f, names in by_file.items() if any(keep(n) for n in names))
    skipped = [n for f, names in by_file.items() if f not in needed for n in names]
    root = snapshot(repo, revision, list(META_PATTERNS) + needed)
    missing = [f for f in needed if not (root / f).is_file()]
    if missing:
        raise SourceError(f"hub source {repo}@{revision or 'main'}: file '{missing[0]}' is not available (offline and not cached?)")
    return root, needed, skipped


def fetch_file(repo: str, revision: str | None, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    except Exception as exc:
        raise _hub_error(repo, revision, exc) from None
