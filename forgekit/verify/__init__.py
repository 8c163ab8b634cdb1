"""Verification steps: each takes the assembled directory and the plan, returns a
result dict {step, passed, summary, ...} or raises VerifyError naming the cause."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from ..errors import VerifyError
from ..recipe import VerifyStep


def run_step(step: VerifyStep, directory: Path, plan) -> dict:
    """Run one step (module forgekit.verify.<step>, function run)."""
    module = importlib.import_module(f"{__name__}.{step.step}")
    start = time.time()
    result = module.run(Path(directory), plan, dict(step.params))
    result.setdefault("passed", True)
    result["step"] = step.step
    result["params"] = dict(step.params)
    result["seconds"] = round(time.time() - start, 3)
    if not result["passed"]:
        raise VerifyError(step.step, result.get("cause", "check failed"))
    return result
