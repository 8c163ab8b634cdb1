"""Recipe YAML read safely and boundedly, with the line of every key (for file:line errors)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Optional

import yaml

from .errors import RecipeError

# Bounds on hostile YAML: a recipe is a few KB; these are far above any real one.
MAX_RECIPE_BYTES = 1 << 20      # file size
MAX_DEPTH = 64                  # nesting of lists/mappings
MAX_EXPANDED = MAX_RECIPE_BYTES # values + scalar characters once every alias is expanded: no
                                # more than a file of the size limit could spell out without aliases
_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}
_NON_FINITE = {".nan", ".inf", "+.inf", "-.inf"}


class _LineLoader(yaml.SafeLoader):
    """Safe loader that records the line of every mapping key, rejects duplicate keys and
    refuses nesting deeper than MAX_DEPTH while composing (so the composer cannot recurse away)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False):
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
        loader.key_lines[(id(mapping), key)] = key_node.start_mark.line + 1
    loader.node_of[id(mapping)] = mapping
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_fail(path: Path, mark, problem: str, keys: tuple = ()) -> RecipeError:
    line = f":{mark.line + 1}" if mark is not None else ""
    key = ".".join(str(k) for k in keys)
    if problem.startswith("YAML tags"):  # "file:line: YAML tags are not allowed (...) at 'key'; ..."
        head, _, tail = problem.partition(";")
        return RecipeError(f"{path}{line}: {head}{f' at {key!r}' if key else ''};{tail}")
    return RecipeError(f"{path}{line}: {key + ': ' if key else ''}{problem}")


def _scalar_problem(node: yaml.ScalarNode) -> Optional[str]:
    """Why a scalar cannot be a recipe value (JSON holds only str/number/bool/null), or None."""
    if node.tag == _TAG + "timestamp":
        return f"'{node.value}' is read by YAML as a date; quote it to keep it as text"
    if node.tag == _TAG + "merge":
        return "YAML merge keys ('<<') are not supported; write the keys out, or use 'extends'"
    if node.tag not in _PLAIN_TAGS:
        shown = node.tag.replace(_TAG, "!!")
        return f"YAML tags are not allowed ({shown}); a recipe holds only text, numbers, booleans, null, lists and mappings"
    if node.tag == _TAG + "float" and node.value.lower() in _NON_FINITE:
        return f"'{node.value}' is not a finite number; JSON cannot hold it"
    if node.tag in (_TAG + "int", _TAG + "float") and len(node.value) > 40:
        return f"number '{node.value[:20]}...' has more than 40 characters"
    return None


def _check_nodes(path: Path, root: yaml.Node) -> None:
    """Refuse what a recipe cannot hold before constructing anything: recursive aliases, alias
    expansion beyond MAX_EXPANDED (alias bombs), non-JSON values, non-text mapping keys.

    Walks the node graph once (shared alias targets are sized once), without recursion."""
    size: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool, tuple]] = [(root, False, ())]
    while stack:
        node, done, keys = stack.pop()
        nid = id(node)
        if done:
            active.discard(nid)
            children = _children(node)
            total = 1 + sum(size[id(c)] for c in children)
            if total > MAX_EXPANDED:
                raise _yaml_fail(path, node.start_mark, f"aliases expand to more than {MAX_EXPANDED} values "
                                 "(a YAML alias bomb?); write the values out", keys)
            size[nid] = total
            continue
        if nid in size:
            continue
        if nid in active:
            raise _yaml_fail(path, node.start_mark, "a YAML alias refers to a node containing itself (recursive alias)", keys)
        if isinstance(node, yaml.ScalarNode):
            problem = _scalar_problem(node)
            if problem:
                raise _yaml_fail(path, node.start_mark, problem, keys)
            size[nid] = 1 + len(node.value)
            continue
        if node.tag not in (_TAG + "seq", _TAG + "map"):
            raise _yaml_fail(path, node.start_mark, f"YAML tags are not allowed ({node.tag.replace(_TAG, '!!')}); "
                             "a recipe holds only text, numbers, booleans, null, lists and mappings", keys)
        if isinstance(node, yaml.MappingNode):
            for key, _ in node.value:
                if key.tag == _TAG + "merge":
                    raise _yaml_fail(path, key.start_mark, _scalar_problem(key), keys)
                if not isinstance(key, yaml.ScalarNode) or key.tag != _TAG + "str":
                    shown = key.value if isinstance(key, yaml.ScalarNode) else "a list or mapping"
                    raise _yaml_fail(path, key.start_mark, f"mapping key {shown!r} is not text; quote it", keys)
        active.add(nid)
        stack.append((node, True, keys))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend([(k, False, keys), (v, False, keys + (k.value,))])
        else:
            stack.extend((c, False, keys + (i,)) for i, c in enumerate(node.value))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _recipe_text(path: Path) -> str:
    """The recipe's text: a regular file of at most MAX_RECIPE_BYTES, UTF-8, without NUL bytes."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise RecipeError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes; not a recipe")
    if b"\0" in raw:
        line = raw[:raw.index(b"\0")].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: NUL byte in the recipe")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None


def read_yaml(path: Path) -> tuple[dict, dict]:
    """Parse one YAML file; return (data, lines) with lines[(key path tuple)] = line number."""
    text = _recipe_text(path)
    loader = None
    try:
        loader = _LineLoader(text)
        loader.key_lines, loader.node_of = {}, {}
        node = loader.get_single_node()
        if node is not None:
            _check_nodes(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise _yaml_fail(path, mark, problem) from None
    except yaml.YAMLError as exc:  # e.g. ReaderError: a control character
        where = getattr(exc, "position", None)
        line = f":{text[:where].count(chr(10)) + 1}" if isinstance(where, int) else ""
        reason = getattr(exc, "reason", None) or "invalid YAML"
        raise RecipeError(f"{path}{line}: {reason}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe must be a YAML mapping, got {type(data).__name__}")
    lines: dict[tuple, int] = {}

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                line = loader.key_lines.get((id(obj), k))
                if line:
                    lines[prefix + (k,)] = line
                walk(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                if isinstance(v, dict) and v:  # a list item's line: its first key's line
                    first = loader.key_lines.get((id(v), next(iter(v))))
                    if first:
                        lines[prefix + (i,)] = first
                walk(v, prefix + (i,))

    walk(data, ())
    return data, lines
