"""Hub downloads fetch only what the plan needs: the GGUF head by HTTP byte range (header +
head tensors, not the trunk), a full download only when the server refuses ranges, and no
vision-only shard, *.pth or *.gguf from a body repo. All against a fake hub on 127.0.0.1
(tests/fake_hub.py) that logs every request and the bytes it sent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import gguf
import mlx.core as mx
import numpy as np
import pytest
from fake_hub import FakeHub, serve

from conftest import BODY, HEAD_GGUF, ROOT, run_doit, write_recipe
from forgekit.recipe import load_recipe
from forgekit.plan.remap import Table
from forgekit.sources.remote_gguf import open_remote_gguf

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The head's GGUF names, stated independently of the recipe on purpose (the fake hub serves them).
HEAD_NAMES = ["nextn.eh_proj", "nextn.enorm", "nextn.hnorm", "nextn.shared_head_norm", "attn_norm",
              "post_attention_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
              "ffn_gate", "ffn_up", "ffn_down"]


def head_shapes(h: int, heads: int, kv: int, hd: int, inter: int) -> dict[str, tuple[int, ...]]:
    """numpy shapes ([out, in]) of the 15 head tensors of a qwen35 GGUF (docs/facts.md: the head keys and the GGUF layout)."""
    return {"nextn.eh_proj": (h, 2 * h), "nextn.enorm": (h,), "nextn.hnorm": (h,), "nextn.shared_head_norm": (h,),
            "attn_norm": (h,), "post_attention_norm": (h,), "attn_q": (2 * heads * hd, h), "attn_k": (kv * hd, h),
            "attn_v": (kv * hd, h), "attn_output": (h, heads * hd), "attn_q_norm": (hd,), "attn_k_norm": (hd,),
            "ffn_gate": (inter, h), "ffn_up": (inter, h), "ffn_down": (h, inter)}


def make_big_gguf(path, layers=4, trunk_bytes=24 * 2**20, tokens=20000, h=256, seed=0) -> dict[str, np.ndarray]:
    """A qwen35 GGUF shaped like a real release: tokenizer arrays in the header, a large trunk,
    the MTP block last (BF16 matrices, F32 norms) as a small fraction of the file."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen35")
    w.add_block_count(layers + 1)
    w.add_nextn_predict_layers(1)
    w.add_embedding_length(h)
    w.add_token_list([f"tok{i}" for i in range(tokens)])
    w.add_token_scores([0.0] * tokens)
    written = {}
    per = trunk_bytes // (2 * layers + 1)
    cols = 1024
    rows = per // (2 * cols)
    for name in ["token_embd.weight"] + [f"blk.{b}.{n}.weight" for b in range(layers) for n in ("ffn_up", "ffn_down")]:
        a = rng.integers(0, 2**16, size=(rows, cols), dtype=np.uint16)
        w.add_tensor(name, a, raw_dtype=gguf.GGMLQuantizationType.BF16)
        written[name] = a
    written["output_norm.weight"] = np.ones(h, np.float32) * 1.5
    w.add_tensor("output_norm.weight", written["output_norm.weight"])
    for n, shape in head_shapes(h, 2, 1, 64, 3 * h).items():
        name = f"blk.{layers}.{n}.weight"
        if len(shape) == 1:
            a = (1 + rng.random(shape)).astype(np.float32)
            w.add_tensor(name, a)
        else:
            a = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
            w.add_tensor(name, a, raw_dtype=gguf.GGMLQuantizationType.BF16)
        written[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def recipe_keep():
    """The plan's `keep(name, placeholders)` for the base recipe's GGUF head table."""
    rules = load_recipe("qwen3.5-dense-mtp").remap["mtp"]
    return lambda name, placeholders=None: Table(rules, placeholders).keeps(name)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub, with huggingface_hub (in this process) and the forgekit cache pointed at tmp."""
    from huggingface_hub import constants

    fake = FakeHub()
    with serve(fake) as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path / "forgekit-cache"))
        yield fake


def ranges_served(fake: FakeHub) -> list[tuple[int, int]]:
    out = []
    for r in fake.log:
        if r.method == "GET" and r.range and r.status == 206:
            lo, hi = r.range.removeprefix("bytes=").split("-")
            out.append((int(lo), int(hi) + 1))
    return out


def test_head_is_fetched_by_byte_range_within_budget(hub, tmp_path, monkeypatch):
    big = tmp_path / "big-MTP.gguf"
    written = make_big_gguf(big)
    commit = hub.add("org/big-GGUF", {"big-MTP.gguf": big})
    reader = gguf.GGUFReader(str(big))
    tensors = {t.name: t for t in reader.tensors}
    # The head, plus output_norm: the few KB the norms step needs to prove the GGUF's convention.
    head = {n: t for n, t in tensors.items() if n.startswith("blk.4.") or n == "output_norm.weight"}
    assert len(head) == 16
    data_start = min(int(t.data_offset) for t in reader.tensors)
    head_bytes = sum(int(t.n_bytes) for n, t in head.items() if n.startswith("blk.4."))  # the 15 head tensors
    size = big.stat().st_size
    assert head_bytes + data_start < 0.1 * size  # the head is a small fraction, as for a 9B release

    source, prov = open_remote_gguf("mtp", "org/big-GGUF", "big-MTP.gguf", "main", recipe_keep())

    served = hub.body_bytes("big-MTP.gguf")
    assert served <= 1.1 * (data_start + head_bytes), (served, data_start, head_bytes)
    assert all(r.status in (200, 206) for r in hub.log if r.method in ("GET", "HEAD") and "resolve" in r.path)
    assert not [r for r in hub.log if r.method == "GET" and "resolve" in r.path and r.status == 200]
    # No served range touches a trunk tensor's bytes.
    for lo, hi in ranges_served(hub):
        for name, t in tensors.items():
            if name not in head:
                a, b = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
                assert hi <= a or lo >= b or lo < data_start, f"range {lo}-{hi} fetched trunk tensor {name}"
    # The local GGUF holds exactly the head, byte for byte, and knows the rest by name.
    assert sorted(source.keys()) == sorted(head)
    for name in head:
        assert np.array_equal(np.asarray(source._tensors[name].data).view(np.uint8),
                              np.asarray(tensors[name].data).view(np.uint8)), name
        assert source.info(name).shape == written[name].shape
    assert sorted(source.unread) == sorted(n for n in tensors if n not in head)
    assert source.files[0].stat().st_size < data_start + head_bytes + 64 * 1024
    print(f"served {served} bytes for header {data_start} + head {head_bytes} of a {size}-byte file")
    assert source.metadata["qwen35.nextn_predict_layers"] == 1 and source.mtp_block() == 4
    # Every tensor of the remote file is accounted for by the recipe's table.
    rules = load_recipe("qwen3.5-dense-mtp").remap["mtp"]
    result = Table(rules, {"mtp_block": "4"}).apply(source.keys() + source.unread)
    assert not result.unmatched_keys and not result.unused_rules and len(result.mapped) == 15
    assert result.dropped["output_norm.weight"] == "gguf-trunk"
    assert prov == {"role": "mtp", "repo": "org/big-GGUF", "revision": "main", "file": "big-MTP.gguf",
                    "commit": commit, "fetch": "ranges",
                    "remote": {"size": size, "etag": prov["remote"]["etag"], "tensors": 16}}
    assert source.remote["bytes_downloaded"] == served

    # Second open: one HEAD to resolve the revision, no body bytes.
    hub.reset_log()
    again, prov2 = open_remote_gguf("mtp", "org/big-GGUF", "big-MTP.gguf", "main", recipe_keep())
    assert prov2 == prov and again.files == source.files
    assert [r.method for r in hub.log if "resolve" in r.path] == ["HEAD"] and hub.body_bytes() == 0

    # Offline: no request at all, same answer from the forgekit cache.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.reset_log()
    offline, prov3 = open_remote_gguf("mtp", "org/big-GGUF", "big-MTP.gguf", "main", recipe_keep())
    assert prov3 == prov and offline.files == source.files and hub.log == []


def test_refused_ranges_fall_back_to_a_full_download(hub, tmp_path):
    big = tmp_path / "big-MTP.gguf"
    make_big_gguf(big, trunk_bytes=4 * 2**20, tokens=1000)
    commit = hub.add("org/big-GGUF", {"big-MTP.gguf": big})
    hub.refuse_ranges = True
    source, prov = open_remote_gguf("mtp", "org/big-GGUF", "big-MTP.gguf", "main", recipe_keep())
    local = source.files[0]
    assert local.is_relative_to(tmp_path / "hf-cache") and local.read_bytes() == big.read_bytes()
    assert prov == {"role": "mtp", "repo": "org/big-GGUF", "revision": "main", "file": "big-MTP.gguf", "commit": commit}
    assert not getattr(source, "unread", [])
    assert len(source.keys()) == len(gguf.GGUFReader(str(big)).tensors)
    # Then the full copy in huggingface_hub's cache is used: no more body bytes.
    hub.reset_log()
    open_remote_gguf("mtp", "org/big-GGUF", "big-MTP.gguf", "main", recipe_keep())
    assert hub.body_bytes() == 0


def test_gguf_without_head_tensors_is_reported(hub, tmp_path):
    """A file that declares nextn_predict_layers but ships no blk.N tensors: the plan names it."""
    path = tmp_path / "nohead.gguf"
    w = gguf.GGUFWriter(str(path), "qwen35")
    w.add_block_count(3)
    w.add_nextn_predict_layers(1)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((512, 512), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hub.add("org/nohead-GGUF", {"nohead.gguf": path})
    source, _ = open_remote_gguf("mtp", "org/nohead-GGUF", "nohead.gguf", None, recipe_keep())
    assert source.keys() == [] and source.unread == ["blk.0.ffn_up.weight"]
    assert hub.body_bytes() < path.stat().st_size  # the trunk tensor was not downloaded
    rules = load_recipe("qwen3.5-dense-mtp").remap["mtp"]
    result = Table(rules, {"mtp_block": str(source.mtp_block())}).apply(source.keys() + source.unread)
    assert result.unused_rules[0].name == "mtp-fc"


def _env(tmp_path, url) -> dict:
    return {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_doit_build_with_remote_head_matches_local_gguf_build(tmp_path, built_demo):
    """The tiny head served by byte range builds the same mtp.safetensors as the local GGUF."""
    fake = FakeHub()
    commit = fake.add("org/tiny-GGUF", {"tiny-MTP-BF16.gguf": HEAD_GGUF})
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'tiny-demo.yaml'}\nname: tiny-remote-head\n"
                                    f"sources:\n  mtp: {{repo: org/tiny-GGUF, file: tiny-MTP-BF16.gguf, fetch: ranges}}\n"
                                    f"output: {{dir: {out}}}\n")
    with serve(fake) as url:
        proc = run_doit(recipe, tmp_path, env=_env(tmp_path, url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resolve_gets = [r for r in fake.log if r.method == "GET" and "resolve" in r.path]
    assert resolve_gets and all(r.status == 206 for r in resolve_gets)
    assert fake.body_bytes() < HEAD_GGUF.stat().st_size
    ours, ref = mx.load(str(out / "mtp.safetensors")), mx.load(str(built_demo / "mtp.safetensors"))
    assert sorted(ours) == sorted(ref) and len(ours) == 15
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and mx.array_equal(ours[k], ref[k]).item(), k
    runtime = json.loads((out / "mtplx_runtime.json").read_text())
    mtp = {s["role"]: s for s in runtime["provenance"]["sources"]}["mtp"]
    assert mtp["repo"] == "org/tiny-GGUF" and mtp["commit"] == commit and mtp["fetch"] == "ranges"
    lock = json.loads((tmp_path / "out.lock.json").read_text())
    assert lock["sources"]["mtp"]["commit"] == commit and lock["sources"]["mtp"]["fetch"] == "ranges"


def split_body(dst, decoys: bool = True) -> dict:
    """The fixture body re-sharded like a release whose vision tower lives in its own shard,
    plus decoys a body repo may carry (original *.pth weights, a GGUF)."""
    dst.mkdir()
    tensors = {}
    for f in sorted(BODY.glob("*.safetensors")):
        tensors.update(mx.load(str(f)))
    text = {k: v for k, v in tensors.items() if not k.startswith("model.visual.")}
    vision = {k: v for k, v in tensors.items() if k.startswith("model.visual.")}
    assert vision and text
    mx.save_safetensors(str(dst / "model-00001-of-00002.safetensors"), text, {"format": "pt"})
    mx.save_safetensors(str(dst / "model-00002-of-00002.safetensors"), vision, {"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in text},
                  **{k: "model-00002-of-00002.safetensors" for k in vision}}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in BODY.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copyfile(f, dst / f.name)
    if decoys:
        (dst / "consolidated.pth").write_bytes(b"\0" * 300_000)
        shutil.copyfile(HEAD_GGUF, dst / "body-Q8_0.gguf")
    return {p.name: p for p in dst.iterdir()}


def test_body_download_fetches_only_what_the_plan_needs(tmp_path):
    files = split_body(tmp_path / "release")
    fake = FakeHub()
    fake.add("org/finetune", files)
    recipe = write_recipe(tmp_path, f"extends: qwen3.5-dense-mtp\nname: finetune\nsources:\n"
                                    f"  body: {{repo: org/finetune, revision: main}}\n  mtp: {{path: {HEAD_GGUF}}}\n"
                                    f"output: {{dir: {tmp_path / 'out'}}}\n")
    env = {**__import__("os").environ, **_env(tmp_path, "")}
    with serve(fake) as url:
        env["HF_ENDPOINT"] = url
        env["FORGEKIT_CACHE"] = str(tmp_path / "cache")
        proc = subprocess.run([sys.executable, "-m", "forgekit.cli", "plan", str(recipe), "--json"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    downloaded = fake.downloaded()
    assert "model-00001-of-00002.safetensors" in downloaded and "config.json" in downloaded
    assert "model-00002-of-00002.safetensors" not in downloaded   # vision tower only: dropped by the recipe
    assert not [f for f in downloaded if f.endswith((".pth", ".gguf"))], downloaded
    report = json.loads(proc.stdout)
    body = {s["role"]: s for s in report["sources"]}["body"]
    assert body["repo"] == "org/finetune" and body["dropped"] == report["dropped"]["body"]["vision-tower"] == 2
    assert not any(r["source"].startswith("body:model.visual") for r in report["tensors"])
