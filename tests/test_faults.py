"""Crash safety, proven with real doit runs and real SIGKILLs.

A build is killed at named checkpoints (forgekit/faults.py: `FORGEKIT_TEST_FAULT=<point>:<n>:tree`
SIGKILLs the whole build — doit, and the helper processes writing shards — the n-th time a
process reaches <point>) while it replaces an earlier good build of the same output dir. Then:
  - the output dir is still exactly the earlier build (or, once the swap is done, exactly the
    new one): never a mix, never a half-written file under a final name;
  - a rerun completes and its output is byte-identical to a clean build in a fresh dir;
  - nothing partial survives or is served: no temp files, no staging dir, every cache object
    hashes to its record, the manifest's digests are the files' digests, and a third run is a no-op.
Most points use the demo recipe with `verify: []` (~0.5 s a build); the verify points use the
demo's full verify list. Disk full is tested three ways: a real tmpfs that fills up (when this
sandbox may mount one), a real file size limit (RLIMIT_FSIZE: the kernel fails the write with
EFBIG), and ENOSPC raised at a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO_RECIPE, HEAD_GGUF, ROOT, ran_tasks, run_doit, write_recipe
from forgekit.build.gc import cache_verify
from forgekit.build.memo import hash_file
from forgekit.faults import POINTS

# Helpers on, tiny jobs, sources hashed on the pool: every worker-side point is reachable.
POOL = {"FORGEKIT_JOBS": "2", "FORGEKIT_TEST_POOL_MIN_BYTES": "0", "FORGEKIT_TEST_JOB_BYTES": "4096",
        "FORGEKIT_TEST_HASH_IN_POOL_BYTES": "0"}
CHEAP = "verify: []"
FULL = ""  # the demo's own verify list (structural, norms, load, parity, mtp)
AFTER_SWAP = {"swap.exchanged", "publish.swapped"}

# (point, n): the n-th time a process reaches the point. Each runs on the cheap recipe.
KILLS = [
    ("lock.held", 1),            # lock taken, nothing planned
    ("cache.hash", 1),           # hashing a source file (content address of the inputs)
    ("pool.hash", 2),            # about to hash a source on the pool
    ("memo.remember", 1),        # recording a source digest in the stat memo
    ("plan.hashed", 1),          # sources hashed, no key computed
    ("shard.begin", 1),          # first shard task starting
    ("shard.begin", 3),          # between shards: two committed, the third not started
    ("write.sized", 1),          # shard temp file sized, no tensor data
    ("piece", 1),                # first piece in the build process
    ("piece", 6),                # mid-shard
    ("helper.piece", 3),         # mid-shard, in a helper process
    ("piece.partial", 2),        # a quantized piece with weights written, scales/biases not
    ("copy.chunk", 1),           # a tensor copied without decoding (the bf16 head)
    ("write.pieces-done", 2),    # second shard fully written, not hashed
    ("shard.written", 1),        # temp object complete, not committed
    ("commit.renamed", 2),       # object in the store without its record
    ("commit.recorded", 1),      # object + record in place, doit state not saved
    ("atomic.tmp-written", 2),   # the first record's temp file written, not renamed (1: the lease)
    ("memo.tmp-written", 1),     # a memo's temp file written, not renamed (in a fresh cache: the shapes memo)
    ("stage.begin", 1),          # staging dir emptied
    ("stage.file", 2),           # staging half assembled
    ("place.tmp", 3),            # a staged file linked under its temp name
    ("stage.recorded", 1),       # staged, staging record missing
    ("publish.meta", 1),         # report/runtime/model card staged, no manifest
    ("publish.manifest", 1),     # manifest staged, not swapped
    ("swap.exchanged", 1),       # new output in place, old one not yet deleted
    ("publish.swapped", 1),      # swapped, registry/stat memo/lock file not updated
]
# The same on the full verify list: during the first and the model-running steps.
VERIFY_KILLS = [("verify.begin", 1), ("verify.begin", 4), ("verify.done", 5), ("publish.meta", 1)]
DOWNLOAD_KILLS = [("download.chunk", 1)]   # the MTP head fetched by byte range from a (local fake) hub

TIMED = re.compile(r'("\w*seconds"\s*:\s*)(\{[^{}]*\}|[-0-9.e]+)')
# parity says whether its bf16 source reference came from the cache: run metadata, like timings
TIMED_FIELDS = re.compile(r'("reference"\s*:\s*)("cached"|"computed"|"computed, not cached")')


def recipes(work: Path, verify: str) -> tuple[Path, Path]:
    """The recipe under test and an earlier variant of it writing the same output dir: 8-bit
    instead of 4-bit trunk and head, so no shard object of one can stand in for the other's."""
    target = write_recipe(work, f"extends: {DEMO_RECIPE}\nname: faults\n"
                                f"output: {{dir: out, max_shard_bytes: 100000}}\n{verify}\n", "recipe.yaml")
    earlier = write_recipe(work, f"extends: {target}\nname: faults\nverify: []\nquantization:\n"
                                 f"  default: {{bits: 8}}\n  rules: [{{name: head-8bit, match: 'mtp\\..*', bits: 8}}]\n",
                           "earlier.yaml")
    return target, earlier


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def untimed(files: dict[str, bytes]) -> dict[str, bytes]:
    """Verification results carry timings; blank them (everything else must match exactly)."""
    out = {}
    for name, data in files.items():
        if name.endswith((".json", ".md")):
            text = TIMED_FIELDS.sub(r"\1R", TIMED.sub(r"\1T", data.decode()))
            if name == ".forgekit/manifest.json":  # digests of the files that hold timings
                m = json.loads(text)
                m["files"] = {k: v for k, v in m["files"].items() if not k.endswith((".json", ".md"))
                              or k in ("config.json", "model.safetensors.index.json", "tokenizer.json",
                                       "tokenizer_config.json", "generation_config.json")}
                text = json.dumps(m, sort_keys=True)
            data = text.encode()
        out[name] = data
    return out


def doit_cmd(recipe: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(work), "build", f"recipe={recipe}"]


def run_faulted(recipe: Path, work: Path, cache: Path, fault: str, env: dict | None = None,
                preexec=None) -> subprocess.CompletedProcess:
    """A real doit build in its own session (so `tree` kills the build, never pytest)."""
    full = {**os.environ, "FORGEKIT_CACHE": str(cache), "FORGEKIT_TEST_FAULT": fault,
            "FORGEKIT_TEST_FAULT_LOG": str(work / "fault.log"), **POOL, **(env or {})}
    return subprocess.run(doit_cmd(recipe, work), cwd=work, env=full, capture_output=True, text=True,
                          timeout=120, start_new_session=True, preexec_fn=preexec)


def leftovers(work: Path, cache: Path) -> list[str]:
    """Anything a finished build must not leave behind."""
    found = [str(p) for p in (cache / "objects").rglob("*.tmp")]
    found += [str(p) for p in work.glob("out.staging")] + [str(p) for p in work.glob("out.old-*")]
    found += [str(p) for p in work.glob(".*.tmp")]  # e.g. <out>.lock.json's temp file
    found += [str(p) for p in (work / "out").rglob("*.tmp")] if (work / "out").exists() else []
    return found


def assert_consistent(work: Path, cache: Path) -> None:
    assert leftovers(work, cache) == []
    assert cache_verify(cache, remove=False) == [], "a cache object does not hash to its record"
    for obj in (cache / "objects").glob("*/*.safetensors"):
        assert obj.with_suffix(".json").is_file(), f"{obj}: object without a record"
    manifest = json.loads((work / "out" / ".forgekit" / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hash_file(work / "out" / name) == digest, f"manifest digest of {name} is not its file's"


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Clean builds (serial, default settings, fresh dir and cache) of both recipe variants. The
    dir of each earlier variant's clean build is kept (under "<label>-earlier-dir") as the
    starting point the kill tests copy instead of building it again."""
    refs = {}
    for label, verify in (("cheap", CHEAP), ("full", FULL)):
        work = tmp_path_factory.mktemp(f"clean-{label}")
        target, _ = recipes(work, verify)
        proc = run_doit(target, work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        refs[label] = tree(work / "out")
        work = tmp_path_factory.mktemp(f"earlier-{label}")
        _, earlier = recipes(work, verify)
        proc = run_doit(earlier, work, cache=work / "cache-earlier")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        refs[f"{label}-earlier"] = tree(work / "out")
        refs[f"{label}-earlier-dir"] = work
    return refs


def earlier_build(work: Path, label: str, references) -> dict[str, bytes]:
    """An earlier good build of work/out (its own cache): a copy of the module's clean build of the
    earlier variant, everything it left in its dir (out, its sibling files, cache-earlier) with
    mtimes; it is built for real once per module, not once per test (output is path-independent)."""
    template = references[f"{label}-earlier-dir"]
    for entry in template.iterdir():
        if entry.name in ("recipe.yaml", "earlier.yaml"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, work / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, work / entry.name, follow_symlinks=False)
    before = tree(work / "out")
    assert before == references[f"{label}-earlier"]
    return before


def kill_and_rerun(work: Path, point: str, n: int, verify: str, references) -> None:
    label = "cheap" if verify == CHEAP else "full"
    expected = references[label]
    same = (lambda a, b: a == b) if label == "cheap" else (lambda a, b: untimed(a) == untimed(b))
    target, _ = recipes(work, verify)
    cache = work / "cache"
    before = earlier_build(work, label, references)   # an earlier good build of the same output dir

    proc = run_faulted(target, work, cache, f"{point}:{n}:tree")
    log = (work / "fault.log").read_text() if (work / "fault.log").exists() else ""
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}:{n}\n{proc.stdout}{proc.stderr}"
    assert f" {point} {n} tree" in log, log
    # The output dir is one whole build, never a mix; nothing half-written under a final name.
    now = tree(work / "out")
    if point in AFTER_SWAP:
        assert same(now, expected), f"{point}: swapped output differs from a clean build"
    else:
        assert now == before, f"{point}: the earlier good output was touched"

    proc = run_doit(target, work, cache=cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert same(tree(work / "out"), expected), f"after a kill at {point}:{n} the rerun differs from a clean build"
    assert_consistent(work, cache)
    again = run_doit(target, work, cache=cache)
    assert again.returncode == 0 and ran_tasks(again) == [], again.stdout


def test_every_kill_point_is_in_the_code_and_exercised():
    src = "\n".join(p.read_text() for p in (ROOT / "forgekit").rglob("*.py") if p.name != "faults.py")
    in_code = {name for call in re.findall(r"checkpoint\(([^)]*)\)", src) for name in re.findall(r'"([^"]+)"', call)}
    assert in_code == set(POINTS), f"in the code only: {in_code - set(POINTS)}, declared only: {set(POINTS) - in_code}"
    tested = {p for p, _ in KILLS + VERIFY_KILLS + DOWNLOAD_KILLS}
    assert tested == set(POINTS), f"untested: {set(POINTS) - tested}"
    assert len(set(KILLS + VERIFY_KILLS + DOWNLOAD_KILLS)) >= 20


@pytest.mark.parametrize("point,n", KILLS, ids=[f"{p}:{n}" for p, n in KILLS])
def test_sigkill_then_rerun_gives_a_clean_build(tmp_path, point, n, references):
    kill_and_rerun(tmp_path, point, n, CHEAP, references)


@pytest.mark.slow
@pytest.mark.parametrize("point,n", VERIFY_KILLS, ids=[f"{p}:{n}" for p, n in VERIFY_KILLS])
def test_sigkill_during_verification_then_rerun(tmp_path, point, n, references):
    kill_and_rerun(tmp_path, point, n, FULL, references)


@pytest.mark.parametrize("point,n", DOWNLOAD_KILLS, ids=[f"{p}:{n}" for p, n in DOWNLOAD_KILLS])
def test_sigkill_during_a_download_then_rerun(tmp_path, point, n):
    """Killed while the head's byte ranges are written into the small cached GGUF: the
    half-fetched file is never used; the rerun fetches again and builds what a clean run builds."""
    from fake_hub import FakeHub, serve

    fake = FakeHub()
    fake.add("org/tiny-GGUF", {"tiny-MTP-BF16.gguf": HEAD_GGUF})
    builds = {}
    with serve(fake) as url:
        for label in ("clean", "killed"):
            work = tmp_path / label
            work.mkdir()
            env = {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(work / "hf-cache"), "HF_HOME": str(work / "hf-home"),
                   "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
            r = write_recipe(work, f"extends: {DEMO_RECIPE}\nname: remote\nverify: []\noutput: {{dir: out}}\n"
                                   f"sources:\n  mtp: {{repo: org/tiny-GGUF, file: tiny-MTP-BF16.gguf, fetch: ranges}}\n")
            if label == "killed":
                proc = run_faulted(r, work, work / "cache", f"{point}:{n}:tree", env=env)
                assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
                assert f" {point} {n} tree" in (work / "fault.log").read_text()
                fetched = list((work / "cache" / "remote-gguf").rglob("*"))
                assert [p for p in fetched if p.name.endswith(".tmp")], "no half-fetched temp file: killed too late?"
                assert not [p for p in fetched if p.suffix == ".gguf"], "a half-fetched GGUF under its final name"
                assert not (work / "out").exists()
            proc = run_doit(r, work, env=env)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            builds[label] = {n: b for n, b in tree(work / "out").items()}
            assert not list((work / "cache").rglob("*.tmp")), "a temp file survived the rerun"
    assert builds["killed"] == builds["clean"]


def test_a_helper_killed_alone_fails_the_build_in_one_line(tmp_path, references):
    """Only one helper process dies (as the OOM killer would): the build must not hang on the
    piece it held; it fails with one line, and a rerun is a clean build."""
    target, _ = recipes(tmp_path, CHEAP)
    proc = run_faulted(target, tmp_path, tmp_path / "cache", "helper.piece:2:kill")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "a helper process of this build died" in output and "Traceback" not in output, output
    assert not (tmp_path / "out").exists()
    proc = run_doit(target, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tree(tmp_path / "out") == references["cheap"]
    assert_consistent(tmp_path, tmp_path / "cache")


# ---------------------------------------------------------------- disk full


def assert_clean_disk_failure(proc, work: Path, cache: Path, message: str, before: dict | None) -> None:
    output = proc.stdout + proc.stderr
    # exit 1: a task failed (doit prints the line); exit 2: refused while planning (e.g. the
    # build's lease file under cache/leases), the same line with forgekit's prefix
    assert proc.returncode in (1, 2), output
    assert "Traceback" not in output, output
    errors = [line.removeprefix("forgekit: ") for line in output.splitlines()
              if line.removeprefix("forgekit: ").startswith("cannot write ")]
    assert len(errors) == 1 and re.search(message, errors[0]), output
    assert list((cache / "objects").rglob("*.tmp")) == [], "a temp file was left in the cache"
    for obj in (cache / "objects").glob("*/*.safetensors"):  # every object kept is whole and recorded
        assert obj.with_suffix(".json").is_file(), obj
    assert cache_verify(cache, remove=False) == []
    if before is None:
        assert not (work / "out" / ".forgekit" / "manifest.json").exists()
    else:
        assert tree(work / "out") == before


@pytest.mark.parametrize("point", ["piece:3", "copy.chunk:1", "atomic.tmp-written:2"])
def test_disk_full_at_a_checkpoint(tmp_path, point, references):
    """ENOSPC raised where bytes are written: mid-shard, in a copied tensor, in a cache record."""
    target, _ = recipes(tmp_path, CHEAP)
    cache = tmp_path / "cache"
    proc = run_faulted(target, tmp_path, cache, f"{point}:enospc", env={"FORGEKIT_JOBS": "1"})
    assert_clean_disk_failure(proc, tmp_path, cache, r"No space left on device$", None)
    proc = run_doit(target, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tree(tmp_path / "out") == references["cheap"]


def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_file_size_limit_fails_a_shard_write_cleanly(tmp_path, references):
    """A real kernel refusal: no file of the build may exceed 40 kB (RLIMIT_FSIZE), so writing
    the first shard object fails with EFBIG. Earlier output untouched, no object recorded."""
    target, _ = recipes(tmp_path, CHEAP)
    before = earlier_build(tmp_path, "cheap", references)
    cache = tmp_path / "cache"
    proc = run_faulted(target, tmp_path, cache, "", preexec=_limit_file_size(40_000))
    # The trunk shards (10-29 kB) fit; the 100 kB head object is refused by the kernel.
    assert_clean_disk_failure(proc, tmp_path, cache, r"^cannot write mtp\.safetensors into the cache "
                                                     r"\(.*\): File too large$", before)
    records = [json.loads(p.read_text()) for p in (cache / "objects").glob("*/*.json")]
    assert records and all(r["file"] != "mtp.safetensors" for r in records)
    proc = run_doit(target, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tree(tmp_path / "out") == references["cheap"]
    assert_consistent(tmp_path, cache)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not permitted, e.g. in CI)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    f"disk full is still covered by the RLIMIT_FSIZE and ENOSPC-checkpoint tests")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_real_disk_full_on_a_small_tmpfs(tmp_path, small_tmpfs, references):
    """The cache lives on a 256 KiB tmpfs: the trunk shards fit, the head object (100 kB) does not."""
    target, _ = recipes(tmp_path, CHEAP)
    cache = small_tmpfs / "cache"
    proc = run_faulted(target, tmp_path, cache, "", env={"FORGEKIT_JOBS": "1"})
    assert_clean_disk_failure(proc, tmp_path, cache, r"^cannot write mtp\.safetensors into the cache "
                                                     r"\(.*\): No space left on device$", None)
    # With room, the same recipe builds cleanly.
    proc = run_doit(target, tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tree(tmp_path / "out") == references["cheap"]
