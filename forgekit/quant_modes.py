"""What each quantization mode of the installed mlx accepts, and the check a recipe's
quantization gets at validate time (no mlx import: the schema stays light).

mlx's `mx.quantize` refuses any other combination (affine group 16, mxfp4 at 8 bits...);
tests/test_quant_menu.py checks this table against the installed mlx, so a change of mlx
shows up as a failing test, not as a build error halfway through.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModeSpec:
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    biases: bool            # affine stores per-group biases; the microscaling modes store none
    float_scales: bool      # affine scales are in the float dtype; the fp modes store uint8 scales


QUANT_MODES: dict[str, ModeSpec] = {
    "affine": ModeSpec(bits=(2, 3, 4, 5, 6, 8), group_sizes=(32, 64, 128), biases=True, float_scales=True),
    "mxfp4": ModeSpec(bits=(4,), group_sizes=(32,), biases=False, float_scales=False),
    "nvfp4": ModeSpec(bits=(4,), group_sizes=(16,), biases=False, float_scales=False),
    "mxfp8": ModeSpec(bits=(8,), group_sizes=(32,), biases=False, float_scales=False),
}


def combination_problem(bits: int, group_size: int, mode: str) -> str | None:
    """Why mlx cannot quantize with these parameters, or None."""
    spec = QUANT_MODES[mode]
    if bits not in spec.bits or group_size not in spec.group_sizes:
        return (f"mode {mode} takes bits {'/'.join(map(str, spec.bits))} at group size "
                f"{'/'.join(map(str, spec.group_sizes))}, not {bits} bits at group size {group_size}")
    return None


def rule_problems(quantization) -> list[tuple[int | None, str]]:
    """(rule index or None for the default, message) for every combination mlx would refuse,
    and for `layers` selections whose pattern captures no `layer` index."""
    out: list[tuple[int | None, str]] = []
    d = quantization.default
    problem = combination_problem(d.bits, d.group_size, d.mode)
    if problem:
        out.append((None, f"quantization.default: {problem}"))
    for i, rule in enumerate(quantization.rules):
        if not rule.quantize:
            continue
        bits, group, mode = rule.bits or d.bits, rule.group_size or d.group_size, rule.mode or d.mode
        problem = combination_problem(bits, group, mode)
        if problem:
            out.append((i, f"quantization.rules[{i}] rule '{rule.name}': {problem}"))
        if rule.layers is not None and "(?P<layer>" not in rule.match:
            out.append((i, f"quantization.rules[{i}] rule '{rule.name}': 'layers' needs a match pattern "
                           f"capturing the layer index as (?P<layer>\\d+)"))
    return out
