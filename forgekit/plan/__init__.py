"""Planning: the recipe's tables applied to the sources' headers. Pure and frozen; reads no tensor bytes."""

from .layout import bound_bytes, layout_group
from .plan import BuildPlan, make_plan
from .tensor import TensorPlan

__all__ = ["BuildPlan", "TensorPlan", "make_plan", "bound_bytes", "layout_group"]
