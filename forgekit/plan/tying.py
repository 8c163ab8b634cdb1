"""Tied or untied output embeddings, decided from the tensors present and checked against the
config the build will write (recipe key `tied_embeddings`; why: finetunes' configs sometimes
contradict their tensors, and mlx-lm trusts the config: a tied config silently drops a trained
lm_head, an untied one fails to load a model that has none)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import PlanError
from ..recipe import Recipe, recipe_line
from .config_edits import MISSING, edited_config, get_dotted


def decide_tied(recipe: Recipe, output_keys: set[str], body_config: dict | None,
                body_config_file: Path | str) -> Optional[bool]:
    """True (tied) / False (untied) / None (the recipe declares no `tied_embeddings`).
    Raises PlanError, one line, when a config key states the opposite of the tensors."""
    spec = recipe.tied_embeddings
    if spec is None:
        return None
    tied = spec.head not in output_keys
    config = edited_config(body_config, recipe.config)
    for key in spec.config:
        stated = get_dotted(config, key)
        if stated is MISSING or bool(stated) == tied:
            continue
        if key in recipe.config.set:
            where, said = recipe_line(recipe, "config", "set", key), f"the recipe sets config {key}: {stated}"
        else:
            where, said = str(body_config_file), f"config says {key}: {str(stated).lower()}"
        fact = ("the body has no lm_head tensor, so it is tied" if tied else
                f"the body has the lm_head tensor ({spec.head}), so it is untied")
        raise PlanError(f"{where}: {said} but {fact}; fix the config, or override it in the recipe with "
                        f"config: {{set: {{{', '.join(f'{k}: {str(tied).lower()}' for k in spec.config)}}}}}")
    return tied
