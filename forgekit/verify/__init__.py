"""Verification steps: each takes the assembled directory and the plan, returns a
result dict {step, passed, summary, ...} or raises VerifyError naming the cause.

Steps (module forgekit.verify.<step>, or MODULES[step], function run(directory, plan, params, bodies)):
structural, values (head and split/stacked tensors against the source), norms, load, parity, mtp,
mtplx (MTPLX's own runtime; may report itself skipped).
`verify_directory` runs a recipe's steps on an
existing directory (for `forgekit verify DIR --recipe R`); `report_table` renders
results for the end of a build.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from ..errors import ForgeError, VerifyError
from ..recipe import VerifyStep
from .where import verified_where

MODULES = {"mtplx": "mtplx_step"}   # step name -> module, where the name would shadow a package


def run_step(step: VerifyStep, directory: Path, plan, bodies=None) -> dict:
    """Run one step (module forgekit.verify.<step>, function run). `bodies`: a load.BodyCache
    shared by the steps of one build, so a large model is loaded once."""
    module = importlib.import_module(f"{__name__}.{MODULES.get(step.step, step.step)}")
    start = time.time()
    try:
        result = module.run(Path(directory), plan, step.params, bodies)
    except VerifyError:
        raise
    except ForgeError as exc:  # e.g. a corrupt file met while checking: still this step's failure
        raise VerifyError(step.step, str(exc)) from None
    result.setdefault("passed", True)
    result["step"] = step.step
    result["params"] = step.params.model_dump(mode="json")
    result["seconds"] = round(time.time() - start, 3)
    if not result["passed"]:
        raise VerifyError(step.step, result.get("cause", "check failed"))
    return result


def verify_directory(directory: Path | str, recipe_ref) -> dict:
    """Plan `recipe_ref` (a recipe name/path, or a BuildPlan) and run all its verify steps on
    `directory`; print a table. Verifying needs no keys, so no source is hashed.

    Returns the report {passed, steps, summary, results} (the shape of the build's
    forgekit-report.json). Raises VerifyError at the first failing step, after
    printing the table of the steps that ran.
    """
    from ..plan import BuildPlan, make_plan
    from ..recipe import load_recipe
    from .load import BodyCache

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ForgeError(f"{directory}: not a model directory (no config.json)")
    plan = recipe_ref if isinstance(recipe_ref, BuildPlan) else make_plan(load_recipe(str(recipe_ref)))
    bodies = BodyCache()
    results = []
    for step in plan.recipe.verify:
        try:
            results.append(run_step(step, directory, plan, bodies))
        except VerifyError as exc:
            results.append({"step": step.step, "passed": False, "cause": exc.cause})
            print(report_table(results), flush=True)
            raise
    print(report_table(results), flush=True)
    return {"passed": True, "steps": [r["step"] for r in results],
            "summary": {r["step"]: r.get("summary", {}) for r in results}, "results": results,
            "verified_on": verified_where(plan), "warnings": warnings_of(results)}


def warnings_of(results: list[dict]) -> list[str]:
    """Every step's warnings (heuristics that did not fail, facts the sources cannot prove)."""
    return [f"{r['step']}: {w}" for r in results for w in r.get("warnings", [])]


def _headline(result: dict) -> str:
    """The few numbers that say how a step went, in one line."""
    s = result.get("summary", {})
    step = result["step"]
    if not result.get("passed", False):
        return result.get("cause", "failed")
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    if step == "mtp":
        acc = "/".join(f"{a:.3f}" for a in s.get("acceptance", []))
        return (f"acceptance by depth {acc}, mean accepted {s.get('mean_accepted')}/round over "
                f"{s.get('rounds')} rounds ({s.get('trunk_tokens')} trunk tokens)")
    if step == "mtplx":
        acc = "/".join(f"{a:.3f}" for a in s.get("acceptance", []))
        return (f"MTPLX {s.get('mtplx')} on {s.get('device')}: acceptance by depth {acc}, "
                f"{s.get('tokens_per_verify')} tokens/verify, equals AR: {s.get('equals_ar')}")
    if step == "parity":
        return f"top-1 {s.get('top1')}, mean KL {s.get('mean_kl')} nats over {s.get('positions')} positions"
    if step == "norms":
        return (f"{s.get('norms_checked')} norms match their source (max dev {s.get('max_abs_deviation')}), "
                f"first trunk q_norm mean {s.get('trunk_q_norm_mean_first')}, head zero-centred: "
                f"{s.get('head_detector_zero_centred')}")
    return ", ".join(f"{k} {v}" for k, v in s.items() if not isinstance(v, (dict, list)))


headline = _headline   # the model card's verification table shows the same line


def report_table(results: list[dict]) -> str:
    """A readable table of verify results (one row per step), for the end of a build."""
    rows = [("step", "result", "seconds", "details")]
    for r in results:
        verdict = "FAILED" if not r.get("passed") else "skipped" if r.get("skipped") else "ok"
        rows.append((r["step"], verdict,
                     f"{r['seconds']:.1f}" if "seconds" in r else "-", _headline(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["verification:"]
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    lines += [f"  WARNING {w}" for w in warnings_of(results)]
    return "\n".join(lines)

