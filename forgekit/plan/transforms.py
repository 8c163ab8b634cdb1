"""Closed registry of named tensor transforms a recipe may apply to a source tensor.

Each transform knows what it does to the shape (so plans are computed without
reading tensor bytes) and to the values. They run in the source dtype, before the
final cast, exactly as mlx-lm's own sanitize does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..recipe import TRANSFORM_NAMES


@dataclass(frozen=True)
class Transform:
    name: str
    doc: str
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    apply: Callable  # mlx array -> mlx array
    check: Callable[[tuple[int, ...]], str | None] = lambda shape: None


def _conv_check(shape):
    if len(shape) != 3 or shape[1] != 1:
        return f"conv1d_layout expects an HF conv1d weight [C, 1, K], got {list(shape)}"
    return None


def _contiguous(a):
    import mlx.core as mx

    return mx.contiguous(a)


def _norm_check(shape):
    return None if len(shape) == 1 else f"norm_shift expects a 1-D norm weight, got {list(shape)}"


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform(
            "norm_shift",
            "zero-centred RMSNorm gain (HF, applied as x*(1+w)) -> absolute gain (MLX): w + 1",
            shape=lambda s: s,
            apply=lambda w: w + 1.0,
            check=_norm_check,
        ),
        Transform(
            "norm_unshift",
            "absolute RMSNorm gain -> zero-centred: w - 1 (e.g. GGUF norms into an HF-convention file)",
            shape=lambda s: s,
            apply=lambda w: w - 1.0,
            check=_norm_check,
        ),
        Transform(
            "conv1d_layout",
            "HF depthwise conv1d weight [C, 1, K] -> MLX [C, K, 1]",
            shape=lambda s: (s[0], s[2], s[1]),
            apply=lambda w: _contiguous(w.moveaxis(2, 1)),
            check=_conv_check,
        ),
    )
}

if tuple(TRANSFORMS) != TRANSFORM_NAMES:  # the schema's table and this registry must name the same transforms
    raise ImportError(f"forgekit.recipe.TRANSFORM_NAMES {TRANSFORM_NAMES} != registry {tuple(TRANSFORMS)}")
