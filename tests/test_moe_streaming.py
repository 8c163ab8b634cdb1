"""Split and stacked outputs are computed piece by piece through the one compute path (never a
whole [E, ...] tensor), give the same bytes at any chunk size, and their action keys cover every
contributing source: changing one numbered expert rebuilds only the shard holding its output."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from forgekit.build.keys import build_keys
from forgekit.build.shard import layout, pieces_of, raw_ref, write_shard
from forgekit.plan import make_plan
from forgekit.recipe import load_recipe
from test_moe import HEADS, MOE, moe_recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

E, I, H = 8, 64, 64
EXPERT_BF16 = I * H * 2          # bytes of one expert's gate (or up) matrix in bf16


def _plan(tmp: Path, head: str, name: str = "s"):
    return make_plan(load_recipe(moe_recipe(tmp, name, head)))


def _pieces(plan, file: str, chunk_bytes: int):
    head, offsets = layout(plan.files[file], {"format": "mlx"})
    out = {}
    for t, parts in zip(plan.files[file], offsets):
        source = plan.sources[t.role]
        out[t.key] = (t, pieces_of(t, source, raw_ref(source, t.source_key), len(head), parts, chunk_bytes))
    return out


@pytest.mark.parametrize("head", ["fused", "numbered"])
def test_head_experts_are_written_one_expert_at_a_time(tmp_path, head):
    plan = _plan(tmp_path, HEADS[head])
    pieces = _pieces(plan, "mtp.safetensors", chunk_bytes=EXPERT_BF16)
    for proj in ("gate", "up"):
        t, ps = pieces[f"mtp.layers.0.mlp.switch_mlp.{proj}_proj.weight"]
        assert len(t.segments) == E and len(ps) == E
        assert all(p.source_bytes <= EXPERT_BF16 for p in ps)
        if head == "fused":      # expert e's gate rows are rows e*2I .. e*2I+I of the fused [E*2I, H] view
            first = 0 if proj == "gate" else I
            assert [p.rows for p in ps] == [(e * 2 * I + first, e * 2 * I + first + I) for e in range(E)]
        else:                    # expert e's piece reads the numbered tensor e, all of it
            assert [p.name for p in ps] == [f"mtp.layers.0.mlp.experts.{e}.{proj}_proj.weight" for e in range(E)]
        # pieces write disjoint, consecutive ranges covering the output
        dest = sorted(d for p in ps for d in p.dest)
        assert all(a[0] + a[1] == b[0] for a, b in zip(dest, dest[1:]))


def test_trunk_split_pieces_hold_at_most_one_chunk_and_bytes_do_not_depend_on_chunking(tmp_path):
    plan = _plan(tmp_path, HEADS["gguf"])
    small = 16 * H * 2           # 16 rows of one expert per piece
    pieces = _pieces(plan, "model.safetensors", chunk_bytes=small)
    t, ps = pieces["language_model.model.layers.0.mlp.switch_mlp.up_proj.weight"]
    assert t.quant is not None and len(ps) == E * I // 16
    assert max(p.source_bytes for p in ps) == small
    whole = tmp_path / "whole.safetensors"
    chunked = tmp_path / "chunked.safetensors"
    entries = plan.files["model.safetensors"]
    write_shard(whole, entries, plan.sources)
    write_shard(chunked, entries, plan.sources, chunk_bytes=small)
    assert whole.read_bytes() == chunked.read_bytes()


def test_changing_one_expert_changes_only_the_head_shard_key(tmp_path):
    before = build_keys(_plan(tmp_path, HEADS["numbered"], "a"))
    head = dict(mx.load(str(MOE / "head_numbered.safetensors")))
    key = "mtp.layers.0.mlp.experts.7.up_proj.weight"
    head[key] = head[key] * 2
    path = tmp_path / "numbered.safetensors"
    mx.save_safetensors(str(path), head, metadata={"format": "pt"})
    after = build_keys(_plan(tmp_path, f"{{path: {path}, table: mtp_hf}}", "b"))
    assert after.file_keys["mtp.safetensors"] != before.file_keys["mtp.safetensors"]
    assert after.file_keys["model.safetensors"] == before.file_keys["model.safetensors"]


def test_plan_shows_each_output_with_all_its_sources(tmp_path):
    from forgekit.plan.report import describe

    rows = {r["output"]: r for r in describe(_plan(tmp_path, HEADS["numbered"]))}
    sources = rows["mtp.layers.0.mlp.switch_mlp.down_proj.weight"]["source"]
    assert sources == ", ".join(f"mtp:mtp.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(E))
    fused = {r["output"]: r for r in describe(_plan(tmp_path, HEADS["fused"], "f"))}
    assert fused["mtp.layers.0.mlp.switch_mlp.gate_proj.weight"]["source"] == "mtp:mtp.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("shape,axis,parts", [((3, 4, 6, 5), 1, 2), ((3, 4, 6, 5), 2, 3), ((6, 5), 0, 3),
                                              ((4, 10, 3), -2, 2)])
def test_split_segments_concatenate_to_numpy_split(shape, axis, parts):
    """Segments (rows of the 2-D view) of every part equal numpy's split of the same array."""
    import numpy as np

    from forgekit.plan.combine import split_part
    from forgekit.plan.remap import Mapped
    from forgekit.recipe import RemapRule
    from forgekit.sources import TensorInfo

    a = np.arange(int(np.prod(shape))).reshape(shape)
    flat = a.reshape(-1, shape[-1])
    rule = RemapRule(name="r", match="x", split={"axis": axis, "to": [f"o{j}" for j in range(parts)]})
    info = TensorInfo("x", shape, "float32", a.size * 4, "f")
    for j, want in enumerate(np.split(a, parts, axis=axis)):
        c = split_part(Mapped("x", f"o{j}", rule, part=(j, parts)), info)
        got = np.concatenate([flat[s.rows[0]:s.rows[1]] for s in c.segments])
        assert c.shape == want.shape and np.array_equal(got.reshape(want.shape), want)
