"""Before a build (`forgekit validate`): every verify step that runs prompts through the model
has the tokenizer it needs, and every prompt becomes token ids inside the body's vocabulary.
Without this, a missing tokenizer is found only when the parity step, after the whole build,
says a prompt "gives no token ids"."""

from __future__ import annotations

from pathlib import Path

from ..errors import ForgeError
from ..mtp_head import text_args
from ..recipe import recipe_line

PROMPT_STEPS = ("parity", "mtp", "mtplx")      # the steps whose params.prompts feed the model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _tokenizer(root: Path | None, where: str, step: str):
    if root is None or not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise ForgeError(f"{where}: verify step '{step}' has text prompts but the body ({root}) has no tokenizer "
                         f"({' or '.join(TOKENIZER_FILES)}); add the tokenizer files or give token id lists")
    from mlx_lm.tokenizer_utils import load

    try:
        return load(root)
    except Exception as exc:  # transformers' own words are the cause
        raise ForgeError(f"{where}: verify step '{step}': the body's tokenizer does not load "
                         f"({type(exc).__name__}: {exc})") from None


def check_prompts(plan) -> int:
    """Raise ForgeError (one line, recipe file:line) on the first prompt that cannot run; returns
    the number of prompts checked."""
    vocab = text_args(plan.body.config or {}).vocab_size
    tokenizer, checked = None, 0
    for i, step in enumerate(plan.recipe.verify):
        if step.step not in PROMPT_STEPS:
            continue
        for j, prompt in enumerate(getattr(step.params, "prompts", ()) or ()):
            where = recipe_line(plan.recipe, "verify", i, "params", "prompts")
            if isinstance(prompt, str):
                tokenizer = tokenizer or _tokenizer(plan.body.root, where, step.step)
                ids = tokenizer.encode(prompt, add_special_tokens=False)
            else:
                ids = list(prompt)
            if not ids:
                raise ForgeError(f"{where}: verify.{i} ({step.step}) prompt {j} gives no token ids")
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ForgeError(f"{where}: verify.{i} ({step.step}) prompt {j} has token id {bad[0]} outside "
                                 f"the body's vocabulary (vocab_size {vocab})")
            checked += 1
    return checked
