"""structural: file placement, exact head key set/dtypes/shapes (a quantized head or keys
without the `mtp.` prefix are named as such), no mtp.* in the trunk, conv1d layout,
quantization consistent with config.json, every mlx-lm module present, every source
tensor accounted for, every trunk tensor stored at the bits the recipe's rules decide.

params: head_dtype (safetensors dtype code of the head's float tensors; default: what the plan writes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..dtypes import BY_NAME
from ..mtp_head import MTPHeadModel, text_args
from ..plan.quant import quantized_outputs
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
    from ..mlx_models import model_classes   # mlx-lm's classes without mlx_lm's start-up

    model_class, args_class = model_classes(config)
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


def _expected_head_files(config: dict, head_plan: list) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (safetensors dtype, shape): the config's 15 mtp.* shapes, stored as the plan writes them
    (a module the plan quantizes by a recipe rule as its packed weight, scales and biases)."""
    planned = {t.key: t for t in head_plan}
    out = {}
    for k, shape in expected_head(config).items():
        t = planned.get(k)
        if t is not None and t.quant is not None:
            base = k[: -len("weight")]
            for suffix, (dtype, qshape) in quantized_outputs(shape, t.quant, t.dtype).items():
                out[base + suffix] = (BY_NAME[dtype].st_code, qshape)
        else:
            out[k] = (BY_NAME[t.dtype].st_code if t is not None else "BF16", shape)
    return out


def _check_head(directory: Path, config: dict, params: StructuralParams, plan) -> tuple[dict | None, dict]:
    """Head: its own file, exact key set, dtypes and shapes from config and plan. (failure, header)

    A quantized head is accepted only when a recipe rule quantizes it on purpose (the plan says so
    and config.json names it); the trunk's default reaching the head is a mis-build."""
    head_file = config.get("mlx_lm_extra_tensors", {}).get("mtp_file", HEAD_FILE_DEFAULT)
    if head_file.startswith("model"):
        return _fail(f"head file '{head_file}' would be loaded by mlx-lm as a trunk shard"), {}
    if not (directory / head_file).is_file():
        return _fail(f"head file '{head_file}' named by config.json mlx_lm_extra_tensors is missing"), {}
    head, _ = read_header(directory / head_file)
    head_plan = [t for t in plan.tensors if t.file == head_file] if plan is not None else []
    floats = {t.dtype for t in head_plan if t.quant is None} or {"bfloat16"}
    head_dtype = params.head_dtype or BY_NAME[sorted(floats)[0]].st_code
    packed = sorted(k for k in head if k.endswith((".scales", ".biases")) or head[k]["dtype"] == "U32")
    chosen = [t for t in head_plan if t.quant is not None and t.quant_rule != "default"]
    named = {p for p in (config.get("quantization") or {}) if p.startswith("mtp.")}
    if packed and not chosen:
        bits = config.get("quantization", {}).get("bits", "?")
        return _fail(f"{head_file}: the head is quantized ({len(packed)} packed/scale tensors, e.g. '{packed[0]}'; "
                     f"trunk default {bits}-bit) but no quantization rule chooses that, the recipe demands {head_dtype}"), head
    if packed and not named:
        return _fail(f"{head_file}: the head is quantized but config.json's quantization names no mtp.* module: "
                     f"mlx-lm and MTPLX would not know how to unpack it"), head
    want = _expected_head_files(config, head_plan)
    missing = sorted(set(want) - set(head))
    extra = sorted(set(head) - set(want))
    if missing and extra and {f"mtp.{k}" for k in extra} >= set(missing):
        return _fail(f"{head_file}: head keys lack the 'mtp.' prefix (e.g. '{extra[0]}'); MTPLX would load nothing"), head
    if missing or extra:
        return _fail(f"{head_file}: head keys differ from the {len(want)} mtp.* keys "
                     f"(missing {missing[:3]}, unexpected {extra[:3]})"), head
    for k, (dtype, shape) in want.items():
        if tuple(head[k]["shape"]) != shape:
            return _fail(f"{head_file}: '{k}' has shape {head[k]['shape']}, config says {list(shape)}"), head
        demanded = head_dtype if dtype in ("BF16", "F16", "F32") else dtype
        if head[k]["dtype"] != demanded:
            return _fail(f"{head_file}: '{k}' is {head[k]['dtype']}, the recipe demands {demanded} (mis-cast head)"), head
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


def _check_quant_against_recipe(config: dict, trunk: dict, plan) -> dict | None:
    """Every trunk tensor stored at the bits/group size the recipe's rules decide (a router kept
    at 4 bits where a rule says 8 is named), and config.json saying the same."""
    for file in plan.indexed_files:
        for t in plan.files[file]:
            for name, _, shape in t.outputs():
                if name in trunk and tuple(trunk[name]["shape"]) != tuple(shape):
                    q = f"{t.quant.bits}-bit g{t.quant.group_size}" if t.quant else t.dtype
                    return _fail(f"{file}: '{name}' is stored {trunk[name]['shape']}, not {list(shape)} as "
                                 f"{q} (quantization rule '{t.quant_rule}')")
    entries = config.get("quantization") or {}
    for path, want in plan.quant_config.items():
        if entries.get(path) != want:
            return _fail(f"config.json quantization '{path}' is {entries.get(path)}, the recipe's rules "
                         f"decide {want}")
    return None


def run(directory: Path, plan, params: StructuralParams, bodies=None) -> dict:
    config = json.loads((directory / "config.json").read_text())
    failure, head = _check_head(directory, config, params, plan)
    if failure:
        return failure
    failure, trunk, shards = _check_trunk(directory, config)
    if failure:
        return failure
    # Every source tensor accounted for (the plan enforces it; record the numbers).
    accounted = {role: len({n for t in plan.tensors if t.role == role for n in t.source_names()})
                 + len(plan.dropped.get(role, {})) for role in plan.sources}
    total = {role: len(src.keys()) + len(src.unread) for role, src in plan.sources.items()}
    if accounted != total:
        return _fail(f"source tensors not all accounted for: {accounted} of {total}")
    failure = _check_quant_against_recipe(config, trunk, plan)
    if failure:
        return failure
    quantized = sum(1 for k in trunk if k.endswith(".scales"))
    return {"passed": True, "summary": {"head_keys": len(head), "trunk_tensors": len(trunk),
                                        "quantized_modules": quantized, "shards": shards}}
