"""Planned tensors against the model the output config describes, before any byte is read:
every parameter mlx-lm's model class needs is produced with its shape (a body missing its final
norm is caught here, not by `load` after the build), and every `mtp.*` head tensor has the shape
the body's config gives the head (a head from a model of another width is caught at validate)."""

from __future__ import annotations

from pathlib import Path

from ..errors import PlanError
from .tensor import TensorPlan

HEAD_PREFIX = "mtp."


def _shapes(module) -> dict[str, tuple[int, ...]]:
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}


def trunk_shapes(config: dict, config_file: Path | str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of mlx-lm's model for `config` (lazy arrays: nothing allocated)."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
    except ValueError:
        raise PlanError(f"{config_file}: model_type '{config.get('model_type')}' in the output config has no "
                        f"mlx-lm model; use a base recipe that writes a form mlx-lm loads") from None
    return _shapes(model_class(args_class.from_dict(config)))


def head_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    from ..mtp_head import MTPHeadModel, text_args

    return _shapes(MTPHeadModel(text_args(config)))


def check_shapes(tensors: list[TensorPlan], config: dict, config_file: Path | str) -> None:
    """Raise PlanError, one line, on the first missing trunk parameter or wrong shape."""
    planned = {t.key: t for t in tensors}
    produced = {name for t in tensors for name, _, _ in t.outputs()}
    for name, shape in trunk_shapes(config, config_file).items():
        if name not in produced:
            raise PlanError(f"{config_file}: the body gives no tensor for '{name}', which mlx-lm's "
                            f"{config.get('model_type')} model needs; the source is incomplete")
        t = planned.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise PlanError(f"{t.source_file}: tensor '{t.source_key}' -> '{name}' has shape {list(t.shape)}, "
                            f"the output config says {list(shape)}")
    if not any(t.key.startswith(HEAD_PREFIX) for t in tensors):
        return
    for name, shape in head_shapes(config).items():
        t = planned.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise PlanError(f"{t.source_file}: head tensor '{t.source_key}' -> '{name}' has shape "
                            f"{list(t.shape)}, the body config says {list(shape)}: a head from a model of "
                            f"another size")
