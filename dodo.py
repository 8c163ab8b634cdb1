"""doit entry point: `doit build recipe=NAME|PATH.yaml` (default: the tiny demo).

Thin on purpose: the task graph is made by forgekit.tasks from the recipe's plan.
"""

from doit import get_var

from forgekit.dodo_support import DOIT_CONFIG, recipe_tasks

RECIPE = get_var("recipe", "tiny-demo")


def task_build():
    """Build the recipe's MLX model directory (recipe=NAME|PATH)."""
    yield from recipe_tasks(RECIPE)
