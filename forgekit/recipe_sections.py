"""Recipe sections that need nothing else of the schema: config edits, tied embeddings, the typed
verify steps and the model card (split from recipe.py, which imports them from here)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from .verify_params import PARAMS


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigEdits(Frozen):
    """Edits to the body's config.json, in this order: the whole config nested under one key
    (`nest`: a flat text-only save -> the nested form), keys dropped (dotted paths), keys set."""

    nest: Optional[str] = None
    drop: tuple[str, ...] = ()
    set: dict[str, Any] = {}


class TiedEmbeddings(Frozen):
    """Tied or untied output embeddings, decided from the tensors present: the model is tied when
    the plan has no `head` output tensor. Every `config` key (dotted, in the edited config) that
    states it must agree; a recipe overrides a wrong body config with `config.set` on those keys.
    The output config states the decision at every `config` key (mlx-lm reads the first)."""

    head: str
    config: tuple[str, ...] = Field(min_length=1)


def _verify_step(name: str, params_model: type) -> type:
    """The recipe entry `{step: <name>, params: {...}}`, its params typed by `params_model`."""
    return create_model(f"VerifyStep_{name}", __base__=Frozen, step=(Literal[name], ...),
                        params=(params_model, params_model()) if name not in STEPS_NEEDING_PARAMS
                        else (params_model, ...))


# One model per step (verify_params.PARAMS), told apart by `step`: a typo in params is an unknown key.
STEPS_NEEDING_PARAMS = ("mtp", "mtplx")           # their prompts have no default
VerifyStep = Annotated[Union[tuple(_verify_step(n, m) for n, m in PARAMS.items())], Field(discriminator="step")]
VERIFY_STEP = TypeAdapter(VerifyStep)              # VERIFY_STEP.validate_python({"step": ..., "params": ...})


class Card(Frozen):
    """What the model card says that the sources cannot tell (each field overrides a default)."""

    title: Optional[str] = Field(None, description="heading of the card (default: the recipe name)")
    repo: Optional[str] = Field(None, description="the Hub repo the build is published as (usage lines name it; "
                                                  "`forgekit publish --repo` fills it in otherwise)")
    license: Optional[str] = Field(None, description="Hub license id (default: the body's card or config)")
    license_name: Optional[str] = Field(None, description="with license: other")
    license_link: Optional[str] = None
    base_model: Optional[str] = Field(None, description="default: the body's repo id, when the body is a repo")
    tags: tuple[str, ...] = Field((), description="added to the standard tags")
    credits: tuple[str, ...] = Field((), description="extra lines for the credits section")
