"""Recipe schema, loading with file:line errors (the bounded YAML reader is recipe_yaml.py), and
`extends` merging.

A recipe is YAML validated into frozen pydantic models (unknown keys are errors).
`extends: NAME` merges a base recipe: mappings merge key by key, a child's list or
scalar replaces the parent's. Every error names the file, the line and the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .quant_modes import rule_problems
from .recipe_yaml import read_yaml
from .regex_risk import backtracking_risk
from .recipe_sections import VERIFY_STEP, Card, ConfigEdits, Frozen, TiedEmbeddings, VerifyStep  # noqa: F401
from .verify_params import PARAMS

USER_RECIPES = "recipes"   # ./recipes/NAME.yaml under the working directory is looked at first
# The transforms a rule may name. The schema only needs the names (so validating a recipe loads
# no mlx); plan/transforms.py implements exactly these and checks that it does.
TRANSFORM_NAMES = ("norm_shift", "norm_unshift", "conv1d_layout")




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


Regex = Annotated[str, AfterValidator(_check_regex)]


class SplitSpec(Frozen):
    """One source tensor -> len(to) outputs: equal consecutive parts along `axis` (not the last)."""

    axis: int
    to: tuple[str, ...] = Field(min_length=2)


class StackSpec(Frozen):
    """Numbered source tensors -> one output on a new leading axis, in index order (0, 1, ...).

    `index`: the match group holding the number; `count`: dotted key of the body's config.json
    giving how many there must be (e.g. text_config.num_experts)."""

    to: str
    index: int = Field(1, ge=1)
    count: str


class RemapRule(Frozen):
    """Maps (full-match regex, `\\1` groups in `to`), drops, splits or stacks source tensors."""

    name: str
    match: Regex
    to: Optional[str] = None
    drop: bool = False
    split: Optional[SplitSpec] = None
    stack: Optional[StackSpec] = None
    leading_dim: Optional[str] = Field(None, description="dotted key of the body's config.json that the output's "
                                                         "leading axis must equal (e.g. text_config.num_experts)")
    optional: bool = False
    transforms: tuple[str, ...] = ()
    dtype: Optional[Literal["bfloat16", "float16", "float32", "source"]] = None

    @model_validator(mode="after")
    def _to_or_drop(self):
        kinds = [k for k, v in (("to", self.to is not None), ("drop", self.drop), ("split", self.split),
                                ("stack", self.stack)) if v]
        if len(kinds) != 1:
            raise ValueError(f"rule '{self.name}' needs exactly one of 'to', 'drop: true', 'split' or 'stack'")
        if self.drop and (self.transforms or self.dtype):
            raise ValueError(f"rule '{self.name}' drops tensors, so it cannot have transforms or dtype")
        if (self.split or self.stack) and self.transforms:
            raise ValueError(f"rule '{self.name}' splits or stacks tensors, so it cannot have transforms")
        return self


QuantMode = Literal["affine", "mxfp4", "nvfp4", "mxfp8"]   # allowed bits/group sizes: quant_modes.py


class QuantParams(Frozen):
    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    group_size: Literal[16, 32, 64, 128] = 64
    mode: QuantMode = "affine"


Fraction = tuple[int, int]   # [a, b] stands for a * n // b, n = the body's num_hidden_layers


class LayerSelect(Frozen):
    """Layer indices i (captured by the rule's `(?P<layer>...)` group) the rule applies to: any
    clause given selects (i < below, i >= at_least, (i - counted_from) % every == remainder)."""

    below: Optional[Fraction] = None
    at_least: Optional[Fraction] = None
    every: Optional[int] = Field(None, gt=0)
    remainder: int = 0
    counted_from: Fraction = (0, 1)

    def selects(self, i: int, n: int) -> bool:
        def at(f: Fraction) -> int:
            return f[0] * n // f[1]
        return ((self.below is not None and i < at(self.below))
                or (self.at_least is not None and i >= at(self.at_least))
                or (self.every is not None and (i - at(self.counted_from)) % self.every == self.remainder))


class QuantRule(Frozen):
    """Quantization for the quantizable modules (2-D `.weight`) whose module path full-matches."""

    name: str
    match: Regex
    quantize: bool = True
    bits: Optional[Literal[2, 3, 4, 5, 6, 8]] = None
    group_size: Optional[Literal[16, 32, 64, 128]] = None
    mode: Optional[QuantMode] = None
    layers: Optional[LayerSelect] = None
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
    card: Card = Card()
    tied_embeddings: Optional[TiedEmbeddings] = None
    # Not part of the user's YAML: filled in by the loader.
    recipe_file: str = ""
    recipe_files: tuple[str, ...] = ()

    def table_for(self, role: str) -> str:
        return self.sources[role].table or role

    def output_dir(self) -> Path:
        if self.output.dir:
            return Path(self.output.dir)
        return Path("build") / self.name


def _merge(parent: Any, child: Any) -> Any:
    if isinstance(parent, dict) and isinstance(child, dict):
        merged = dict(parent)
        for k, v in child.items():
            merged[k] = _merge(parent[k], v) if k in parent else v
        return merged
    return child


def packaged_recipes() -> Path:
    """The recipes shipped inside the package (forgekit/recipes/, with the demo's fixture).
    A plain directory on disk: recipes name files relative to themselves, so a zipped install
    is not supported."""
    from importlib.resources import files

    return Path(str(files("forgekit") / "recipes"))


def find_recipe(ref: str, relative_to: Optional[Path] = None) -> Path:
    """A recipe name (`qwythos-9b`) or a path (`x/y.yaml`) → the recipe file.

    Only recipes are named: a bare name, or a path ending in .yaml/.yml. Anything else
    (`/etc/shadow`) is refused before it is opened, so no line of a foreign file is echoed."""
    is_path = ref.endswith((".yaml", ".yml")) or os.sep in ref or (os.altsep or os.sep) in ref
    if not ref or "\0" in ref or (is_path and not ref.endswith((".yaml", ".yml"))):
        raise RecipeError(f"{ref!r} is not a recipe: give a recipe name or a path ending in .yaml or .yml")
    if is_path:
        candidates = [Path(ref)] if relative_to is None else [relative_to / ref, Path(ref)]
        if not Path(ref).is_absolute():   # a shipped snippet: `extends: quant/mixed_4_6.yaml`
            candidates.append(packaged_recipes() / ref)
    else:
        dirs = [d for d in (relative_to, Path.cwd() / USER_RECIPES, packaged_recipes()) if d is not None]
        candidates = [d / f"{ref}.yaml" for d in dirs]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise RecipeError(f"recipe '{ref}' not found (looked at {', '.join(str(c) for c in candidates)})")


def _load_chain(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[tuple, tuple[Path, int]], tuple[Path, ...]]:
    if path in seen:
        cycle = " -> ".join(p.name for p in seen + (path,))
        raise RecipeError(f"{seen[-1]}: 'extends' forms a cycle: {cycle}")
    data, lines = read_yaml(path)
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
        loc = _untagged(tuple(err["loc"]))
        key = _key_text(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):   # a verify step's `step`
            loc, key = loc + ("step",), _key_text(loc + ("step",))
            msg = (f"unknown step {err['ctx']['tag']!r}" if err["type"] == "union_tag_invalid" else "missing") + \
                f" (one of: {', '.join(PARAMS)})"
        rule = _rule_name(data, loc)
        if rule and loc[-1] == "match" and msg.startswith("regular expression"):
            msg = f"rule '{rule}': {msg}"
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise RecipeError(f"{_locate(where, loc, path)}: {key}: {msg}{more}") from None
    _check_tables(recipe, where, path)
    _check_quantization(recipe, where, path)
    return recipe


def _untagged(loc: tuple) -> tuple:
    """pydantic puts the union tag in a verify step's location (verify, 0, 'mtp', params, ...): drop it."""
    if len(loc) > 2 and loc[0] == "verify" and isinstance(loc[1], int) and loc[2] in PARAMS:
        return loc[:2] + loc[3:]
    return loc


def _key_text(loc: tuple) -> str:
    """`verify[1].params.min_agreement` for verify steps, dotted paths elsewhere."""
    if len(loc) > 1 and loc[0] == "verify" and isinstance(loc[1], int):
        return f"verify[{loc[1]}]" + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in loc[2:])
    return ".".join(str(p) for p in loc) or "(top level)"


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
    for role, source in recipe.sources.items():
        table = recipe.table_for(role)
        if table not in recipe.remap:
            raise RecipeError(f"{_locate(where, ('sources', role), path)}: sources.{role}: no remap table '{table}'")
    for table, rules in recipe.remap.items():
        if not rules:
            raise RecipeError(f"{_locate(where, ('remap', table), path)}: remap.{table}: empty rule list")
        for i, rule in enumerate(rules):
            for t in rule.transforms:
                if t not in TRANSFORM_NAMES:
                    known = ", ".join(sorted(TRANSFORM_NAMES))
                    raise RecipeError(
                        f"{_locate(where, ('remap', table, i, 'transforms'), path)}: remap.{table}[{i}].transforms: "
                        f"unknown transform '{t}' (known: {known})"
                    )


def _check_quantization(recipe: Recipe, where: dict, path: Path) -> None:
    """A bits/group size/mode combination mlx refuses is a validate-time error naming the rule."""
    problems = rule_problems(recipe.quantization)
    if problems:
        index, message = problems[0]
        loc = ("quantization", "default") if index is None else ("quantization", "rules", index)
        raise RecipeError(f"{_locate(where, loc, path)}: {message}")


def recipe_line(recipe: Recipe, *key: Any) -> str:
    """'file:line' of a key path in a loaded recipe (best effort, for plan-time errors)."""
    where: dict = {}
    for f in recipe.recipe_files:
        _, lines = read_yaml(Path(f))
        where.update({k: (Path(f), v) for k, v in lines.items()})
    return _locate(where, key, Path(recipe.recipe_file))
