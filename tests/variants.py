"""The tied and text-only variants of the tiny fixture, for tests: tiny_tied/ is committed
(tests/fixtures/make_tiny_variants.py made it); the text-only save is derived on the fly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from conftest import DEMO_RECIPE, FIXTURE, HEAD_GGUF, ROOT

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from make_tiny_variants import text_only  # noqa: E402

TIED = ROOT / "tests" / "fixtures" / "tiny_tied"
# The probes' prompts and thresholds are the tiny language's (tiny-demo's verify list), not the base's.
TINY_VERIFY = yaml.safe_dump({"verify": yaml.safe_load(DEMO_RECIPE.read_text())["verify"]})


def child_recipe(base: str, body: Path, mtp: str, out: Path, verify: str = TINY_VERIFY) -> str:
    """The few lines a user writes for a finetune (the verify list is the tiny fixture's)."""
    return (f"extends: {base}\nname: variant\nsources:\n  body: {{path: {body}}}\n  mtp:  {mtp}\n"
            f"output: {{dir: {out}}}\n{verify}")


def tied_recipe(body: Path, out: Path, **kw) -> str:
    return child_recipe("qwen3.5-dense-mtp", body, f"{{path: {body}, table: mtp_hf}}", out, **kw)


def text_recipe(body: Path, out: Path, **kw) -> str:
    return child_recipe("qwen3.5-text-mtp", body, f"{{path: {HEAD_GGUF}}}", out, **kw)


def tied_copy(dst: Path, **config_edits) -> Path:
    """A copy of tiny_tied with `config_edits` applied at both config levels."""
    shutil.copytree(TIED, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_edits)
    cfg["text_config"].update(config_edits)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def text_only_without(dst: Path, tensor: str) -> Path:
    """The text-only save with one tensor removed."""
    import mlx.core as mx

    text_only(dst)
    weights = mx.load(str(dst / "model.safetensors"))
    weights.pop(tensor)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    return dst
