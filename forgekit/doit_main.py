"""`forgekit build RECIPE [doit options]`: the task graph of dodo.py, run through doit's own API.

The namespace handed to doit is the one dodo.py builds (DOIT_CONFIG + task_build over
forgekit.doit.recipe_tasks), so task names, the state file and the up-to-date rules are the
same: a `doit build recipe=X` in a checkout and a `forgekit build X` see each other's work.
"""

from __future__ import annotations

from .doit import doit_config, recipe_tasks

DOIT_COMMANDS = ("run", "list", "clean", "forget", "info", "ignore", "dumpdb", "strace")


def doit_namespace(recipe_ref: str, locked: bool = False) -> dict:
    """What dodo.py defines, for one recipe."""

    def task_build():
        """Build the recipe's MLX model directory."""
        yield from recipe_tasks(recipe_ref, locked=locked)

    return {"DOIT_CONFIG": doit_config(recipe_ref), "task_build": task_build}


def run_build(recipe_ref: str, doit_args: list[str], locked: bool = False) -> int:
    """Run doit on the recipe's tasks; `doit_args` are doit's own (`-n 2`, `list --all`, `clean`...).
    Returns doit's exit code (0 done, 1 a task failed, 2/3 doit errors)."""
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    loader = ModuleTaskLoader(doit_namespace(recipe_ref, locked))
    return DoitMain(loader, config_filenames=()).run(list(doit_args))
