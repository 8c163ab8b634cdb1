"""Where a build may put its output dir: never at, over or (for the cache and a source) inside a
place it must not replace (`/`, the home directory, the cache, a local source, the recipe's
directory). The build replaces its output dir wholesale, so this is checked before any work
(when the dodo loads the recipe) and at plan time."""

from __future__ import annotations

from pathlib import Path

from .. import settings
from ..errors import ForgeError, OwnershipError
from ..recipe import recipe_line


def _protected(recipe) -> list[tuple[str, Path, bool]]:
    """(what, path, output may not lie inside it) for every place the output dir must keep clear of."""
    places = [("the file system root", Path("/"), False), ("your home directory", Path.home(), False)]
    places += [(f"source '{role}'", Path(spec.path), True) for role, spec in recipe.sources.items()
               if spec.path is not None]
    places.append(("the forgekit cache", settings.cache_root(), True))
    for f in recipe.recipe_files or ((recipe.recipe_file,) if recipe.recipe_file else ()):
        places.append(("the recipe's directory", Path(f).parent, False))
    return places


def where_output_is_decided(recipe) -> str:
    """'file:line: key' of what decides the output dir (output.dir, else name)."""
    key = ("output", "dir") if recipe.output.dir else ("name",)
    label = "output.dir" if recipe.output.dir else "name (output dir build/<name>)"
    if not recipe.recipe_file:
        return label
    try:
        return f"{recipe_line(recipe, *key)}: {label}"
    except ForgeError:
        return f"{recipe.recipe_file}: {label}"


def check_output_location(recipe) -> Path:
    """The resolved output dir, unless it is or holds a protected place (or lies in the cache or a source).

    The build replaces its output dir wholesale, so this runs before any work (and at plan time)."""
    out = recipe.output_dir().resolve()
    for what, place, not_inside in _protected(recipe):
        place = place.resolve()
        if what.startswith("source ") and (out == place or out in place.parents or place in out.parents):
            problem = f"overlaps {what} ({place})"
        elif out == place:
            problem = f"is {what}"
        elif out in place.parents:
            problem = f"contains {what} ({place})"
        elif not_inside and place in out.parents:
            problem = f"lies inside {what} ({place})"
        else:
            continue
        raise OwnershipError(f"{where_output_is_decided(recipe)} {out} {problem}; the build replaces its output dir, "
                             f"so choose another output.dir")
    return out
