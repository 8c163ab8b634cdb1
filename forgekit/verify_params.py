"""The params of every verify step, as frozen pydantic models (unknown keys are errors).

Imported by the recipe schema (recipe.py), so this module imports no mlx: a recipe is
validated, typos included, before anything heavy loads. Each step module reads its
params only through these models; list thresholds are checked against `depth` here.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Prompt = Union[str, tuple[int, ...]]
ComputeDtype = Literal["float32", "bfloat16"]
Convention = Literal["absolute", "zero_centred"]


class Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _per_depth(name: str, values, depth: int):
    """A list threshold must give exactly one value per draft depth."""
    if isinstance(values, tuple) and len(values) != depth:
        raise ValueError(f"{name} has {len(values)} values; depth is {depth} (one threshold per depth)")


class StructuralParams(Params):
    head_dtype: Optional[str] = Field(None, description="safetensors dtype code the head must have "
                                                        "(default: what the plan writes, bf16 unless a rule says otherwise)")


class ValuesParams(Params):
    """The values step takes no params (its sample of experts is fixed)."""


class NormsParams(Params):
    q_norm_mean: Optional[tuple[float, float]] = Field(
        None, description="heuristic absolute band for every trunk q_norm mean: a warning unless "
                          "fail_on_heuristics")
    fail_on_heuristics: bool = Field(False, description="turn the heuristic warnings into failures")
    tolerance: float = Field(0.01, ge=0)
    gguf_norms: Optional[Convention] = None
    hf_norms: Optional[Convention] = None


class LoadParams(Params):
    tokens: Optional[tuple[int, ...]] = Field(None, min_length=2)   # the head drafts from position 1
    compute_dtype: ComputeDtype = "float32"


class RandomSequences(Params):
    count: int = Field(4, gt=0)
    length: int = Field(32, gt=1)
    seed: int = 0


class ParityParams(Params):
    prompts: tuple[Prompt, ...] = ()
    new_tokens: int = Field(0, ge=0)
    max_prompt_tokens: Optional[int] = Field(None, gt=0)
    random: RandomSequences = RandomSequences()
    min_top1: float = Field(0.9, ge=0, le=1)
    max_mean_kl: float = Field(0.1, ge=0)
    compute_dtype: ComputeDtype = "float32"


class MtpParams(Params):
    prompts: tuple[Prompt, ...] = Field(min_length=1)
    max_prompt_tokens: Optional[int] = Field(None, gt=0)
    new_tokens: int = Field(32, gt=0)
    depth: int = Field(3, ge=1)
    min_agreement: Union[float, tuple[float, ...]] = 0.0
    collapse: float = Field(0.05, ge=0, le=1)
    compute_dtype: ComputeDtype = "float32"
    trace: Literal["greedy", "text"] = Field(
        "greedy", description="greedy: the trunk extends the prompts by new_tokens, one decode step a "
                              "token; text: the prompts themselves, scored in one prefill (teacher-forced)")
    context: int = Field(4, ge=1, description="trace text: rounds start once this many tokens are seen")

    @model_validator(mode="after")
    def _one_threshold_per_depth(self):
        _per_depth("min_agreement", self.min_agreement, self.depth)
        if self.trace == "greedy" and self.new_tokens < self.depth + 1:
            raise ValueError(f"new_tokens {self.new_tokens} leaves no round for depth {self.depth}")
        return self

    def thresholds(self) -> tuple[float, ...]:
        t = self.min_agreement
        return t if isinstance(t, tuple) else (t,) * self.depth


class MtplxParams(Params):
    prompts: tuple[Prompt, ...] = Field(min_length=1)
    max_prompt_tokens: Optional[int] = Field(None, gt=0)
    new_tokens: int = Field(32, gt=0)
    depth: int = Field(3, ge=1)
    min_acceptance: Optional[tuple[float, ...]] = None

    @model_validator(mode="after")
    def _one_threshold_per_depth(self):
        _per_depth("min_acceptance", self.min_acceptance, self.depth)
        return self

    def thresholds(self) -> tuple[float, ...]:
        return self.min_acceptance if self.min_acceptance is not None else (0.0,) * self.depth


# step name -> its params model (the recipe's VerifyStep union is built from this table)
PARAMS = {"structural": StructuralParams, "values": ValuesParams, "norms": NormsParams, "load": LoadParams,
          "parity": ParityParams, "mtp": MtpParams, "mtplx": MtplxParams}


def prompt_list(prompts: tuple[Prompt, ...]) -> list:
    """Prompts as the loaders take them: text, or a list of token ids."""
    return [list(p) if isinstance(p, tuple) else p for p in prompts]
