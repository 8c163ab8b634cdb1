"""A build never destroys or writes what is not its own (issue 9, part A).

Real `doit build` runs on the tiny fixture. `<out>` is written only when it is absent, empty or a
forgekit output, and never when it is, holds, or lies in a place a build must not replace; sibling
names (`<out>.staging`, `<out>.build-lock`, `<out>.lock.json`) are never followed through a symlink
nor taken over from a foreign file. Every refusal is one line on stderr and exit code 2, and the
user's files are compared byte for byte before and after. Ctrl-C is one line, artifact intact.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BODY, DEMO_RECIPE, HEAD_GGUF, ROOT, write_recipe
from forgekit.errors import OwnershipError

REFUSE_WITHIN = 10   # seconds: a refusal happens at load time, before any work


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.fixture(scope="module")
def cache(work) -> Path:
    return work / "cache"


def doit(recipe: Path, cwd: Path, cache: Path, env: dict | None = None, args: tuple[str, ...] = (),
         timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "FORGEKIT_CACHE": str(cache), **(env or {})}
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(cwd), *args, "build",
           f"recipe={recipe}"]
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def recipe_for(directory: Path, out: str, extra: str = "", name: str = "demo-under-test") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_recipe(directory, f"extends: {DEMO_RECIPE}\nname: {name}\noutput: {{dir: {out}}}\nverify: []\n{extra}")


def refused(recipe: Path, cwd: Path, cache: Path, env: dict | None = None, args: tuple[str, ...] = ()) -> str:
    """Run the build; require exit 2 and exactly one `forgekit: ...` line, no traceback; return it."""
    proc = doit(recipe, cwd, cache, env, args, timeout=REFUSE_WITHIN)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("forgekit: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def snapshot(directory: Path) -> dict[str, object]:
    """Every entry under `directory` (never following links): file bytes, link targets, dir marks."""
    found: dict[str, object] = {}
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(directory))
            if p.is_symlink():
                found[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                found[rel] = "dir"
            elif not p.is_file():
                found[rel] = ("special", os.lstat(p).st_mode)   # a FIFO: never opened
            else:
                found[rel] = p.read_bytes()
    return found


def user_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("the user's notes\n")
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)) * 4)
    return path


def built(work: Path, cache: Path, name: str) -> Path:
    """A fresh forgekit output at work/<name>/out (warm shared cache: seconds)."""
    recipe = recipe_for(work / name, "out")
    proc = doit(recipe, work / name, cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / name / "out"


NOT_OURS = "exists and is not a forgekit output; choose another output.dir or remove it"


# ---------------------------------------------------------------- ownership of <out>


def test_a_directory_with_user_files_is_refused_and_kept(work, cache):
    case = work / "userdir"
    out = user_dir(case / "mine")
    before = snapshot(out)
    line = refused(recipe_for(case, "mine"), case, cache)
    assert line == f"forgekit: {case / 'recipe.yaml'}:3: output.dir: {out} {NOT_OURS}"
    assert snapshot(out) == before


def test_home_directory_is_refused_and_kept(work, cache):
    case = work / "home"
    home = user_dir(case / "me")
    before = snapshot(home)
    line = refused(recipe_for(case, '"~"'), case, cache, env={"HOME": str(home)})
    assert line.endswith(f"output.dir {home} is your home directory; the build replaces its "
                         f"output dir, so choose another output.dir")
    assert snapshot(home) == before


def test_an_output_under_the_home_directory_is_fine(work, cache):
    case = work / "under-home"
    home = user_dir(case / "me")
    recipe = recipe_for(case, '"~/models/demo"')
    proc = doit(recipe, case, cache, env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (home / "models" / "demo" / ".forgekit" / "manifest.json").is_file()
    assert (home / "notes.txt").read_text() == "the user's notes\n"


def test_the_recipes_own_directory_is_refused_and_kept(work, cache):
    case = work / "dot"
    user_dir(case)
    recipe = recipe_for(case, ".")
    before = snapshot(case)
    line = refused(recipe, case, cache)
    assert line.endswith(f"output.dir {case} is the recipe's directory; the build replaces its output dir, "
                         f"so choose another output.dir")
    assert snapshot(case) == before


def test_a_symlink_to_a_user_directory_is_refused_and_its_target_kept(work, cache):
    case = work / "symlink"
    target = user_dir(case / "target")
    (case / "link").symlink_to(target, target_is_directory=True)
    recipe = recipe_for(case, "link")
    before = snapshot(case)
    line = refused(recipe, case, cache)
    assert line.endswith(f"{target} {NOT_OURS}")
    assert snapshot(case) == before and (case / "link").is_symlink()


def test_the_cache_directory_is_refused_and_kept(work):
    case = work / "cachedir"
    own_cache = user_dir(case / "cache")
    before = snapshot(own_cache / "sub") | {"notes": (own_cache / "notes.txt").read_bytes()}
    line = refused(recipe_for(case, "cache"), case, own_cache)
    assert line.endswith(f"output.dir {own_cache} is the forgekit cache; the build replaces its output dir, "
                         f"so choose another output.dir")
    assert snapshot(own_cache / "sub") | {"notes": (own_cache / "notes.txt").read_bytes()} == before


def test_an_output_inside_the_cache_is_refused(work, cache):
    case = work / "in-cache"
    line = refused(recipe_for(case, str(cache / "objects" / "mine")), case, cache)
    assert f"lies inside the forgekit cache ({cache})" in line
    assert not (cache / "objects" / "mine").exists()


def test_a_regular_file_at_out_is_refused_and_kept(work, cache):
    case = work / "file"
    case.mkdir()
    (case / "out").write_bytes(b"not a directory\x00\xff")
    line = refused(recipe_for(case, "out"), case, cache)
    assert line.endswith(f"{case / 'out'} {NOT_OURS}")
    assert (case / "out").read_bytes() == b"not a directory\x00\xff"


def test_the_root_directory_is_refused(work, cache):
    case = work / "root"
    line = refused(recipe_for(case, "/"), case, cache)
    assert line.endswith("output.dir / is the file system root; the build replaces its output dir, "
                         "so choose another output.dir")


@pytest.mark.parametrize("where, problem", [("src", "overlaps source 'body'"),
                                            ("src/body/inner", "overlaps source 'body'")])
def test_an_output_overlapping_a_local_source_is_refused(work, cache, where, problem):
    case = work / f"source-{where.replace('/', '-')}"
    shutil.copytree(BODY, case / "src" / "body")
    before = snapshot(case / "src")
    recipe = recipe_for(case, where, extra=f"sources:\n  body: {{path: src/body}}\n  mtp: {{path: {HEAD_GGUF}}}\n")
    line = refused(recipe, case, cache)
    assert problem in line
    assert snapshot(case / "src") == before


@pytest.mark.parametrize("name", ['"../escape"', '"a/b"', '"bad\\0name"', '".."'])
def test_a_name_that_escapes_build_is_refused_naming_file_line_and_key(work, cache, name):
    case = work / f"name-{abs(hash(name))}"
    case.mkdir()
    recipe = write_recipe(case, f"extends: {DEMO_RECIPE}\nname: {name}\n")
    line = refused(recipe, case, cache)
    assert line.startswith(f"forgekit: {recipe}:2: name: ") and "must be a plain name" in line
    assert not (case / "build").exists() and not (case / "escape").exists()


def test_an_empty_directory_and_an_existing_forgekit_output_are_built_into(work, cache):
    case = work / "ours"
    (case / "out").mkdir(parents=True)
    recipe = recipe_for(case, "out")
    first = doit(recipe, case, cache)
    assert first.returncode == 0, first.stdout + first.stderr
    recipe = recipe_for(case, "out", extra="description: a rebuild with another model card\n")
    again = doit(recipe, case, cache)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "a rebuild with another model card" in (case / "out" / "README.md").read_text()


def test_doit_clean_refuses_a_foreign_output_and_keeps_it(work, cache):
    case = work / "clean"
    out = user_dir(case / "mine")
    before = snapshot(out)
    line = refused(recipe_for(case, "mine"), case, cache, args=("clean",))
    assert line.endswith(f"{out} {NOT_OURS}")
    assert snapshot(out) == before


# ---------------------------------------------------------------- sibling names


CHANGED = "description: changed, so stage and publish would run\n"


@pytest.mark.parametrize("suffix", [".build-lock", ".staging", ".lock.json"])
def test_a_symlink_at_a_sibling_name_is_refused_never_followed(work, cache, suffix):
    out = built(work, cache, f"link{suffix}")
    victim = user_dir(out.parent / "victim")
    (victim / "file").write_bytes(b"precious\n")
    sib = out.with_name(out.name + suffix)
    if sib.exists():
        sib.unlink()  # ours, from the first build
    sib.symlink_to(victim / "file" if suffix != ".staging" else victim)
    before, out_before = snapshot(victim), snapshot(out)
    line = refused(recipe_for(out.parent, "out", extra=CHANGED), out.parent, cache)
    assert line == f"forgekit: {sib} is a symlink; forgekit never writes through one: remove it and run again"
    assert snapshot(victim) == before
    assert not out.is_symlink() and snapshot(out) == out_before


@pytest.mark.parametrize("suffix, content, message", [
    (".staging", None, "exists and is not a forgekit staging dir; remove it and run again"),
    (".build-lock", b"my shopping list\n", "is not a forgekit build lock (it holds something other than a pid); "
                                           "remove it and run again"),
    (".lock.json", b"{not json", "not a readable lock file"),
    (".lock.json", b'["a list"]\n', "not a forgekit lock file (version 1); remove it and build once without "
                                    "--locked"),
])
def test_a_foreign_file_at_a_sibling_name_is_refused_and_kept(work, cache, suffix, content, message):
    out = built(work, cache, f"foreign{suffix}-{abs(hash(content))}")
    sib = out.with_name(out.name + suffix)
    if sib.exists():
        sib.unlink()
    if content is None:
        user_dir(sib)
        before = snapshot(sib)
    else:
        sib.write_bytes(content)
        before = content
    line = refused(recipe_for(out.parent, "out", extra=CHANGED), out.parent, cache)
    assert line.startswith(f"forgekit: {sib}") and message in line
    assert (snapshot(sib) if content is None else sib.read_bytes()) == before


def test_the_swap_rechecks_ownership_and_spares_foreign_old_dirs(tmp_path):
    from forgekit.build.publish import swap as _swap

    out, staging = user_dir(tmp_path / "out"), tmp_path / "out.staging"
    (staging / ".forgekit").mkdir(parents=True)
    (staging / ".forgekit" / "manifest.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(OwnershipError, match="exists and is not a forgekit output"):
        _swap(staging, out)   # something foreign appeared at <out> after the load-time check
    assert snapshot(out) == before
    shutil.rmtree(out)
    (out / ".forgekit").mkdir(parents=True)
    (out / ".forgekit" / "manifest.json").write_text('{"build_key": "old"}')
    foreign_old = user_dir(tmp_path / "out.old-4194999")   # a dead pid's name, but not a forgekit tree
    kept = snapshot(foreign_old)
    _swap(staging, out)
    assert (out / ".forgekit" / "manifest.json").read_text() == "{}"
    assert snapshot(foreign_old) == kept


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_mid_build_is_one_line_and_leaves_the_artifact_intact(work, cache):
    out = built(work, cache, "sigint")
    before = snapshot(out)
    recipe = recipe_for(out.parent, "out", extra="quantization: {default: {bits: 8}}\n")  # new shards to compute
    env = {**os.environ, "FORGEKIT_CACHE": str(cache), "FORGEKIT_TEST_PIECE_DELAY": "0.05",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(out.parent), "build",
           f"recipe={recipe}"]
    proc = subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:   # wait until a shard is being computed
            if line.startswith(".  build:shard"):
                break
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)   # what a terminal's Ctrl-C does: the whole process group
        stdout, stderr = proc.communicate(timeout=REFUSE_WITHIN)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines() == ["forgekit: interrupted; the output dir is untouched (still the previous "
                                           "build, or already the complete new one); run again to resume"]
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr
    assert snapshot(out) == before
    rerun = doit(recipe, out.parent, cache)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert '"bits": 8' in (out / "config.json").read_text()


def test_forgekit_lock_never_overwrites_a_foreign_file_nor_follows_a_link(work, cache):
    case = work / "cli-lock"
    recipe = recipe_for(case, "out")
    sib = case / "out.lock.json"
    env = {**os.environ, "FORGEKIT_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "forgekit.cli", "lock", str(recipe)]
    sib.write_bytes(b"a user's file\n")
    proc = subprocess.run(cmd, cwd=case, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"forgekit: {sib}: not a readable lock file (Expecting value: line 1 column 1 (char 0)); remove it and "
        f"build once without --locked (or run `forgekit lock RECIPE`) to record the sources again"], proc.stderr
    assert sib.read_bytes() == b"a user's file\n"
    sib.unlink()
    (case / "victim").write_bytes(b"precious\n")
    sib.symlink_to(case / "victim")
    proc = subprocess.run(cmd, cwd=case, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"forgekit: {sib} is a symlink; forgekit never writes through one: remove it and run again"], proc.stderr
    assert (case / "victim").read_bytes() == b"precious\n" and sib.is_symlink()


# ---------------------------------------------------------------- fsync before publishing renames


def test_data_and_directories_are_fsynced_before_the_renames_that_publish_them(tmp_path, monkeypatch):
    """Which paths reach fsync, and in which order against the renames (real files, real syscalls;
    os.fsync and os.replace are only observed, then called)."""
    from forgekit.build import publish
    from forgekit.build.memo import hash_file
    from forgekit.build.store import ObjectStore

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b, **kw):
        events.append(("rename", str(b)))
        return real_replace(a, b, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = ObjectStore(tmp_path / "cache")
    tmp = store.temp_path("ab" * 16)
    tmp.write_bytes(b"shard bytes")
    obj = store.commit("ab" * 16, tmp, hash_file(tmp))
    assert events.index(("fsync", str(tmp))) < events.index(("rename", str(obj)))
    assert ("fsync", str(obj.parent)) in events[events.index(("rename", str(obj))):]

    events.clear()
    staging, out = tmp_path / "out.staging", tmp_path / "out"
    (staging / ".forgekit").mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"data")
    (staging / ".forgekit" / "manifest.json").write_text("{}")
    publish._make_durable(staging)
    synced = [p for kind, p in events if kind == "fsync"]
    assert {str(staging / "model.safetensors"), str(staging / ".forgekit" / "manifest.json"),
            str(staging / ".forgekit"), str(staging)} <= set(synced)


def test_an_output_below_a_regular_file_is_refused_and_the_file_kept(work, cache):
    case = work / "below-file"
    case.mkdir()
    (case / "plain").write_bytes(b"a user's file\n")
    line = refused(recipe_for(case, "plain/out"), case, cache)
    assert line.endswith(f"{case / 'plain' / 'out'} cannot be created: {case / 'plain'} is not a directory; "
                         f"choose another output.dir")
    assert (case / "plain").read_bytes() == b"a user's file\n"


@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_a_directory_or_fifo_at_the_build_lock_name_is_refused(work, cache, kind):
    case = work / f"lock-{kind}"
    case.mkdir()
    lock = case / "out.build-lock"
    if kind == "dir":
        user_dir(lock)
    else:
        os.mkfifo(lock)
    before = snapshot(case)
    line = refused(recipe_for(case, "out"), case, cache)
    assert line == f"forgekit: {lock} exists and is not a forgekit file; remove it and run again"
    assert snapshot(case) == before | {"recipe.yaml": (case / "recipe.yaml").read_bytes()}
    assert not (case / "out").exists()
