"""The recipe's config edits applied to the body's config.json (pure; the build writes the result,
the plan checks facts against it before any byte is read)."""

from __future__ import annotations

import copy

from ..recipe import ConfigEdits

MISSING = object()


def set_dotted(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = copy.deepcopy(value)


def drop_dotted(d: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.get(p)
        if not isinstance(d, dict):
            return
    d.pop(last, None)


def get_dotted(d: dict, dotted: str, default=MISSING):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def edited_config(body_config: dict | None, edits: ConfigEdits) -> dict:
    """Body config -> nested under `edits.nest` (if given) -> `drop` -> `set`."""
    config = copy.deepcopy(body_config or {})
    if edits.nest:
        config = {edits.nest: config}
    for dotted in edits.drop:
        drop_dotted(config, dotted)
    for key in [k for k in config if k.endswith("norm_encoding")]:
        config.pop(key)
    for dotted, value in edits.set.items():
        set_dotted(config, dotted, value)
    return config
