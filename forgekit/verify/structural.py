"""structural: file placement, exact head key set/dtypes/shapes (a quantized head or keys
without the `mtp.` prefix are named as such), no mtp.* in the trunk, conv1d layout,
quantization consistent with config.json, every mlx-lm module present, every source
tensor accounted for.

params: head_dtype (safetensors dtype code the head must have, default BF16)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..mtp_head import MTPHeadModel, text_args
from ..sources.safetensors_dir import read_header
from ..verify_params import StructuralParams

HEAD_FILE_DEFAULT = "mtp.safetensors"


def expected_head(config: dict) -> dict[str, tuple[int, ...]]:
    """The 15 mtp.* keys and their shapes, from the module tree built from config.json."""
    from mlx.utils import tree_flatten

    model = MTPHeadModel(text_args(config))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def expected_trunk(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names/shapes mlx-lm builds from the output config (quantized where configured)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config=config)
    model = model_class(args_class.from_dict(config))
    q = config.get("quantization")
    if q:
        def predicate(path, module):
            if path in q:
                return q[path]
            return hasattr(module, "to_quantized") and module.weight.shape[-1] % q["group_size"] == 0
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=predicate)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _fail(cause: str, **extra) -> dict:
    return {"passed": False, "cause": cause, **extra}


def _check_head(directory: Path, config: dict, params: StructuralParams) -> tuple[dict | None, dict]:
    """Head: its own file, exact key set, the recipe's dtype, shapes from config. (failure, header)"""
    head_file = config.get("mlx_lm_extra_tensors", {}).get("mtp_file", HEAD_FILE_DEFAULT)
    if head_file.startswith("model"):
        return _fail(f"head file '{head_file}' would be loaded by mlx-lm as a trunk shard"), {}
    if not (directory / head_file).is_file():
        return _fail(f"head file '{head_file}' named by config.json mlx_lm_extra_tensors is missing"), {}
    head, _ = read_header(directory / head_file)
    head_dtype = params.head_dtype
    packed = sorted(k for k in head if k.endswith((".scales", ".biases")) or head[k]["dtype"] == "U32")
    if packed:
        bits = config.get("quantization", {}).get("bits", "?")
        return _fail(f"{head_file}: the head is quantized ({len(packed)} packed/scale tensors, e.g. '{packed[0]}'; "
                     f"trunk default {bits}-bit), the recipe demands {head_dtype}"), head
    want = expected_head(config)
    missing = sorted(set(want) - set(head))
    extra = sorted(set(head) - set(want))
    if missing and extra and {f"mtp.{k}" for k in extra} >= set(missing):
        return _fail(f"{head_file}: head keys lack the 'mtp.' prefix (e.g. '{extra[0]}'); MTPLX would load nothing"), head
    if missing or extra:
        return _fail(f"{head_file}: head keys differ from the {len(want)} mtp.* keys "
                     f"(missing {missing[:3]}, unexpected {extra[:3]})"), head
    for k, shape in want.items():
        if tuple(head[k]["shape"]) != shape:
            return _fail(f"{head_file}: '{k}' has shape {head[k]['shape']}, config says {list(shape)}"), head
        if head[k]["dtype"] != head_dtype:
            return _fail(f"{head_file}: '{k}' is {head[k]['dtype']}, the recipe demands {head_dtype} (mis-cast head)"), head
    return None, head


def _check_trunk(directory: Path, config: dict) -> tuple[dict | None, dict, int]:
    """Trunk: files, index, no mtp.*, module tree, layouts, quantization. (failure, header, shards)"""
    shards = sorted(directory.glob("model*.safetensors"))
    if not shards:
        return _fail("no model*.safetensors trunk file"), {}, 0
    trunk: dict[str, dict] = {}
    for shard in shards:
        header, _ = read_header(shard)
        stray = [k for k in header if re.match(r"(?:language_model\.)?mtp\.", k)]
        if stray:
            return _fail(f"{shard.name} holds MTP key '{stray[0]}': mlx-lm would load it into the trunk"), trunk, len(shards)
        trunk.update(header)
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        stray = [k for k in weight_map if "mtp." in k]
        if stray:
            return _fail(f"model.safetensors.index.json lists MTP key '{stray[0]}'"), trunk, len(shards)
        if set(weight_map) != set(trunk):
            diff = sorted(set(weight_map) ^ set(trunk))
            return _fail(f"index weight_map and the shards disagree on {len(diff)} keys, e.g. '{diff[0]}'"), trunk, len(shards)
    expected = expected_trunk(config)
    missing = sorted(set(expected) - set(trunk))
    extra = sorted(set(trunk) - set(expected))
    if missing or extra:
        return _fail(f"trunk differs from mlx-lm's module tree for this config (missing {missing[:3]}, unexpected {extra[:3]})"), trunk, len(shards)
    for k, shape in expected.items():
        if tuple(trunk[k]["shape"]) != shape:
            return _fail(f"trunk tensor '{k}' has shape {trunk[k]['shape']}, mlx-lm expects {list(shape)}"), trunk, len(shards)
    conv = [k for k in trunk if k.endswith("conv1d.weight")]
    for k in conv:
        if trunk[k]["shape"][-1] != 1:
            return _fail(f"'{k}' is {trunk[k]['shape']}, not the MLX layout [C, K, 1]"), trunk, len(shards)
    q = config.get("quantization")
    if q != config.get("quantization_config"):
        return _fail("config.json 'quantization' and 'quantization_config' differ"), trunk, len(shards)
    for path, entry in (q or {}).items():
        if isinstance(entry, dict) and entry.get("bits") not in (2, 3, 4, 5, 6, 8):
            return _fail(f"config.json quantization entry '{path}' has invalid bits {entry.get('bits')}"), trunk, len(shards)
    return None, trunk, len(shards)


def run(directory: Path, plan, params: StructuralParams, bodies=None) -> dict:
    config = json.loads((directory / "config.json").read_text())
    failure, head = _check_head(directory, config, params)
    if failure:
        return failure
    failure, trunk, shards = _check_trunk(directory, config)
    if failure:
        return failure
    # Every source tensor accounted for (the plan enforces it; record the numbers).
    accounted = {role: len([t for t in plan.tensors if t.role == role]) + len(plan.dropped.get(role, {}))
                 for role in plan.sources}
    total = {role: len(src.keys()) + len(src.unread) for role, src in plan.sources.items()}
    if accounted != total:
        return _fail(f"source tensors not all accounted for: {accounted} of {total}")
    quantized = sum(1 for k in trunk if k.endswith(".scales"))
    return {"passed": True, "summary": {"head_keys": len(head), "trunk_tensors": len(trunk),
                                        "quantized_modules": quantized, "shards": shards}}
