"""Planned tensors against the model the output config describes, before any byte is read:
every parameter mlx-lm's model class needs is produced with its shape (a body missing its final
norm is caught here, not by `load` after the build), and every `mtp.*` head tensor has the shape
the body's config gives the head (a head from a model of another width is caught at validate).

Asking mlx-lm means reading its model files; forgekit/mlx_models.py does that without mlx_lm's
package start-up (transformers behind it: about 0.6 s, most of a no-op build). The answer depends
only on the config and the code that builds the model, so it is also memoised under the cache
(SHAPES_MEMO), keyed by the config, mlx-lm's and mlx's versions and the bytes of forgekit's code
that computes it (CODE_FILES); a no-op build then imports no model library and builds no model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .. import settings
from ..errors import PlanError
from .tensor import TensorPlan

HEAD_PREFIX = "mtp."
SHAPES_MEMO = "model-shapes.json"   # under the cache: memo key -> {"trunk": {...}, "head": {...}}
SHAPES_MEMO_ENTRIES = 32            # configs remembered (one per model a cache builds)
# forgekit's code the answer depends on, part of the memo key (this file: how shapes are read)
CODE_FILES = ("mtp_head.py", "mlx_models.py", "plan/shapes.py")


def _shapes(module) -> dict[str, tuple[int, ...]]:
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}


def trunk_shapes(config: dict, config_file: Path | str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of mlx-lm's model for `config` (lazy arrays: nothing allocated)."""
    from ..mlx_models import model_classes

    try:
        model_class, args_class = model_classes(config)
    except ValueError:
        raise PlanError(f"{config_file}: model_type '{config.get('model_type')}' in the output config has no "
                        f"mlx-lm model; use a base recipe that writes a form mlx-lm loads") from None
    return _shapes(model_class(args_class.from_dict(config)))


def head_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    from ..mtp_head import MTPHeadModel, text_args

    return _shapes(MTPHeadModel(text_args(config)))


def _memo_key(config: dict, with_head: bool) -> str:
    from importlib.metadata import version

    import xxhash

    package = Path(__file__).resolve().parent.parent
    code = b"".join((package / name).read_bytes() for name in CODE_FILES)
    what = {"config": config, "head": with_head, "mlx_lm": version("mlx-lm"), "mlx": version("mlx"),
            "head_code": xxhash.xxh3_128_hexdigest(code)}
    return xxhash.xxh3_128_hexdigest(json.dumps(what, sort_keys=True, default=str).encode())


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _as_shapes(table, allow_empty: bool = False) -> dict[str, tuple[int, ...]] | None:
    """A memo entry's {name: [dims]} as shapes; None if it is not that (a damaged memo). Empty
    only where nothing is asked (no head): an empty trunk table would check nothing."""
    if not isinstance(table, dict) or (not table and not allow_empty):
        return None
    if not all(isinstance(v, list) and all(type(d) is int for d in v) for v in table.values()):
        return None
    return {str(k): tuple(v) for k, v in table.items()}


def expected_shapes(config: dict, config_file: Path | str, with_head: bool):
    """(trunk, head) parameter name -> shape for `config` (head empty unless `with_head`),
    from the cache's memo when it holds this config (it is never created for this: a cache
    that does not exist yet stays absent; a damaged memo is recomputed)."""
    path = settings.cache_root() / SHAPES_MEMO
    key = _memo_key(config, with_head)
    memo = _read_memo(path)
    hit = memo.get(key) if isinstance(memo.get(key), dict) else {}
    trunk, head = _as_shapes(hit.get("trunk")), _as_shapes(hit.get("head"), allow_empty=not with_head)
    if trunk is not None and head is not None:
        return trunk, head
    # copies: mlx-lm's ModelArgs rewrite the dict they are given (rope_parameters' rope_type ->
    # type), which would change this config's memo key for the next call in the same process
    trunk = trunk_shapes(copy.deepcopy(config), config_file)
    head = head_shapes(copy.deepcopy(config)) if with_head else {}
    if path.parent.is_dir():
        from ..fileio import atomic_write_json

        kept = {k: v for k, v in list(memo.items())[-(SHAPES_MEMO_ENTRIES - 1):] if k != key}
        try:
            atomic_write_json(path, {**kept, key: {"trunk": trunk, "head": head}}, memo=True)
        except OSError:
            pass   # a read-only cache only costs asking mlx-lm again
    return trunk, head


def check_shapes(tensors: list[TensorPlan], config: dict, config_file: Path | str) -> None:
    """Raise PlanError, one line, on the first missing trunk parameter or wrong shape."""
    planned = {t.key: t for t in tensors}
    produced = {name for t in tensors for name, _, _ in t.outputs()}
    with_head = any(t.key.startswith(HEAD_PREFIX) for t in tensors)
    trunk, head = expected_shapes(config, config_file, with_head)
    for name, shape in trunk.items():
        if name not in produced:
            raise PlanError(f"{config_file}: the body gives no tensor for '{name}', which mlx-lm's "
                            f"{config.get('model_type')} model needs; the source is incomplete")
        t = planned.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise PlanError(f"{t.source_file}: tensor '{t.source_key}' -> '{name}' has shape {list(t.shape)}, "
                            f"the output config says {list(shape)}")
    for name, shape in head.items():
        t = planned.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise PlanError(f"{t.source_file}: head tensor '{t.source_key}' -> '{name}' has shape "
                            f"{list(t.shape)}, the body config says {list(shape)}: a head from a model of "
                            f"another size")
