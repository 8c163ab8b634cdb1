"""The cache and its state files under hostile or damaged conditions (issue 9, part B).

gc and verify remove only regular files forgekit named, never through a symlink, never a
referenced or leased object, and still remove what they should; a corrupt state file ends in
one line. Real doit builds of the tiny fixture, the real CLI in a subprocess, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_RECIPE, ran_tasks, run_doit, write_recipe
from forgekit.build.gc import cache_gc, cache_ls, cache_verify
from forgekit.build.leases import lease_dir
from forgekit.build.memo import hash_file, key_of
from forgekit.build.store import ObjectStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `forgekit` command line in a subprocess (exit code and stderr as a user sees them)."""
    code = "import sys; from forgekit.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def tree(directory: Path) -> dict[str, object]:
    """Every entry under `directory` (not following symlinks): file bytes, or the link target."""
    out: dict[str, object] = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build (several shard objects, all referenced by the published output)."""
    work = tmp_path_factory.mktemp("safety-cache")
    recipe = write_recipe(work, f"extends: {DEMO_RECIPE}\nname: safety\noutput: {{dir: {work / 'out'}, "
                                f"max_shard_bytes: 100000}}\nverify: []\n")
    proc = run_doit(recipe, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work, recipe


@pytest.fixture
def cache(built, tmp_path) -> Path:
    """A private copy of the built cache (its registry still names the built output)."""
    work, _ = built
    root = tmp_path / "cache"
    shutil.copytree(work / "cache", root, symlinks=True)
    return root


def referenced_files(root: Path) -> dict[str, bytes]:
    """The bytes of every referenced object and its record."""
    store = ObjectStore(root)
    rows = [r for r in cache_ls(root) if r["referenced"]]
    assert rows
    return {**{r["path"]: Path(r["path"]).read_bytes() for r in rows},
            **{str(store.record_path(r["key"])): store.record_path(r["key"]).read_bytes() for r in rows}}


def add_object(root: Path, seed: str) -> str:
    """A real unreferenced object, committed the way a build commits one."""
    store = ObjectStore(root)
    key = key_of({"seed": seed})
    tmp = store.temp_path(key)
    tmp.write_bytes(seed.encode() * 100)
    store.commit(key, tmp, hash_file(tmp), file="old.safetensors", recipe="old")
    return key


# ---------------------------------------------------------------- gc still does its job


def test_a_finished_build_leaves_no_lease(built):
    work, _ = built
    leases = lease_dir(work / "cache")
    assert leases.is_dir() and list(leases.iterdir()) == []   # written while it ran, removed at exit


def test_gc_removes_unreferenced_objects_and_dead_temps_but_keeps_referenced_ones(cache):
    keep = referenced_files(cache)
    old = add_object(cache, "unreferenced")
    store = ObjectStore(cache)
    dead_temp = store.root / old[:2] / f".{old}.999999.abc123.tmp"
    dead_temp.write_bytes(b"partial")
    proc = run_cli("cache", "gc", "--root", cache, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["key"] for r in report["removed"]] == [old] and report["temps_removed"] == 1
    assert not store.path(old).exists() and not store.record_path(old).exists() and not dead_temp.exists()
    assert {p: Path(p).read_bytes() for p in keep} == keep
    # --older-than 0 removes referenced objects too: the check is not so strict that it never deletes.
    report = cache_gc(cache, older_than_days=0)
    assert len(report["removed"]) == len(keep) // 2 and cache_ls(cache) == []
    assert not any(Path(p).exists() for p in keep)


# ---------------------------------------------------------------- names read from disk are never patterns


GLOB_JUNK = ["*.json", "*.safetensors", "[0-9a-f]*.json", "?*.json", ".*.tmp", ".*.*.*.tmp", "**.json"]


def test_junk_names_with_glob_characters_remove_nothing_referenced(cache):
    keep = referenced_files(cache)
    shard = Path(next(iter(keep))).parent
    junk = {}
    for name in GLOB_JUNK:
        for where in (shard, cache / "objects"):
            (where / name).write_bytes(b"not forgekit's: " + name.encode())
            junk[where / name] = (where / name).read_bytes()
    star_dir = cache / "objects" / "*"
    star_dir.mkdir()
    (star_dir / "*.json").write_text("{}")
    for argv in (("gc",), ("gc", "--older-than", "100000"), ("verify",)):
        proc = run_cli("cache", *argv, "--root", cache)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        assert {p: Path(p).read_bytes() for p in keep} == keep, argv
    assert {p: p.read_bytes() for p in junk} == junk          # not forgekit's names: left alone
    assert (star_dir / "*.json").read_text() == "{}"
    assert all(r["referenced"] and not r["missing"] for r in cache_ls(cache))


# ---------------------------------------------------------------- symlinks are never followed


def victim_keys(objects: Path, n: int) -> list[str]:
    """Keys whose shard dirs do not exist yet and differ from each other."""
    taken, keys = {p.name for p in objects.iterdir()}, []
    seed = 0
    while len(keys) < n:
        key = key_of({"victim": seed})
        seed += 1
        if key[:2] not in taken:
            taken.add(key[:2])
            keys.append(key)
    return keys


def forgekit_like_files(directory: Path, keys: list[str]) -> None:
    """Files outside the cache named exactly like store files, all removable if followed:
    an old unreferenced object with its record, a dead build's temp file, a record without
    an object, an object without a record."""
    directory.mkdir()
    a, b, c = keys
    (directory / f"{a}.safetensors").write_bytes(b"user data A")
    (directory / f"{a}.json").write_text(json.dumps({"digest": "0" * 32, "size": 11, "created": 0, "last_used": 0}))
    (directory / f".{a}.999999.abc123.tmp").write_bytes(b"user data T")
    (directory / f"{b}.json").write_text(json.dumps({"digest": "0" * 32, "size": 1, "created": 0, "last_used": 0}))
    (directory / f"{c}.safetensors").write_bytes(b"user data C")
    os.utime(directory / f"{c}.safetensors", (0, 0))
    (directory / "notes.txt").write_text("the user's own file")


def test_gc_and_verify_never_follow_a_symlinked_directory_or_file(cache, tmp_path):
    outside = tmp_path / "outside"
    objects = cache / "objects"
    keys = victim_keys(objects, 3)
    forgekit_like_files(outside, keys)
    # A symlinked shard dir named like a real one (the first two hex digits of the files in it) ...
    (objects / keys[0][:2]).symlink_to(outside, target_is_directory=True)
    for name in sorted(p.name for p in outside.iterdir()):  # ... and symlinked store files in real shard dirs
        if name.lstrip(".")[:2] in (keys[1][:2], keys[2][:2]):
            (objects / name.lstrip(".")[:2]).mkdir(exist_ok=True)
            (objects / name.lstrip(".")[:2] / name).symlink_to(outside / name)
    keep = referenced_files(cache)
    before_outside, before_cache = tree(outside), tree(objects)
    for argv in (("gc",), ("gc", "--older-than", "0"), ("verify",)):
        proc = run_cli("cache", *argv, "--root", cache)
        assert proc.returncode in (0, 1), (argv, proc.stdout, proc.stderr)
        assert tree(outside) == before_outside, argv   # byte for byte, nothing removed or rewritten
    after = tree(objects)
    assert {k: v for k, v in after.items() if isinstance(v, tuple)} == \
           {k: v for k, v in before_cache.items() if isinstance(v, tuple)}   # the symlinks themselves stay too
    assert not any(Path(p).exists() for p in keep)   # --older-than 0 did remove the real objects
    assert cache_verify(cache) == []


# ---------------------------------------------------------------- builds in progress


def unreference(root: Path) -> list[str]:
    """Make every object in the cache unreferenced (as if its output had not been published yet)."""
    (root / "outputs.sqlite3").unlink()
    keys = [r["key"] for r in cache_ls(root)]
    assert keys and not any(r["referenced"] for r in cache_ls(root))
    return keys


LEASE_HOLDER = """
import sys
from pathlib import Path
from forgekit.build.leases import lease_objects
lease_objects(sys.argv[2:], Path(sys.argv[1]))
print("leased", flush=True)
sys.stdin.read()
"""


def test_gc_keeps_objects_leased_by_a_live_process_and_ignores_a_dead_ones_lease(cache):
    keys = unreference(cache)
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(cache), *keys], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "leased"
        lease = lease_dir(cache) / f"{holder.pid}.json"
        assert sorted(json.loads(lease.read_text())["keys"]) == sorted(keys)
        report = cache_gc(cache)
        assert report["removed"] == [] and report["leased"] == len(keys)
        assert all(ObjectStore(cache).valid(k) for k in keys)
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed build: its lease stays, naming a dead pid
        holder.wait(timeout=10)
    assert lease.exists()
    report = cache_gc(cache)
    assert sorted(r["key"] for r in report["removed"]) == sorted(keys) and report["leased"] == 0
    assert not lease.exists() and cache_ls(cache) == []


def test_a_process_that_exits_normally_removes_its_lease(cache):
    keys = unreference(cache)
    proc = subprocess.run([sys.executable, "-c", LEASE_HOLDER, str(cache), *keys], input="", text=True,
                          capture_output=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "leased", proc.stderr
    assert list(lease_dir(cache).iterdir()) == []


def test_gc_during_a_real_build_keeps_its_unpublished_objects(tmp_path):
    """A build slowed down between pieces; gc runs once its first objects are in the store."""
    recipe = write_recipe(tmp_path, f"extends: {DEMO_RECIPE}\nname: slow\noutput: {{dir: {tmp_path / 'out'}, "
                                    f"max_shard_bytes: 100000}}\nverify: []\n")
    env = {**os.environ, "FORGEKIT_CACHE": str(tmp_path / "cache"), "FORGEKIT_TEST_PIECE_DELAY": "0.04"}
    cmd = [sys.executable, "-m", "doit", "-f", str(Path(__file__).parent.parent / "dodo.py"), "-d", str(tmp_path),
           "build", f"recipe={recipe}"]
    build = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "cache"
    try:
        deadline = time.monotonic() + 60
        while not cache_ls(root) and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert build.poll() is None, "the build finished before any gc could run: slow it down more"
        made = [r["key"] for r in cache_ls(root)]
        assert made and not any(r["referenced"] for r in cache_ls(root))  # built, not published yet
        report = cache_gc(root)
        assert report["removed"] == [] and report["leased"] == len(made)
    finally:
        out, err = build.communicate(timeout=120)
    assert build.returncode == 0, out + err
    assert "missing or corrupt" not in out                       # stage found every object it had built
    assert all(r["referenced"] for r in cache_ls(root)) and set(made) <= {r["key"] for r in cache_ls(root)}


# ---------------------------------------------------------------- corrupt state files


GARBAGE = b"this is not a sqlite database, it is damaged\n" * 40


def corrupt_pages(path: Path) -> None:
    """A real sqlite file with its pages overwritten (the header survives)."""
    data = bytearray(path.read_bytes())
    assert len(data) > 4096
    data[1024:] = b"\xa5" * (len(data) - 1024)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbage", "pages"])
def test_a_corrupt_outputs_registry_is_one_line_and_exit_2(built, cache, damage):
    work, recipe = built
    registry = cache / "outputs.sqlite3"
    if damage == "garbage":
        registry.write_bytes(GARBAGE)
    else:
        with sqlite3.connect(registry) as db:  # enough rows for a second page, then damage it
            db.executemany("INSERT INTO outputs VALUES (?,?,?,?)", [(f"/x/{i}", "r", "k" * 32, 0.0) for i in range(200)])
        db.close()
        corrupt_pages(registry)
    for action in ("ls", "gc"):   # (verify reads no registry)
        proc = run_cli("cache", action, "--root", cache)
        assert proc.returncode == 2, (action, proc.stdout, proc.stderr)
        line = one_line(proc.stderr)
        assert line.startswith(f"forgekit: {registry} is corrupt") and "remove it" in line, line
    proc = run_doit(recipe, work, cache=cache)
    assert proc.returncode == 2 and ran_tasks(proc) == [], proc.stdout + proc.stderr
    assert one_line(proc.stderr).startswith(f"forgekit: {registry} is corrupt")
    registry.unlink()                           # the recovery the line names works
    assert run_cli("cache", "ls", "--root", cache).returncode == 0


def doit_state(cache: Path) -> Path:
    [state] = (cache / "state").glob("*.sqlite3")
    return state


@pytest.mark.parametrize("damage", ["garbage", "row"])
def test_a_corrupt_doit_state_is_one_line_and_exit_2(built, cache, damage):
    work, recipe = built
    state = doit_state(cache)
    if damage == "garbage":
        state.write_bytes(GARBAGE)
    else:
        with sqlite3.connect(state) as db:
            assert db.execute("UPDATE doit SET task_data = ? WHERE task_id = 'build:stage'", ("{not json",)).rowcount
        db.close()
    proc = run_doit(recipe, work, cache=cache)
    assert proc.returncode == 2 and ran_tasks(proc) == [], proc.stdout + proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"forgekit: {state} is corrupt") and "remove it" in line, line
    state.unlink()                              # the recovery the line names works
    proc = run_doit(recipe, work, cache=cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "built model" not in proc.stdout and "built mtp" not in proc.stdout and "cached " in proc.stdout


def test_a_corrupt_stat_memo_is_replaced_with_one_warning(built, cache):
    """The memo only saves re-hashing, so it is rebuilt rather than refused (see StatMemo)."""
    work, recipe = built
    memo = cache / "stat-memo.sqlite3"
    memo.write_bytes(GARBAGE)
    proc = run_doit(recipe, work, cache=cache)
    assert proc.returncode == 0 and ran_tasks(proc) == [], proc.stdout + proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"forgekit: warning: {memo} is corrupt") and "replaced it" in line, line
    assert sqlite3.connect(memo).execute("SELECT count(*) FROM memo2").fetchone()[0] > 0   # in use again
    corrupt_pages(memo)                         # damage deeper than the header: the CLI copes too
    proc = run_cli("cache", "verify", "--root", cache)
    assert proc.returncode == 0 and one_line(proc.stderr).startswith(f"forgekit: warning: {memo} is corrupt")


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "{\"digest\": 5, \"size\": \"big\"}", "{broken"])
def test_a_cache_record_that_is_not_a_record_is_never_a_traceback(built, cache, content):
    """Such an object is never served: verify removes it; a build rebuilds it with one warning."""
    work, recipe = built
    store = ObjectStore(cache)
    victim = cache_ls(cache)[0]
    record = store.record_path(victim["key"])
    record.write_text(content)
    proc = run_cli("cache", "ls", "--root", cache)
    assert proc.returncode == 0 and proc.stderr == "" and victim["key"] in proc.stdout, proc.stderr
    proc = run_doit(recipe, work, cache=cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = one_line(proc.stderr)
    assert line == f"forgekit: warning: {record} is not a valid cache record; its object is rebuilt", line
    assert ran_tasks(proc) == [f"build:shard:{victim['file']}"]
    assert store.valid(victim["key"]) and cache_verify(cache) == []
    record.write_text(content)
    proc = run_cli("cache", "verify", "--root", cache)
    assert proc.returncode == 1 and victim["key"] in proc.stdout and "Traceback" not in proc.stderr
    assert not record.exists() and not Path(victim["path"]).exists()


def test_an_unreadable_lease_of_a_live_process_stops_gc_with_one_line(cache):
    unreference(cache)
    lease = lease_dir(cache) / f"{os.getpid()}.json"   # this test process: alive
    lease.parent.mkdir(exist_ok=True)
    lease.write_text("[]")
    proc = run_cli("cache", "gc", "--root", cache)
    assert proc.returncode == 2 and cache_ls(cache) != []
    line = one_line(proc.stderr)
    assert line.startswith(f"forgekit: {lease} is corrupt") and "remove it" in line, line
    lease.unlink()
