"""The interface every tensor source offers: keys(), info(key), read(key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

# Longest tensor name a source may hold: recipe regexes run over names, so their cost stays bounded.
MAX_NAME = 512


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str          # forgekit dtype name: bfloat16, float16, float32, ... (after any dequantization)
    nbytes: int         # bytes stored in the source file
    file: str           # the file holding it
    stored_as: str = "" # e.g. the GGML type for GGUF tensors ("BF16", "Q8_0")


@dataclass
class TensorSource:
    """Base class. Subclasses fill `tensors` and implement `read`."""

    role: str
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    config: dict | None = None           # config.json of a model directory, if any
    metadata: dict = field(default_factory=dict)  # GGUF key/values, hub revision, ...
    root: Path | None = None             # directory holding config/tokenizer files

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def read(self, key: str, rows: slice | None = None) -> mx.array:
        raise NotImplementedError

    def location(self, key: str) -> tuple[str, int, str] | None:
        """(file, absolute byte offset, storage type) of a tensor stored contiguously, for
        readers that pread bytes directly; None when only `read` can produce it."""
        return None
