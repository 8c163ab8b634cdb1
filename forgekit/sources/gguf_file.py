"""GGUF source via gguf-py's memory-mapped reader.

BF16/F16/F32 tensors are read exactly; quantized types (Q8_0, K-quants, ...) are
dequantized with `gguf.quants` and flagged in `TensorInfo.stored_as`, so the
provenance can say "dequantised Q8_0" instead of pretending to be bf16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..dtypes import BY_GGML
from ..errors import SourceError
from .base import MAX_NAME, TensorInfo, TensorSource
from .gguf_header import RangesRefused, parse_header

GGML_PREFIX = "GGML:"   # location() storage of GGUF block-quantized types, dequantized with gguf.quants


def _field_value(field):
    """A GGUF key/value as a plain Python value (str, int, float, bool or list)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]].tolist()[0]


def _check_header(path: Path) -> None:
    """Walk the header with forgekit's own bounded parser before gguf-py reads it: gguf-py
    loops over an array's declared count even past the end of the file (a hang on a doctored
    count), while this walker refuses any count the file's size cannot hold."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def fetch(start: int, end: int) -> bytes:
            f.seek(start)
            return f.read(end - start)

        try:
            parse_header(fetch, size)
        except (SourceError, RangesRefused) as exc:
            raise SourceError(f"{path}: not a readable GGUF file: {exc}") from None


class GGUFSource(TensorSource):
    kind = "gguf"

    def __init__(self, role: str, path: Path, unread: tuple[str, ...] = (), remote: dict | None = None):
        """`unread`/`remote`: a partial copy of a remote GGUF (sources/remote_gguf.py)."""
        import gguf

        path = Path(path)
        if not path.is_file():
            raise SourceError(f"{path}: GGUF source does not exist")
        _check_header(path)
        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as exc:
            raise SourceError(f"{path}: not a readable GGUF file ({exc})") from None
        super().__init__(role=role, files=[path], root=None, unread=list(unread), remote=remote)
        size = path.stat().st_size
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF.") or key.startswith("tokenizer.ggml."):
                continue  # file bookkeeping and the large vocab arrays
            self.metadata[key] = _field_value(field)
        self._tensors = {}
        for t in self.reader.tensors:
            if len(t.name) > MAX_NAME:
                raise SourceError(f"{path}: tensor '{t.name[:80]}...': name longer than {MAX_NAME} characters")
            type_name = t.tensor_type.name
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF ne order -> [out, in]
            if t.data_offset + t.n_bytes > size:
                raise SourceError(f"{path}: tensor '{t.name}' data runs past the end of the file (truncated?)")
            dtype = BY_GGML[type_name].name if type_name in BY_GGML else "float32"
            self.tensors[t.name] = TensorInfo(t.name, shape, dtype, int(t.n_bytes), str(path), type_name)
            self._tensors[t.name] = t

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def mtp_block(self) -> int:
        """Index N of the `blk.N.nextn.*` block: block_count - nextn_predict_layers."""
        arch = self.architecture
        count = self.metadata.get(f"{arch}.block_count")
        nextn = self.metadata.get(f"{arch}.nextn_predict_layers")
        if not isinstance(count, int) or not isinstance(nextn, int) or nextn < 1:
            raise SourceError(
                f"{self.files[0]}: GGUF architecture '{arch}' declares no MTP head "
                f"({arch}.nextn_predict_layers is {nextn!r}, {arch}.block_count is {count!r})"
            )
        return count - nextn

    def placeholders(self) -> dict[str, str]:
        return {"mtp_block": str(self.mtp_block())}

    def location(self, key: str) -> tuple[str, int, str]:
        t = self._tensors[key]
        name = t.tensor_type.name
        storage = BY_GGML[name].st_code if name in BY_GGML else GGML_PREFIX + name
        return str(self.files[0]), int(t.data_offset), storage

    def read(self, key: str, rows: slice | None = None):
        import gguf
        import mlx.core as mx

        t = self._tensors[key]
        shape = self.tensors[key].shape
        type_name = t.tensor_type.name
        if type_name in BY_GGML:
            dt = BY_GGML[type_name]
            arr = np.asarray(t.data).view(dt.storage).reshape(shape)
            if rows is not None:
                arr = arr[rows]
            return mx.array(np.ascontiguousarray(arr)).view(dt.mlx())
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        if rows is not None:
            arr = arr[rows]
        return mx.array(np.ascontiguousarray(arr, dtype=np.float32))
