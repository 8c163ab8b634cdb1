"""User mistakes in recipes: one clear sentence naming file (and line) and key, exit 2,
no output directory that looks complete."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import BODY, DEMO_RECIPE, HEAD_GGUF, run_doit, write_recipe

BASE = DEMO_RECIPE.parent / "qwen3.5-dense-mtp.yaml"


def _fails_cleanly(tmp_path, text: str, *expected: str):
    recipe = write_recipe(tmp_path, text)
    proc = run_doit(recipe, tmp_path)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for e in expected:
        assert re.search(e, err), f"{e!r} not in: {err}"
    out = tmp_path / "out"
    assert not (out / "mtplx_runtime.json").exists() and not (out / ".forgekit" / "manifest.json").exists()
    return err


def _recipe(body: str = f"{{path: {BODY}}}", extra: str = "") -> str:
    return (f"extends: {BASE}\nname: t\nsources:\n  body: {body}\n  mtp: {{path: {HEAD_GGUF}}}\n"
            f"output: {{dir: out}}\n{extra}")


def test_typo_key_names_file_line_and_key(tmp_path):
    text = _recipe().replace("output:", "outptu:")
    _fails_cleanly(tmp_path, text, r"recipe\.yaml:\d+: outptu: unknown key")


def test_nested_typo_key(tmp_path):
    text = _recipe(body=f"{{path: {BODY}, revison: main}}")
    _fails_cleanly(tmp_path, text, r"recipe\.yaml:4: sources\.body\.revison: unknown key")


def test_unknown_transform(tmp_path):
    extra = ("remap:\n  body:\n    - {name: all, match: '.*', to: 'x', transforms: [norm_shfit]}\n")
    _fails_cleanly(tmp_path, _recipe(extra=extra), r"recipe\.yaml:\d+: remap\.body\[0\]\.transforms: unknown transform 'norm_shfit'")


def _base_variant(edit_body_rules) -> str:
    """The base recipe as a standalone recipe with an edited body table (lists replace, so copy it)."""
    data = yaml.safe_load(BASE.read_text())
    data["name"] = "t"
    data["remap"]["body"] = edit_body_rules(data["remap"]["body"])
    data["sources"] = {"body": {"path": str(BODY)}, "mtp": {"path": str(HEAD_GGUF)}}
    data["output"] = {**data.get("output", {}), "dir": "out"}
    return yaml.safe_dump(data, sort_keys=False)


def test_rule_that_matches_nothing(tmp_path):
    typo = {"name": "typo-rule", "match": r"lm_haed\.weight", "to": "x"}
    text = _base_variant(lambda rules: rules[:-1] + [typo] + rules[-1:])
    _fails_cleanly(tmp_path, text, r"recipe\.yaml:\d+: remap\.body\[\d+\] rule 'typo-rule' matched no tensor")


def test_source_tensor_nobody_maps(tmp_path):
    text = _base_variant(lambda rules: [r for r in rules if r["name"] != "vision-tower"])
    err = _fails_cleanly(tmp_path, text, r"remap\.body: no rule maps or drops \d+ tensor\(s\) of source 'body'",
                         r"model\.visual\.")
    assert len(err.splitlines()) == 1


def test_missing_source(tmp_path):
    _fails_cleanly(tmp_path, _recipe(body=f"{{path: {tmp_path / 'nope'}}}"), r"nope: source 'body' does not exist")


@pytest.mark.parametrize("text,expected", [
    ("name: [unclosed", r"recipe\.yaml:\d+: "),
    ("name: a\nname: b\n", r"recipe\.yaml:2: duplicate key 'name'"),
    ("name: !!python/object/apply:os.system ['true']\n", r"recipe\.yaml:1: YAML tags are not allowed"),
    ("extends: no-such-base\nname: x\n", r"recipe\.yaml:1: extends: recipe 'no-such-base' not found"),
    ("name: x\ndtype: float8\n", r"recipe\.yaml:2: dtype: "),
])
def test_malformed_recipes(tmp_path, text, expected):
    _fails_cleanly(tmp_path, text, expected)
