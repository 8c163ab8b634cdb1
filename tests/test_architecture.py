"""The package's shape: imports run one way, the environment is read in one module, the recipe
schema loads without mlx, and only a real change to the output-deciding code re-runs a build's
verification (a comment does not)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_RECIPE, ROOT, ran_tasks, run_doit, write_recipe

PACKAGE = ROOT / "forgekit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """forgekit modules `name` imports, anywhere in the file (a deferred import is still an edge)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_forgekit_modules():
    graph = import_graph()
    assert len(graph) > 30 and "forgekit.verify" in graph["forgekit.build.publish"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_rooms_import_one_way():
    """verify imports neither build nor the doit glue; sources import nothing from plan/build;
    nothing below the glue imports it or the CLI."""
    graph = import_graph()
    rules = {"forgekit.verify": ("forgekit.build", "forgekit.doit", "forgekit.cli"),
             "forgekit.sources": ("forgekit.plan", "forgekit.build", "forgekit.verify", "forgekit.doit"),
             "forgekit.plan": ("forgekit.build", "forgekit.verify", "forgekit.doit"),
             "forgekit.build": ("forgekit.doit", "forgekit.cli"),
             "forgekit.recipe": ("forgekit.plan", "forgekit.sources", "forgekit.build")}
    wrong = [f"{m} imports {t}" for m, targets in graph.items() for room, banned in rules.items()
             if m == room or m.startswith(room + ".") for t in targets if t.startswith(banned)]
    assert wrong == []


def test_rooms_are_small():
    """No module over ~400 lines; no function over 60 lines unless its docstring says why."""
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 420:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                doc = ast.get_docstring(node) or ""
                if "long on purpose" not in doc and "over 60 lines" not in doc:
                    too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []


def test_environment_is_read_only_in_settings():
    readers = []
    for name, path in _modules().items():
        if name == "forgekit.settings":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                readers.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                    {a.name for a in node.names} & {"environ", "getenv", "environb"}:
                readers.append(f"{name}:{node.lineno}")
    assert readers == []


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    recipe = write_recipe(tmp_path, f"extends: {DEMO_RECIPE}\nname: b\noutput: {{dir: {tmp_path / 'out'}}}\n")
    for name, value, words in (("FORGEKIT_JOBS", "many", "must be a number, got 'many'"),
                               ("FORGEKIT_JOBS", "0", "must be at least 1, got '0'"),
                               ("FORGEKIT_COPY_OUTPUTS", "yes", "must be 0 or 1, got 'yes'")):
        proc = run_doit(recipe, tmp_path, env={name: value})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr == f"forgekit: environment variable {name} {words}\n"
        assert not (tmp_path / "out").exists()


def test_recipe_schema_loads_without_mlx():
    code = ("import sys\nfrom forgekit.recipe import load_recipe\n"
            f"r = load_recipe({str(DEMO_RECIPE)!r})\n"
            "print(r.name, sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tiny-demo []"


def test_verify_plans_without_hashing_sources(tmp_path, built_demo):
    """`forgekit verify DIR` needs no keys: it memoises (hashes) nothing into the cache."""
    recipe = write_recipe(tmp_path, f"extends: {DEMO_RECIPE}\nname: v\noutput: {{dir: {built_demo}}}\n"
                                    "verify:\n  - step: structural\n    params: {head_dtype: BF16}\n")
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "forgekit.cli", "verify", str(built_demo), "--recipe", str(recipe)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "FORGEKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "structural" in proc.stdout
    assert not (cache / "stat-memo.sqlite3").exists()


# ---------------------------------------------------------------- code digest


def _build(pkg: Path, recipe: Path, work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FORGEKIT_CACHE": str(work / "cache"), "PYTHONPATH": str(pkg)}
    cmd = [sys.executable, "-m", "doit", "-f", str(pkg / "dodo.py"), "-d", str(work), "build", f"recipe={recipe}"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_comment_edit_to_a_verify_module_rebuilds_nothing_but_a_real_change_reverifies(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(PACKAGE, pkg / "forgekit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dodo.py", pkg / "dodo.py")
    recipe = write_recipe(tmp_path, f"extends: {DEMO_RECIPE}\nname: c\noutput: {{dir: {tmp_path / 'out'}}}\n"
                                    "verify:\n  - step: structural\n    params: {head_dtype: BF16}\n")
    first = _build(pkg, recipe, tmp_path)
    assert "build:publish" in ran_tasks(first)
    step = pkg / "forgekit" / "verify" / "structural.py"
    text = step.read_text()
    step.write_text("# a comment added at the top\n" + text.replace("\n\n\n", "\n\n\n\n", 1) + "\n# and one at the end\n")
    assert ran_tasks(_build(pkg, recipe, tmp_path)) == []
    step.write_text(step.read_text() + "\nDIGEST_PROBE = 1\n")   # a real (if harmless) change
    third = ran_tasks(_build(pkg, recipe, tmp_path))
    assert "build:publish" in third and "build:verify:0:structural" in third
    assert not any(t.startswith("build:shard:") for t in third)
    manifest = json.loads((tmp_path / "out" / ".forgekit" / "manifest.json").read_text())
    assert manifest["recipe"] == "c"
