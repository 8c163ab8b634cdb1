"""mlx-lm's model files without mlx-lm's package start-up.

Importing any `mlx_lm.models.X` first runs `mlx_lm/__init__.py`, which imports mlx-lm's convert,
generate and utils modules and through them transformers: about 0.6 s of CPU in every `doit build`,
more than half of what a no-op build costs, although planning needs only the model files (the
shapes of mlx-lm's model classes, plan/shapes.py, and the head's layer class, mtp_head.py).
So until mlx_lm itself is imported (a verify step that loads a model does), the model files are
imported from mlx-lm's installed `models` directory as a package of their own; from then on
mlx-lm's own modules are used. Same files, same classes' code: tests/test_noop_cost.py proves a
plan imports neither mlx_lm nor transformers, and that both routes give the same model files and
parameter shapes for every model type a shipped base recipe writes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

OWN_PACKAGE = "_forgekit_mlx_lm_models"
# Output model types whose mlx-lm model file is the one named after them (mlx_lm.utils remaps
# some other types to other files; tests/test_noop_cost.py checks these against mlx-lm's choice).
UNMAPPED = ("qwen3_5", "qwen3_5_moe")


def _own_package() -> types.ModuleType:
    package = sys.modules.get(OWN_PACKAGE)
    if package is None:
        spec = importlib.util.find_spec("mlx_lm")
        package = types.ModuleType(OWN_PACKAGE)
        package.__path__ = [str(Path(spec.origin).parent / "models")]
        sys.modules[OWN_PACKAGE] = package
    return package


def own_module(name: str) -> types.ModuleType:
    """mlx-lm's model file `name` loaded as part of forgekit's own copy of the models package."""
    _own_package()
    return importlib.import_module(f"{OWN_PACKAGE}.{name}")


def models_module(name: str) -> types.ModuleType:
    """mlx-lm's `mlx_lm.models.<name>` once mlx_lm is imported, else the same file from own_module."""
    if "mlx_lm" not in sys.modules:
        try:
            return own_module(name)
        except ImportError:
            pass   # a model file that reaches outside mlx_lm.models: import mlx-lm itself
    return importlib.import_module(f"mlx_lm.models.{name}")


def model_classes(config: dict):
    """(Model, ModelArgs) of mlx-lm for an output config, as mlx_lm.utils._get_classes picks them;
    raises ValueError for a model type mlx-lm has no model for."""
    if "mlx_lm" not in sys.modules and config.get("model_type") in UNMAPPED:
        try:
            module = own_module(config["model_type"])
            return module.Model, module.ModelArgs
        except ImportError:
            pass   # a model file that reaches outside mlx_lm.models: mlx-lm's own route below
    from mlx_lm.utils import _get_classes

    return _get_classes(config)
