"""Outputs made of several source pieces: `split` (one source -> parts along an axis) and
`stack` (numbered sources -> one output on a new leading axis).

Every such output is described as `Segment`s: row ranges of its sources viewed as 2-D
[prod(shape[:-1]), shape[-1]], whose concatenation, in order, is the output viewed the same
way. That is exact for both kinds (a split part along an axis other than the last is one
contiguous row range per outer index; a stacked source is all its rows), and it is what lets
the build compute such an output piece by piece, never holding a whole [E, ...] tensor.
Reads headers and the body's config only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PlanError
from ..sources import TensorInfo
from .remap import Mapped
from .tensor import Segment


@dataclass(frozen=True)
class Combined:
    """One output tensor of a split or stack rule."""

    mapped: Mapped             # the first contributing mapping (its rule and output key)
    info: TensorInfo           # the first contributing source tensor
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]


def flat_rows(shape: tuple[int, ...]) -> int:
    """Rows of a tensor viewed as 2-D [prod(shape[:-1]), shape[-1]]."""
    return math.prod(shape[:-1]) if shape else 1


def config_value(config: dict | None, dotted: str, where: str):
    """A value of the body's config.json by dotted key; an error naming the key if absent or not an int."""
    value = config or {}
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise PlanError(f"{where}: the body's config.json has no '{dotted}'")
        value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"{where}: the body's config.json '{dotted}' is {value!r}, not a positive integer")
    return value


def split_part(m: Mapped, info: TensorInfo) -> Combined:
    """Part j of P of a source tensor along the rule's axis."""
    j, parts = m.part
    shape = tuple(info.shape)
    where = f"{info.file}: tensor '{m.source_key}' (rule '{m.rule.name}')"
    axis = m.rule.split.axis
    if not -len(shape) <= axis < len(shape) or axis % len(shape) == len(shape) - 1:
        raise PlanError(f"{where}: cannot split {list(shape)} along axis {axis} (it must be an axis other "
                        f"than the last)")
    axis %= len(shape)
    n = shape[axis]
    if n % parts:
        raise PlanError(f"{where}: axis {m.rule.split.axis} of {list(shape)} has odd size {n}: it cannot be "
                        f"split into {parts} equal parts (a fused tensor of the wrong size?)")
    size, inner = n // parts, math.prod(shape[axis + 1:-1])
    segments: list[Segment] = []
    for outer in range(math.prod(shape[:axis])):
        r0 = (outer * n + j * size) * inner
        r1 = r0 + size * inner
        if segments and segments[-1].rows[1] == r0:
            segments[-1] = Segment(m.source_key, info.file, (segments[-1].rows[0], r1))
        else:
            segments.append(Segment(m.source_key, info.file, (r0, r1)))
    out_shape = shape[:axis] + (size,) + shape[axis + 1:]
    return Combined(m, info, out_shape, tuple(segments))


def stack_group(group: list[Mapped], infos: dict[str, TensorInfo], config: dict | None) -> Combined:
    """Numbered source tensors -> one output; refuses gaps, duplicates and a wrong count by index."""
    rule = group[0].rule
    output = group[0].output_key
    where = f"rule '{rule.name}' (output '{output}', source {infos[group[0].source_key].file})"
    by_index: dict[int, Mapped] = {}
    for m in group:
        if m.index is None or not m.index.isdigit():
            raise PlanError(f"{where}: tensor '{m.source_key}': match group {rule.stack.index} is "
                            f"{m.index!r}, not an index number")
        i = int(m.index)
        if i in by_index:
            raise PlanError(f"{where}: tensors '{by_index[i].source_key}' and '{m.source_key}' both give index {i}")
        by_index[i] = m
    count = config_value(config, rule.stack.count, where)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise PlanError(f"{where}: no source tensor for index {missing[0]}"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                        f"{rule.stack.count} = {count} needs indices 0..{count - 1}")
    extra = sorted(i for i in by_index if i >= count)
    if extra:
        raise PlanError(f"{where}: tensor '{by_index[extra[0]].source_key}' has index {extra[0]}, but "
                        f"{rule.stack.count} = {count} allows only 0..{count - 1}")
    first = infos[by_index[0].source_key]
    segments = []
    for i in range(count):
        info = infos[by_index[i].source_key]
        if tuple(info.shape) != tuple(first.shape) or info.dtype != first.dtype:
            raise PlanError(f"{info.file}: tensor '{info.name}' is {info.dtype} {list(info.shape)}, but index 0 "
                            f"'{first.name}' is {first.dtype} {list(first.shape)}: {where} stacks equal tensors")
        segments.append(Segment(info.name, info.file, (0, flat_rows(tuple(info.shape)))))
    return Combined(by_index[0], first, (count,) + tuple(first.shape), tuple(segments))


def check_leading_dim(c: Combined, config: dict | None) -> None:
    """A rule's `leading_dim`: the output's first axis must equal that config value (e.g. the expert count)."""
    key = c.mapped.rule.leading_dim
    if key is None:
        return
    where = f"{c.info.file}: tensor '{c.info.name}' (rule '{c.mapped.rule.name}')"
    want = config_value(config, key, where)
    if not c.shape or c.shape[0] != want:
        raise PlanError(f"{where}: output '{c.mapped.output_key}' {list(c.shape)} has leading axis "
                        f"{c.shape[0] if c.shape else 'none'}, but the body's {key} is {want}")


def combine(mapped: list[Mapped], infos: dict[str, TensorInfo], config: dict | None) -> list[Combined]:
    """The outputs of the split and stack mappings (in first-seen order); 1:1 mappings are skipped."""
    out: list[Combined] = []
    stacks: dict[str, list[Mapped]] = {}
    for m in mapped:
        if m.rule.split:
            out.append(split_part(m, infos[m.source_key]))
        elif m.rule.stack:
            stacks.setdefault(m.output_key, []).append(m)
    out.extend(stack_group(group, infos, config) for group in stacks.values())
    for c in out:
        check_leading_dim(c, config)
    return out
