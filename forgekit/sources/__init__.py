"""Tensor sources behind one small interface (see `base.TensorSource`)."""

from .base import TensorInfo, TensorSource
from .open import open_source

__all__ = ["TensorInfo", "TensorSource", "open_source"]
