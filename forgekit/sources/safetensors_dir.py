"""Safetensors sources: one file, or a directory (sharded with an index, or single file).

The header is parsed here (not by a library) so that lies in it are caught with
the file and tensor named, and tensors are read one at a time from a memory map.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from pathlib import Path, PurePosixPath

import numpy as np

from ..dtypes import BY_ST_CODE
from ..errors import SourceError
from .base import MAX_NAME, TensorInfo, TensorSource

MAX_HEADER = 100 * 2**20
MAX_CONFIG = 16 * 2**20


def regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file (symlinks followed); a FIFO, device or directory is
    refused without being opened, so reading it can never block."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SourceError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise SourceError(f"{path}: {what} is not a regular file; refusing to read it")
    return path


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, entry, start: int, size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, lo, hi) of one header entry, every field type-checked before use."""
    where = f"{path}: tensor '{name[:80]}'"
    if len(name) > MAX_NAME:
        raise SourceError(f"{where}...: name longer than {MAX_NAME} characters")
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: malformed header entry (not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise SourceError(f"{where}: dtype must be a string, got {type(dtype).__name__}")
    if dtype not in BY_ST_CODE:
        raise SourceError(f"{where}: unsupported dtype {dtype[:20]}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_int(d) for d in shape):
        raise SourceError(f"{where}: shape must be a list of at most 8 non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets):
        raise SourceError(f"{where}: data_offsets must be two non-negative integers")
    lo, hi = offsets
    itemsize = BY_ST_CODE[dtype].itemsize
    expected = itemsize
    for d in shape:  # Python ints: a product beyond int64 is caught, not wrapped
        expected *= d
    if lo > hi or hi - lo != expected:
        raise SourceError(f"{where}: {dtype}{shape} needs {expected} bytes but the header gives {hi - lo}")
    if start + hi > size:
        raise SourceError(f"{where}: data ends at byte {start + hi}, past the end of the file ({size} bytes; truncated?)")
    return dtype, tuple(shape), lo, hi


def read_header(path: Path) -> tuple[dict, int]:
    """Return (tensor entries, data start offset) after checking every field and offset against the file."""
    size = regular_file(path, "safetensors file").stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SourceError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise SourceError(f"{path}: safetensors header length {header_len} does not fit in the {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise SourceError(f"{path}: safetensors header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: safetensors header is not a JSON object")
    start = 8 + header_len
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        dtype, shape, lo, hi = _entry(path, name, entry, start, size)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [lo, hi]}
        spans.append((lo, hi, name))
    spans.sort()
    for (lo1, hi1, n1), (lo2, _, n2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise SourceError(f"{path}: tensors '{n1}' and '{n2}' overlap in the data section")
    return header, start


def read_config(root: Path) -> dict | None:
    """A model directory's config.json as a JSON object (None when there is none)."""
    cfg = root / "config.json"
    if not os.path.lexists(cfg):
        return None
    regular_file(cfg, "config.json")
    if cfg.stat().st_size > MAX_CONFIG:
        raise SourceError(f"{cfg}: larger than {MAX_CONFIG} bytes; not a model config")
    try:
        config = json.loads(cfg.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SourceError(f"{cfg}: not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{cfg}: must be a JSON object, got {type(config).__name__}")
    if "text_config" in config and not isinstance(config["text_config"], dict):
        raise SourceError(f"{cfg}: 'text_config' must be a JSON object, got {type(config['text_config']).__name__}")
    return config


def read_index(index: Path, where: str) -> dict[str, str]:
    """The weight_map of a safetensors index: tensor name -> shard file name. Shard names must
    be plain relative `*.safetensors` paths that stay inside the model directory."""
    regular_file(index, "safetensors index")
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{where}: not a valid safetensors index (needs a 'weight_map' of tensor -> shard file)")
    for shard in set(weight_map.values()):
        parts = PurePosixPath(shard).parts
        if (not shard.endswith(".safetensors") or shard.startswith("/") or "\\" in shard or "\0" in shard
                or ".." in parts or not parts):
            raise SourceError(f"{where}: shard {shard[:100]!r} is not a *.safetensors file inside the model directory")
    return weight_map


class SafetensorsSource(TensorSource):
    kind = "safetensors"

    def __init__(self, role: str, path: Path, only_files: list[str] | None = None, unread: list[str] = ()):
        """`only_files`/`unread`: a partial download; `unread` tensors are known by name only."""
        path = Path(path)
        if path.is_dir():
            files = [path / f for f in only_files] if only_files is not None else weight_files(path)
            root = path
        elif os.path.lexists(path):
            files, root = [regular_file(path, "safetensors file")], path.parent
        else:
            raise SourceError(f"{path}: source does not exist")
        super().__init__(role=role, files=files, root=root, unread=list(unread))
        self._where: dict[str, tuple[Path, int, str, tuple]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for file in files:
            header, start = read_header(file)
            for name, e in header.items():  # read_header has type-checked every entry
                if name in self.tensors:
                    raise SourceError(f"{file}: tensor '{name}' also appears in {self.tensors[name].file}")
                dtype = BY_ST_CODE[e["dtype"]].name
                lo, hi = e["data_offsets"]
                self.tensors[name] = TensorInfo(name, tuple(e["shape"]), dtype, hi - lo, str(file), e["dtype"])
                self._where[name] = (file, start + lo, e["dtype"], tuple(e["shape"]))
        self.config = read_config(root)

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
    """The weight files of a model directory: from its index if it has one. Only regular
    files: a FIFO named `*.safetensors` is refused, never opened."""
    index = directory / "model.safetensors.index.json"
    if os.path.lexists(index):
        names = sorted(set(read_index(index, str(index)).values()))
        missing = [n for n in names if not os.path.lexists(directory / n)]
        if missing:
            raise SourceError(f"{index}: lists shard '{missing[0]}' which is not in {directory}")
        files = [directory / n for n in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{directory}: no *.safetensors files")
    for f in files:
        regular_file(f, "safetensors file")
    return files
