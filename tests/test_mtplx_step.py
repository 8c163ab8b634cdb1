"""The `mtplx` verify step, run for real: MTPLX 2.12's own runtime loads the tiny demo build
and decodes it, here on Linux through the documented libSystem stand-in
(tests/mtplx_standin.py). The step passes the correct build and fails, by MTPLX's own
acceptance counters, a head whose fc input halves are swapped and a head whose norms
were shifted twice. The demo build itself ran in a doit subprocess without the stand-in,
where mtplx does not import: there the step must say "skipped" and mtplx_runtime.json
must not claim an MTPLX verification."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from conftest import DEMO_RECIPE
from forgekit.errors import VerifyError
from forgekit.recipe import VERIFY_STEP
from forgekit.verify import report_table, run_step

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEMO_STEP = next(VERIFY_STEP.validate_python(s) for s in yaml.safe_load(DEMO_RECIPE.read_text())["verify"] if s["step"] == "mtplx")
LINUX_ONLY = pytest.mark.skipif(sys.platform == "darwin", reason="on macOS mtplx imports without a stand-in")


@pytest.fixture(scope="module")
def standin():
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the libSystem stand-in")
    import mtplx_standin

    mtplx_standin.install()


@pytest.fixture(scope="module")
def good_result(standin, built_demo):
    return run_step(DEMO_STEP, built_demo, None)


def mutated(built_demo: Path, tmp: Path, edit) -> Path:
    copy = tmp / "copy"
    shutil.copytree(built_demo, copy)
    head = edit(dict(mx.load(str(copy / "mtp.safetensors"))))
    mx.save_safetensors(str(copy / "mtp.safetensors"), head, metadata={"format": "mlx"})
    return copy


def swap_fc_halves(head: dict) -> dict:
    w = head["mtp.fc.weight"]
    half = w.shape[1] // 2
    head["mtp.fc.weight"] = mx.concatenate([w[:, half:], w[:, :half]], axis=1)
    return head


def shift_head_norms(head: dict) -> dict:
    """+1 on every head norm: a head whose (already absolute) norms were shifted once more."""
    shifted = [k for k, v in head.items() if "norm" in k and v.ndim == 1]
    assert len(shifted) == 7, shifted
    for k in shifted:
        head[k] = (head[k].astype(mx.float32) + 1).astype(head[k].dtype)
    return head


def failed_acceptance(directory: Path) -> dict[int, list[float]]:
    """Run the step on a mutated build; it must fail naming acceptance; returns it by decode depth."""
    with pytest.raises(VerifyError) as err:
        run_step(DEMO_STEP, directory, None)
    assert err.value.step == "mtplx"
    cause = err.value.cause
    assert "acceptance below min_acceptance 0.95/0.9/0.85" in cause, cause
    assert "not AR-exact" not in cause, cause        # speculation stays exact; only acceptance drops
    return {int(d): [float(a) for a in accs.split("/")]
            for d, accs in re.findall(r"depth-(\d) decode ([\d./]+)", cause)}


def test_passes_the_demo_build_by_mtplx_counters(good_result):
    s = good_result["summary"]
    assert good_result["passed"] and "skipped" not in good_result
    assert s["equals_ar"] is True
    assert s["mtplx"].startswith("2.") and s["mlx"] == mx.__version__ and s["device"].startswith("Device(")
    assert [run["depth"] for run in s["by_depth"]] == [1, 2, 3]
    for run in s["by_depth"]:
        assert len(run["accepted_by_depth"]) == run["depth"] and min(run["drafted_by_depth"]) > 0
        assert all(a >= t for a, t in zip(run["acceptance"], (0.95, 0.90, 0.85))), run
    # three accepted drafts + the bonus token per verify round, except a round cut by new_tokens
    assert s["by_depth"][-1]["tokens_per_verify"] > 3.5


def test_fails_the_fc_halves_swapped(standin, built_demo, tmp_path):
    acceptance = failed_acceptance(mutated(built_demo, tmp_path, swap_fc_halves))
    assert acceptance[1][0] < 0.5, acceptance


def test_fails_head_norms_shifted_twice(standin, built_demo, tmp_path):
    acceptance = failed_acceptance(mutated(built_demo, tmp_path, shift_head_norms))
    assert acceptance[3][0] < 0.95 and acceptance[3][2] < 0.85, acceptance


@LINUX_ONLY
def test_skipped_where_mtplx_does_not_import_and_the_runtime_file_says_so(built_demo):
    """built_demo ran in a doit subprocess without the stand-in: importing mtplx failed there."""
    probe = subprocess.run([sys.executable, "-c", "import mtplx.route_tape"], capture_output=True, text=True)
    assert probe.returncode != 0 and "libSystem" in probe.stderr, probe.stderr
    report = json.loads((built_demo / "forgekit-report.json").read_text())
    result = next(r for r in report["results"] if r["step"] == "mtplx")
    assert result["skipped"].startswith("mtplx not importable") and "libSystem" in result["skipped"]
    assert re.search(r"mtplx\s+skipped\s+[\d.]+\s+skipped: mtplx not importable", report_table([result]))
    runtime = json.loads((built_demo / "mtplx_runtime.json").read_text())
    assert runtime["verified_on"]["mtplx_runtime"]["status"] == "skipped"
    assert "mtplx" not in runtime["exactness_baseline"]["method"]
    assert "mtplx" in runtime["exactness_baseline"]["skipped"]
