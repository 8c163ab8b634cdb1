"""The content-addressed cache: stat memo, raw source reads, parallel row-chunked shard
writes, stable shard layout, temp-file hygiene, and `cache ls` / `cache gc` / `cache verify`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import BODY, BODY_WITH_MTP, DEMO_RECIPE, HEAD_GGUF, ran_tasks, run_doit, write_recipe
from forgekit.build import memo as cache_mod
from forgekit.build.gc import cache_gc, cache_ls, cache_verify
from forgekit.build.memo import StatMemo
from forgekit.build.store import ObjectStore
from forgekit.fileio import make_temp, stale_temp

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rewrite_same_size(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_stat_memo_hashes_once_and_catches_edits_that_restore_mtime(tmp_path, monkeypatch):
    f = tmp_path / "blob"
    f.write_bytes(b"a" * 1000)
    memo = StatMemo(tmp_path / "cache")
    calls = []
    real = cache_mod.hash_file
    monkeypatch.setattr(cache_mod, "hash_file", lambda p: calls.append(p) or real(p))
    first = memo.digest(f)
    assert memo.digest(f) == first and len(calls) == 1  # memoised: no second read
    _rewrite_same_size(f, b"b" * 1000)
    assert memo.digest(f) != first and len(calls) == 2  # same size and mtime, new ctime: re-hashed


def test_preserving_keeps_only_entries_that_were_valid(tmp_path):
    memo = StatMemo(tmp_path / "cache")
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 10)
    da = memo.digest(a)
    memo.remember(b, "not-the-digest-of-b")
    _rewrite_same_size(b, b"z" * 10)  # b changed after it was recorded: its entry is stale
    with memo.preserving([a, b]):
        os.link(a, tmp_path / "a2")  # changes a's ctime, not its bytes
        os.link(b, tmp_path / "b2")
    assert memo.lookup(a) == da
    assert memo.lookup(b) is None  # a stale entry is never laundered


# ---------------------------------------------------------------- raw reads and parallel writes


def _sources():
    from forgekit.sources.gguf_file import GGUFSource
    from forgekit.sources.safetensors_dir import SafetensorsSource

    return [SafetensorsSource("body", BODY), SafetensorsSource("mtp", BODY_WITH_MTP), GGUFSource("mtp", HEAD_GGUF)]


def _same(a: mx.array, b: mx.array) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == mx.bfloat16:
        a, b = a.view(mx.uint16), b.view(mx.uint16)
    return bytes(memoryview(a)) == bytes(memoryview(b))


def test_raw_reads_equal_the_sources_own_reads():
    from forgekit.build.compute import Workspace
    from forgekit.build.shard import raw_ref

    read_rows = Workspace().read_rows
    checked = 0
    for source in _sources():
        for key in source.keys():
            ref = raw_ref(source, key)
            assert ref is not None, key
            assert _same(read_rows(ref, None), source.read(key)), key
            shape = source.info(key).shape
            if len(shape) > 1 and shape[0] > 3:
                assert _same(read_rows(ref, (1, 3)), source.read(key, slice(1, 3))), key
            checked += 1
    assert checked > 50


def test_ggml_quantized_gguf_rows_dequantize_like_the_source(tmp_path):
    import gguf

    from forgekit.build.compute import Workspace
    from forgekit.build.shard import raw_ref
    from forgekit.sources.gguf_file import GGUFSource

    read_rows = Workspace().read_rows
    rng = np.random.default_rng(0)
    data = rng.standard_normal((16, 64)).astype(np.float32)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "qwen35")
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(f"t.{qtype.name}", q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = GGUFSource("mtp", path)
    for key in source.keys():
        ref = raw_ref(source, key)
        assert ref.storage.startswith("GGML:"), ref
        assert _same(read_rows(ref, None), source.read(key)), key
        assert _same(read_rows(ref, (3, 9)), source.read(key, slice(3, 9))), key


def _plan(tmp_path: Path, extra: str = "", max_shard: int = 100_000):
    from forgekit.plan import make_plan
    from forgekit.recipe import load_recipe

    recipe = write_recipe(tmp_path, f"extends: {DEMO_RECIPE}\nname: t\noutput: {{dir: {tmp_path / 'out'}, "
                                    f"max_shard_bytes: {max_shard}}}\n{extra}", f"r{abs(hash(extra))}.yaml")
    return make_plan(load_recipe(recipe))


def _whole_tensor_reference(t, source) -> list[bytes]:
    """One entry's output parts computed whole, from public pieces only: the source's own
    reader, the transform registry, and mlx's cast and quantize (not forgekit's compute path)."""
    from forgekit.plan.transforms import TRANSFORMS

    a = source.read(t.source_key)
    for name in t.transforms:
        a = TRANSFORMS[name].apply(a)
    a = a.astype(getattr(mx, t.dtype))
    parts = [a] if t.quant is None else list(mx.quantize(a, group_size=t.quant.group_size, bits=t.quant.bits,
                                                             mode=t.quant.mode))
    out = []
    for x in parts:
        x = x.view(mx.uint16) if x.dtype == mx.bfloat16 else x
        out.append(bytes(memoryview(np.asarray(x)).cast("B")))
    return out


def test_row_chunked_pieces_write_the_whole_tensor_bytes(tmp_path, monkeypatch):
    """Tiny row chunks (many pieces per tensor, written out of order) == whole-tensor reference."""
    from forgekit.build.shard import layout, write_shard
    from forgekit.plan.quant import ROW_CHUNK_BYTES

    plan = _plan(tmp_path)
    monkeypatch.setenv("FORGEKIT_JOBS", "1")
    digests = {}
    for chunk in (ROW_CHUNK_BYTES, 512):
        for name, entries in plan.files.items():
            path = tmp_path / f"{chunk}-{name}"
            digests.setdefault(name, set()).add(write_shard(path, entries, plan.sources, chunk_bytes=chunk).digest)
            if chunk != 512:
                continue
            head, offsets = layout(entries, {"format": "mlx"})
            raw = path.read_bytes()
            for t, parts in zip(entries, offsets):
                want = _whole_tensor_reference(t, plan.sources[t.role])
                got = [raw[len(head) + o: len(head) + o + n] for o, n in parts]
                assert got == want, t.key
    assert all(len(d) == 1 for d in digests.values()), digests


def test_shard_layout_is_stable_under_quantization_changes(tmp_path):
    from forgekit.plan import bound_bytes, layout_group

    base = _plan(tmp_path)
    changed = _plan(tmp_path, "quantization:\n  default: {bits: 2, group_size: 32}\n  rules:\n"
                              r"    - {name: mtp-head-bf16, match: 'mtp\..*', quantize: false}" "\n"
                              r"    - {name: l1, match: 'language_model\.model\.layers\.1\..*', bits: 8}" "\n"
                              r"    - {name: head, match: 'language_model\.lm_head', quantize: false}" "\n")
    layout_of = lambda plan: {f: [t.key for t in es] for f, es in plan.files.items()}  # noqa: E731
    assert layout_of(base) == layout_of(changed)
    assert len(base.indexed_files) >= 4
    seen = {}
    for f in base.indexed_files:
        assert sum(bound_bytes(t) for t in base.files[f]) <= 100_000
        assert sum(t.nbytes() for t in base.files[f]) <= 100_000
        for t in base.files[f]:
            assert seen.setdefault(layout_group(t.key), f) == f, f"{t.key} split from its layer"


# ---------------------------------------------------------------- temp files


def test_stale_temp_files_are_recognised(tmp_path):
    mine = make_temp(tmp_path, "abc")
    assert not stale_temp(mine)
    dead = tmp_path / ".abc.999999.xyz.tmp"
    dead.write_bytes(b"partial")
    assert stale_temp(dead)
    store = ObjectStore(tmp_path / "cache")
    left = store.root / "ab" / ".abcdef.999999.q1w2e3.tmp"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"x" * 100)
    tmp = store.temp_path("abcdef")  # building that key removes what a killed build left
    assert not left.exists() and tmp.exists()


# ---------------------------------------------------------------- ls / gc / verify with real builds


def _recipe(work: Path, name: str = "gc", extra: str = "", file: str = "recipe.yaml") -> Path:
    return write_recipe(work, f"extends: {DEMO_RECIPE}\nname: {name}\noutput: {{dir: {work / 'out'}, "
                              f"max_shard_bytes: 100000}}\nverify: []\n{extra}", file)


def test_cache_ls_gc_and_restore(tmp_path):
    recipe = _recipe(tmp_path)
    assert run_doit(recipe, tmp_path).returncode == 0
    root = tmp_path / "cache"
    out = tmp_path / "out"
    rows = cache_ls(root)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(r["file"] for r in rows) == files
    for r in rows:
        assert r["referenced"] and r["recipe"] == "gc" and r["used_by"] == ["gc"] and r["size"] > 0
        assert r["age_days"] >= 0 and Path(r["path"]).is_file()
    # A changed quant rule makes one shard object unreferenced.
    child = write_recipe(tmp_path, f"extends: {recipe}\nname: gc\nquantization:\n  rules:\n"
                                   r"    - {name: mtp-head-bf16, match: 'mtp\..*', quantize: false}" "\n"
                                   r"    - {name: l1, match: 'language_model\.model\.layers\.1\..*', bits: 8}" "\n",
                         "child.yaml")
    assert run_doit(child, tmp_path).returncode == 0
    stale = [r for r in cache_ls(root) if not r["referenced"]]
    assert len(stale) == 1
    report = cache_gc(root, dry_run=True)
    assert [r["key"] for r in report["removed"]] == [stale[0]["key"]] and Path(stale[0]["path"]).exists()
    report = cache_gc(root)
    assert [r["key"] for r in report["removed"]] == [stale[0]["key"]] and report["freed_bytes"] > 0
    assert not Path(stale[0]["path"]).exists() and len(cache_ls(root)) == len(files)
    # older_than_days=0 removes referenced objects too; the next build restores them from the output.
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    report = cache_gc(root, older_than_days=0)
    assert len(report["removed"]) == len(files) and cache_ls(root) == []
    proc = run_doit(child, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("restored ") == len(files), proc.stdout
    assert "built model" not in proc.stdout and "built mtp" not in proc.stdout
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == before
    assert ran_tasks(run_doit(child, tmp_path)) == []
    # Once the output is gone, nothing references the objects any more.
    import shutil

    shutil.rmtree(out)
    report = cache_gc(root)
    assert len(report["removed"]) == len(files) and cache_ls(root) == []


def test_cache_verify_finds_a_corrupt_object(tmp_path):
    recipe = _recipe(tmp_path)
    assert run_doit(recipe, tmp_path).returncode == 0
    root = tmp_path / "cache"
    assert cache_verify(root) == []
    victim = cache_ls(root)[0]
    path = Path(victim["path"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    _rewrite_same_size(path, bytes(data))
    assert cache_verify(root) == [victim["key"]]
    assert not path.exists()
    assert json.loads(json.dumps(cache_ls(root)))  # rows are plain JSON


@pytest.mark.parametrize("tensor,value", [("ffn_up", np.array([0x7FC0], np.uint16)),          # bf16 NaN, copied as is
                                          ("attn_q_norm", np.array([np.inf], np.float32))])   # f32 inf, cast to bf16
def test_non_finite_head_values_fail_the_build_naming_the_tensor(tmp_path, tensor, value):
    import gguf
    import shutil

    head = tmp_path / "head.gguf"
    shutil.copyfile(HEAD_GGUF, head)
    reader = gguf.GGUFReader(head)
    mtp_block = max(int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk."))
    t = next(t for t in reader.tensors if t.name == f"blk.{mtp_block}.{tensor}.weight")
    offset = int(t.data_offset) + 8
    del reader
    with open(head, "r+b") as f:
        f.seek(offset)
        f.write(value.tobytes())
    recipe = _recipe(tmp_path, extra=f"sources:\n  mtp: {{path: {head}}}\n")
    proc = run_doit(recipe, tmp_path)
    assert proc.returncode != 0
    assert f"tensor '{t.name}' holds NaN or infinite" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / ".forgekit" / "manifest.json").exists()


def test_descriptor_cache_never_closes_an_output_being_written(tmp_path):
    """Reading many source files (cache eviction) must not close a job's open output descriptor."""
    from forgekit.build.compute import Workspace

    out = tmp_path / "out.bin"
    out.write_bytes(b"\0" * 8)
    ws = Workspace()
    try:
        wfd = ws.fd(str(out), os.O_WRONLY)
        for i in range(40):
            src = tmp_path / f"src{i}"
            src.write_bytes(bytes([i]))
            assert os.pread(ws.fd(str(src), os.O_RDONLY), 1, 0) == bytes([i])
        os.pwrite(wfd, b"written!", 0)
    finally:
        ws.close()
    assert out.read_bytes() == b"written!"
