"""A GGUF split into parts by llama.cpp's gguf-split (`NAME-0000k-of-0000N.gguf`): every part is
a GGUF file; the first holds the model's key/values; tensors are spread over the parts. Opened as
one source, with each tensor read from the part that holds it. Every part must be present:
a missing one is named, never skipped (its tensors would just look absent)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SourceError
from .base import TensorSource
from .gguf_file import GGUFSource

SPLIT_NAME = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


def split_parts(path: Path) -> list[Path] | None:
    """All part paths of the split GGUF `path` belongs to (None: not a split name)."""
    m = SPLIT_NAME.fullmatch(path.name)
    if m is None:
        return None
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if count < 1 or missing:
        raise SourceError(f"{path}: split GGUF part {missing[0] if missing else '?'} of {count} is missing; "
                          f"download every part of {m['stem']} into {path.parent}")
    return parts


class SplitGGUFSource(GGUFSource):
    """The parts as one GGUF source (metadata from part 1, placeholders and mtp_block as GGUFSource)."""

    def __init__(self, role: str, parts: list[Path]):
        self.parts = [GGUFSource(role, p) for p in parts]
        TensorSource.__init__(self, role=role, files=list(parts), root=None)
        self.metadata = {k: v for k, v in self.parts[0].metadata.items() if not k.startswith("split.")}
        self._owner: dict[str, GGUFSource] = {}
        for number, part in enumerate(self.parts, 1):
            declared = part.metadata.get("split.no")
            if declared is not None and declared != number - 1:
                raise SourceError(f"{part.files[0]}: says it is split part {declared + 1}, its name says {number}")
            for name, info in part.tensors.items():
                if name in self._owner:
                    raise SourceError(f"{part.files[0]}: tensor '{name}' is also in {self._owner[name].files[0]}")
                self.tensors[name] = info
                self._owner[name] = part

    def location(self, key: str) -> tuple[str, int, str]:
        return self._owner[key].location(key)

    def read(self, key: str, rows: slice | None = None):
        return self._owner[key].read(key, rows)
