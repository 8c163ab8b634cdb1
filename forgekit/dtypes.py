"""The one dtype table: forgekit's names with their safetensors code, GGUF (GGML) type name,
numpy storage type and item size. mlx dtypes are looked up by name on use, so importing this
module loads no mlx (the recipe schema uses it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str                 # forgekit / mlx name: bfloat16, float16, ...
    st_code: str              # safetensors header code
    ggml: str | None          # GGUF tensor type name for the exactly stored float types
    storage: type             # numpy dtype of the stored bytes (bfloat16 has none: its raw uint16)
    exponent_mask: int | None = None   # float storage: all exponent bits set means NaN/inf

    @property
    def itemsize(self) -> int:
        return np.dtype(self.storage).itemsize

    @property
    def is_float(self) -> bool:
        return self.exponent_mask is not None

    def mlx(self):
        """The mlx dtype of this name (imports mlx)."""
        import mlx.core as mx

        return getattr(mx, self.name)

    def mlx_storage(self):
        """The mlx dtype the stored bytes are viewed as before `mlx()` (uint16 for bfloat16)."""
        import mlx.core as mx

        return getattr(mx, np.dtype(self.storage).name)


TABLE: tuple[DType, ...] = (
    DType("bfloat16", "BF16", "BF16", np.uint16, 0x7F80),
    DType("float16", "F16", "F16", np.float16, 0x7C00),
    DType("float32", "F32", "F32", np.float32, 0x7F800000),
    DType("float64", "F64", None, np.float64, 0x7FF0000000000000),
    DType("int64", "I64", None, np.int64),
    DType("int32", "I32", None, np.int32),
    DType("int16", "I16", None, np.int16),
    DType("int8", "I8", None, np.int8),
    DType("uint32", "U32", None, np.uint32),
    DType("uint8", "U8", None, np.uint8),
    DType("bool", "BOOL", None, np.bool_),
)
BY_NAME = {d.name: d for d in TABLE}
BY_ST_CODE = {d.st_code: d for d in TABLE}
BY_GGML = {d.ggml: d for d in TABLE if d.ggml}
FLOAT_OUTPUTS = ("bfloat16", "float16", "float32")   # what a recipe may write before quantization


def itemsize(name: str) -> int:
    return BY_NAME[name].itemsize
