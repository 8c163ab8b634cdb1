"""Safetensors sources: one file, or a directory (sharded with an index, or single file).

The header is parsed here (not by a library) so that lies in it are caught with
the file and tensor named, and tensors are read one at a time from a memory map.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from ..dtypes import BY_ST_CODE
from ..errors import SourceError
from .base import TensorInfo, TensorSource

MAX_HEADER = 100 * 2**20


def read_header(path: Path) -> tuple[dict, int]:
    """Return (tensor entries, data start offset) after checking every offset against the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SourceError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise SourceError(f"{path}: safetensors header length {header_len} does not fit in the {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: safetensors header is not a JSON object")
    start = 8 + header_len
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: tensor '{name}': malformed header entry") from None
        if dtype not in BY_ST_CODE:
            raise SourceError(f"{path}: tensor '{name}': unsupported dtype {dtype}")
        itemsize = BY_ST_CODE[dtype].itemsize
        expected = int(np.prod(shape, dtype=np.int64)) * itemsize
        if not (0 <= lo <= hi) or hi - lo != expected:
            raise SourceError(
                f"{path}: tensor '{name}': {dtype}{list(shape)} needs {expected} bytes but the header gives {hi - lo}"
            )
        if start + hi > size:
            raise SourceError(f"{path}: tensor '{name}': data ends at byte {start + hi}, past the end of the file ({size} bytes; truncated?)")
        spans.append((lo, hi, name))
    spans.sort()
    for (lo1, hi1, n1), (lo2, _, n2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise SourceError(f"{path}: tensors '{n1}' and '{n2}' overlap in the data section")
    return header, start


class SafetensorsSource(TensorSource):
    kind = "safetensors"

    def __init__(self, role: str, path: Path, only_files: list[str] | None = None, unread: list[str] = ()):
        """`only_files`/`unread`: a partial download; `unread` tensors are known by name only."""
        path = Path(path)
        if path.is_dir():
            files = [path / f for f in only_files] if only_files is not None else weight_files(path)
            root = path
        elif path.is_file():
            files, root = [path], path.parent
        else:
            raise SourceError(f"{path}: source does not exist")
        super().__init__(role=role, files=files, root=root, unread=list(unread))
        self._where: dict[str, tuple[Path, int, str, tuple]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for file in files:
            header, start = read_header(file)
            for name, e in header.items():
                if name in self.tensors:
                    raise SourceError(f"{file}: tensor '{name}' also appears in {self.tensors[name].file}")
                dtype = BY_ST_CODE[e["dtype"]].name
                lo, hi = e["data_offsets"]
                self.tensors[name] = TensorInfo(name, tuple(e["shape"]), dtype, hi - lo, str(file), e["dtype"])
                self._where[name] = (file, start + lo, e["dtype"], tuple(e["shape"]))
        cfg = root / "config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text())
            except json.JSONDecodeError as exc:
                raise SourceError(f"{cfg}: not valid JSON ({exc})") from None

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as f:
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[file]

    def location(self, key: str) -> tuple[str, int, str]:
        file, offset, code, _ = self._where[key]
        return str(file), offset, code

    def read(self, key: str, rows: slice | None = None):
        import mlx.core as mx

        file, offset, code, shape = self._where[key]
        dt = BY_ST_CODE[code]
        count = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(self._map(file), dtype=dt.storage, count=count, offset=offset).reshape(shape)
        if rows is not None:
            arr = arr[rows]
        out = mx.array(np.ascontiguousarray(arr))
        return out.view(dt.mlx()) if dt.name == "bfloat16" else out


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: from its index if it has one."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SourceError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise SourceError(f"{index}: lists shard '{missing[0]}' which is not in {directory}")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{directory}: no *.safetensors files")
    return files
