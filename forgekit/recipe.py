"""Recipe schema, YAML loading with file:line errors, and `extends` merging.

A recipe is YAML validated into frozen pydantic models (unknown keys are errors).
`extends: NAME` merges a base recipe: mappings merge key by key, a child's list or
scalar replaces the parent's. Every error names the file, the line and the key.
"""

from __future__ import annotations

import os
import re
import stat

try:  # the parser behind `re`, to inspect a pattern's structure
    import re._constants as sre
    import re._parser as sre_parse
except ImportError:  # Python < 3.11
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

PACKAGED_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DTYPES = ("bfloat16", "float16", "float32")


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(Frozen):
    """Where tensors come from: a local path, or an HF repo at a revision (optionally one file)."""

    path: Optional[str] = None
    repo: Optional[str] = None
    revision: Optional[str] = None
    file: Optional[str] = None
    table: Optional[str] = Field(None, description="remap table for this source; default: the source's role name")
    fetch: Optional[Literal["ranges", "full"]] = Field(
        None, description="a GGUF file in a repo: 'ranges' reads the header and only the needed tensors by HTTP "
                          "byte range (the default for *.gguf), 'full' downloads the whole file")

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.repo is None):
            raise ValueError("give exactly one of 'path' or 'repo'")
        if self.path is not None and (self.revision or self.file):
            raise ValueError("'revision' and 'file' only go with 'repo'")
        if self.fetch is not None and not (self.file and self.file.endswith(".gguf")):
            raise ValueError("'fetch' only goes with a 'repo' and a '.gguf' 'file'")
        return self


def _check_regex(pattern: str) -> str:
    concrete = pattern.replace("{mtp_block}", "0")
    try:
        re.compile(concrete)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
    risk = backtracking_risk(concrete)
    if risk:
        raise ValueError(f"regular expression {pattern!r} can backtrack catastrophically ({risk}); simplify it")
    return pattern


MAX_WIDE_REPEATS = 3
_REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT)}


def backtracking_risk(pattern: str) -> Optional[str]:
    """Why matching `pattern` may backtrack catastrophically, or None. Python's `re` has no
    time limit, so risky shapes are refused when the recipe loads:

    - a repeat of unbounded count whose body holds another repeat (`(a+)+`, `(a*)*`, `(\\w+\\.?)*`):
      the ways to split a string between the two grow exponentially with its length;
    - an unbounded repeat over alternatives that can start with the same character (`(a|a)*`,
      `(a|ab)+`): same blow-up;
    - more than MAX_WIDE_REPEATS unbounded repeats of a wide atom (`.`, `[^x]`, `\\w`...):
      the work grows as (name length) ** count; with tensor names capped at 512 characters (sources.base.MAX_NAME)
      three stay in milliseconds, four can take seconds per name.
    Real remap rules (`model\\.layers\\.(\\d+)\\..*`) have none of these."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return None
    wide = 0

    def walk(items, under_unbounded: bool) -> Optional[str]:
        nonlocal wide
        for op, av in items:
            if op in _REPEATS:
                lo, hi, body = av
                if under_unbounded and hi > 1:
                    return "a quantifier nested inside an unbounded quantifier"
                unbounded = hi == sre.MAXREPEAT
                if unbounded and _is_wide(body):
                    wide += 1
                if unbounded and _ambiguous_branches(body):
                    return "alternatives under an unbounded quantifier that can match the same text"
                found = walk(body, under_unbounded or (unbounded and hi > 1))
            elif op == sre.SUBPATTERN:
                found = walk(av[-1], under_unbounded)
            elif op == sre.BRANCH:
                found = next(filter(None, (walk(b, under_unbounded) for b in av[1])), None)
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                found = walk(av[1], under_unbounded)
            else:
                found = None
            if found:
                return found
        return None

    found = walk(parsed, False)
    if found:
        return found
    if wide > MAX_WIDE_REPEATS:
        return f"{wide} unbounded repeats of a wide pattern such as '.*'; at most {MAX_WIDE_REPEATS}"
    return None


def _is_wide(body) -> bool:
    """Whether a repeated body can match many different characters (`.`, `[^x]`, `\\w`, `\\S`)."""
    if len(body) != 1:
        return any(_is_wide([item]) for item in body)
    op, av = body[0]
    if op in (sre.ANY, sre.NOT_LITERAL):
        return True
    if op == sre.IN:
        return any(o in (sre.NEGATE, sre.CATEGORY) and a is not sre.CATEGORY_DIGIT for o, a in av)
    if op == sre.SUBPATTERN:
        return _is_wide(av[-1])
    return False


def _char_sets(items) -> list[set]:
    """Per position, the characters a branch can have there, up to its first item that is
    not a plain character or character class."""
    out = []
    for op, av in items:
        if op == sre.LITERAL:
            out.append({av})
        elif op == sre.IN and all(o in (sre.LITERAL, sre.RANGE) for o, _ in av):
            chars: set = set()
            for o, a in av:
                chars |= {a} if o == sre.LITERAL else set(range(a[0], min(a[1], a[0] + 4096) + 1))
            out.append(chars)
        else:
            break
    return out


def _distinct(a: list[set], b: list[set]) -> bool:
    """Whether two branches can never match the same text: at some position both have a plain
    character and the characters differ."""
    return any(not (x & y) for x, y in zip(a, b))


def _ambiguous_branches(body) -> bool:
    """Whether a repeated body holds an alternation whose branches may start alike (the parser
    factors common prefixes out: `(a|ab)` arrives as `a(?:|b)`, an empty branch)."""
    for op, av in body:
        if op == sre.SUBPATTERN and _ambiguous_branches(av[-1]):
            return True
        if op == sre.BRANCH:
            sets = [_char_sets(branch) for branch in av[1]]
            if any(not _distinct(x, y) for n, x in enumerate(sets) for y in sets[n + 1:]):
                return True
    return False


Regex = Annotated[str, AfterValidator(_check_regex)]


class RemapRule(Frozen):
    """Maps (full-match regex, `\\1` groups in `to`) or drops source tensors."""

    name: str
    match: Regex
    to: Optional[str] = None
    drop: bool = False
    optional: bool = False
    transforms: tuple[str, ...] = ()
    dtype: Optional[Literal["bfloat16", "float16", "float32", "source"]] = None

    @model_validator(mode="after")
    def _to_or_drop(self):
        if (self.to is None) == (not self.drop):
            raise ValueError(f"rule '{self.name}' needs exactly one of 'to' or 'drop: true'")
        if self.drop and (self.transforms or self.dtype):
            raise ValueError(f"rule '{self.name}' drops tensors, so it cannot have transforms or dtype")
        return self


class QuantParams(Frozen):
    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    group_size: Literal[32, 64, 128] = 64
    mode: Literal["affine"] = "affine"


class QuantRule(Frozen):
    """Quantization for the quantizable modules (2-D `.weight`) whose module path full-matches."""

    name: str
    match: Regex
    quantize: bool = True
    bits: Optional[Literal[2, 3, 4, 5, 6, 8]] = None
    group_size: Optional[Literal[32, 64, 128]] = None
    optional: bool = False


class Quantization(Frozen):
    default: QuantParams = QuantParams()
    rules: tuple[QuantRule, ...] = ()


class Sidecar(Frozen):
    """Output tensors that go to their own file, outside the model*.safetensors index."""

    match: Regex
    file: str

    @field_validator("file")
    @classmethod
    def _not_model(cls, v: str) -> str:
        if v.startswith("model") or "/" in v or not v.endswith(".safetensors"):
            raise ValueError(f"sidecar file {v!r} must be a plain *.safetensors name not starting with 'model'")
        return v


def _plain_file_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"{name!r} must be a plain file name inside the output dir")
    return name


class Output(Frozen):
    dir: Optional[str] = None
    max_shard_bytes: int = Field(5 * 2**30, gt=0)
    sidecars: tuple[Sidecar, ...] = ()
    copy_files: tuple[Annotated[str, AfterValidator(_plain_file_name)], ...] = ()


class ConfigEdits(Frozen):
    """Edits to the body's config.json: keys dropped (dotted paths) and keys set."""

    drop: tuple[str, ...] = ()
    set: dict[str, Any] = {}


class VerifyStep(Frozen):
    step: Literal["structural", "norms", "load", "parity", "mtp", "mtplx"]
    params: dict[str, Any] = {}


def _safe_name(name: str) -> str:
    """The name is the default output dir `build/<name>`: one plain path component, printable."""
    if not name or name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise ValueError(f"{name!r} must be a plain name (no '/', '\\', '..' or control characters): "
                         f"it names the output dir build/<name>")
    return name


class Recipe(Frozen):
    name: Annotated[str, AfterValidator(_safe_name)]
    description: str = ""
    sources: dict[str, Source] = {}
    remap: dict[str, tuple[RemapRule, ...]] = {}
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quantization: Quantization = Quantization()
    output: Output = Output()
    config: ConfigEdits = ConfigEdits()
    runtime: dict[str, Any] = {}
    verify: tuple[VerifyStep, ...] = ()
    # Not part of the user's YAML: filled in by the loader.
    recipe_file: str = ""
    recipe_files: tuple[str, ...] = ()

    def table_for(self, role: str) -> str:
        return self.sources[role].table or role

    def output_dir(self) -> Path:
        if self.output.dir:
            return Path(self.output.dir)
        return Path("build") / self.name


# ---------------------------------------------------------------- YAML with line numbers


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


def _read_yaml(path: Path) -> tuple[dict, dict]:
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


def _merge(parent: Any, child: Any) -> Any:
    if isinstance(parent, dict) and isinstance(child, dict):
        merged = dict(parent)
        for k, v in child.items():
            merged[k] = _merge(parent[k], v) if k in parent else v
        return merged
    return child


def find_recipe(ref: str, relative_to: Optional[Path] = None) -> Path:
    """A recipe name (`qwythos-9b`) or a path (`x/y.yaml`) → the recipe file.

    Only recipes are named: a bare name, or a path ending in .yaml/.yml. Anything else
    (`/etc/shadow`) is refused before it is opened, so no line of a foreign file is echoed."""
    is_path = ref.endswith((".yaml", ".yml")) or os.sep in ref or (os.altsep or os.sep) in ref
    if not ref or "\0" in ref or (is_path and not ref.endswith((".yaml", ".yml"))):
        raise RecipeError(f"{ref!r} is not a recipe: give a recipe name or a path ending in .yaml or .yml")
    if is_path:
        candidates = [Path(ref)] if relative_to is None else [relative_to / ref, Path(ref)]
    else:
        dirs = [d for d in (relative_to, Path.cwd() / "recipes", PACKAGED_RECIPES) if d is not None]
        candidates = [d / f"{ref}.yaml" for d in dirs]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise RecipeError(f"recipe '{ref}' not found (looked at {', '.join(str(c) for c in candidates)})")


def _load_chain(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[tuple, tuple[Path, int]], tuple[Path, ...]]:
    if path in seen:
        cycle = " -> ".join(p.name for p in seen + (path,))
        raise RecipeError(f"{seen[-1]}: 'extends' forms a cycle: {cycle}")
    data, lines = _read_yaml(path)
    where = {k: (path, line) for k, line in lines.items()}
    files = (path,)
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return _resolve_paths(data, path), where, files
    if not isinstance(base_ref, str):
        raise RecipeError(f"{path}:{lines.get(('extends',), 1)}: 'extends' must be a recipe name or path")
    try:
        base_path = find_recipe(base_ref, path.parent)
    except RecipeError as exc:
        raise RecipeError(f"{path}:{lines.get(('extends',), 1)}: extends: {exc}") from None
    base, base_where, base_files = _load_chain(base_path, seen + (path,))
    base.pop("name", None)  # a name is never inherited
    if isinstance(data.get("sources"), dict) and isinstance(base.get("sources"), dict):
        # A source the child names replaces the parent's whole (never merged key by key): a child
        # switching `path` -> `repo`, or a GGUF head -> an HF head, must not inherit `file`/`table`.
        base["sources"] = {k: v for k, v in base["sources"].items() if k not in data["sources"]}
    merged = _merge(base, _resolve_paths(data, path))
    return merged, {**base_where, **where}, base_files + files


def _resolve_paths(data: dict, recipe_path: Path) -> dict:
    """Local source paths and the output dir are relative to the recipe file that names them."""
    data = dict(data)
    sources = data.get("sources")
    if isinstance(sources, dict):
        sources = {k: dict(v) if isinstance(v, dict) else v for k, v in sources.items()}
        for spec in sources.values():
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                spec["path"] = str((recipe_path.parent / os.path.expanduser(spec["path"])).resolve())
        data["sources"] = sources
    output = data.get("output")
    if isinstance(output, dict) and isinstance(output.get("dir"), str):
        output = dict(output)
        output["dir"] = str((recipe_path.parent / os.path.expanduser(output["dir"])).resolve())
        data["output"] = output
    return data


def _locate(where: dict, loc: tuple, default: Path) -> str:
    for n in range(len(loc), 0, -1):
        hit = where.get(tuple(loc[:n]))
        if hit:
            return f"{hit[0]}:{hit[1]}"
    return f"{default}"


def load_recipe(ref: str | Path) -> Recipe:
    """Load, merge and validate a recipe given by name or path."""
    path = find_recipe(str(ref))
    data, where, files = _load_chain(path, ())
    data["recipe_file"] = str(path)
    data["recipe_files"] = tuple(str(f) for f in files)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        rule = _rule_name(data, loc)
        if rule and loc[-1] == "match" and msg.startswith("regular expression"):
            msg = f"rule '{rule}': {msg}"
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise RecipeError(f"{_locate(where, loc, path)}: {key}: {msg}{more}") from None
    _check_tables(recipe, where, path)
    return recipe


def _rule_name(data: Any, loc: tuple) -> Optional[str]:
    """The `name` of the rule (mapping) holding the key at `loc`, if there is one."""
    for part in loc[:-1]:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    name = data.get("name") if isinstance(data, dict) else None
    return name[:80] if isinstance(name, str) else None


def _check_tables(recipe: Recipe, where: dict, path: Path) -> None:
    """Cross-field checks pydantic cannot express on one field."""
    from .transforms import TRANSFORMS

    for role, source in recipe.sources.items():
        table = recipe.table_for(role)
        if table not in recipe.remap:
            raise RecipeError(f"{_locate(where, ('sources', role), path)}: sources.{role}: no remap table '{table}'")
    for table, rules in recipe.remap.items():
        if not rules:
            raise RecipeError(f"{_locate(where, ('remap', table), path)}: remap.{table}: empty rule list")
        for i, rule in enumerate(rules):
            for t in rule.transforms:
                if t not in TRANSFORMS:
                    known = ", ".join(sorted(TRANSFORMS))
                    raise RecipeError(
                        f"{_locate(where, ('remap', table, i, 'transforms'), path)}: remap.{table}[{i}].transforms: "
                        f"unknown transform '{t}' (known: {known})"
                    )


def recipe_line(recipe: Recipe, *key: Any) -> str:
    """'file:line' of a key path in a loaded recipe (best effort, for plan-time errors)."""
    where: dict = {}
    for f in recipe.recipe_files:
        _, lines = _read_yaml(Path(f))
        where.update({k: (Path(f), v) for k, v in lines.items()})
    return _locate(where, key, Path(recipe.recipe_file))
