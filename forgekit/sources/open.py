"""Turn a recipe `Source` into an open TensorSource plus its provenance record."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import SourceError
from ..recipe import Source
from . import hub
from .base import TensorSource
from .gguf_file import GGUFSource
from .gguf_split import SplitGGUFSource, split_parts
from .remote_gguf import open_remote_gguf
from .safetensors_dir import SafetensorsSource


def _open_path(role: str, path: Path, **kw) -> TensorSource:
    if path.suffix == ".gguf" and (parts := split_parts(path)):
        return SplitGGUFSource(role, parts)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(role, path)
    if path.is_dir() or path.suffix == ".safetensors":
        return SafetensorsSource(role, path, **kw)
    if not path.exists():
        raise SourceError(f"{path}: source '{role}' does not exist")
    raise SourceError(f"{path}: source '{role}' is neither a .gguf file, a .safetensors file nor a model directory")


def open_source(role: str, spec: Source, keep: Callable[[str], bool]) -> tuple[TensorSource, dict]:
    """Open a source; `keep(name)` tells hub sources which tensors the plan needs."""
    if spec.path is not None:
        source = _open_path(role, Path(spec.path))
        return source, {"role": role, "path": spec.path}
    if spec.file and spec.file.endswith(".gguf"):
        # header + needed tensors by HTTP byte range (or a cached / full copy): remote_gguf.py
        return open_remote_gguf(role, spec.repo, spec.file, spec.revision, keep, spec.fetch)
    if spec.file:
        local = hub.fetch_file(spec.repo, spec.revision, spec.file)
        source = _open_path(role, local)
        commit = hub.commit_of(local.parent)
    else:
        root, files, unread = hub.fetch_model_dir(spec.repo, spec.revision, keep)
        source = SafetensorsSource(role, root, only_files=files, unread=unread)
        commit = hub.commit_of(root)
    prov = {"role": role, "repo": spec.repo, "revision": spec.revision or "main", "commit": commit}
    if spec.file:
        prov["file"] = spec.file
    return source, prov
