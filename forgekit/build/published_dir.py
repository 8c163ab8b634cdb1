"""A published output directory read back: its manifest, the recipe it records, and whether its
files still are what the build wrote (what `forgekit verify DIR` and `forgekit publish` rely on)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ForgeError
from .memo import hash_file
from .names import MANIFEST, holds_manifest


def manifest_of(directory: Path) -> dict:
    """The manifest of a forgekit output dir; one line naming the dir if it has none."""
    directory = Path(directory)
    if not holds_manifest(directory):
        raise ForgeError(f"{directory}: not a forgekit output (no readable {MANIFEST})")
    return json.loads((directory / MANIFEST).read_text())


def recorded_recipe(directory: Path) -> str:
    """The recipe a build recorded: its file when it still exists, else its name (looked up as usual)."""
    manifest = manifest_of(directory)
    recipe_file = manifest.get("recipe_file")              # relative to the output dir
    if isinstance(recipe_file, str) and recipe_file and (Path(directory) / recipe_file).is_file():
        return str((Path(directory) / recipe_file).resolve())
    if manifest.get("recipe"):
        return manifest["recipe"]
    raise ForgeError(f"{directory}: its manifest records no recipe; pass --recipe")


def changed_files(directory: Path, manifest: dict) -> list[str]:
    """Files the manifest lists whose content no longer has the recorded digest (or that are gone).
    Every file is re-hashed: a publish must not trust a (mtime, size) memo."""
    return [name for name, digest in sorted(manifest.get("files", {}).items())
            if not (Path(directory) / name).is_file() or hash_file(Path(directory) / name) != digest]
