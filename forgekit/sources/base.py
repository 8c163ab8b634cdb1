"""The interface every tensor source offers. Every field is declared here; nothing is
attached to a source from outside, and code outside `sources/` never asks which kind a
source is (it asks the source: `placeholders()`, `location()`, `kind`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    """Base class. Subclasses fill `tensors` while they are constructed and implement `read`."""

    role: str
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    config: dict | None = None           # config.json of a model directory, if any
    metadata: dict = field(default_factory=dict)  # GGUF key/values, hub revision, ...
    root: Path | None = None             # directory holding config/tokenizer files
    unread: list[str] = field(default_factory=list)  # tensors known by name only (not downloaded): still planned for
    remote: dict | None = None           # what a byte-range fetch cost (remote GGUF), for `forgekit plan`

    kind = "tensors"                     # "safetensors" or "gguf": for reports and norm conventions

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def read(self, key: str, rows: slice | None = None):
        """The tensor (or rows of dim 0) as an mlx array in its source dtype (dequantized if stored quantized)."""
        raise NotImplementedError

    def location(self, key: str) -> tuple[str, int, str] | None:
        """(file, absolute byte offset, storage) of a tensor stored contiguously, for readers that
        pread bytes directly; storage is a safetensors dtype code or `GGML:<type>` for GGUF block
        types. None when only `read` can produce it."""
        return None

    def placeholders(self) -> dict[str, str]:
        """Values for `{name}` placeholders in remap patterns (e.g. a GGUF's `mtp_block`)."""
        return {}
