"""doit entry point: `doit build recipe=NAME|PATH.yaml` (default: the tiny demo).

Thin on purpose: the task graph is made by forgekit.doit from the recipe's plan.
"""

from doit import get_var

from forgekit.doit import doit_config, recipe_tasks

RECIPE = get_var("recipe", "tiny-demo")
LOCKED = get_var("locked", "0") not in ("0", "", "false", "no")  # locked=1: refuse if sources moved (lock.py)
DOIT_CONFIG = doit_config(RECIPE)  # doit state: one sqlite file per output dir, under cache/state/


def task_build():
    """Build the recipe's MLX model directory (recipe=NAME|PATH [locked=1])."""
    yield from recipe_tasks(RECIPE, locked=LOCKED)
