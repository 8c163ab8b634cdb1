"""One output tensor of a plan: where it comes from, what is done to it, where it goes."""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import itemsize
from ..recipe import QuantParams
from .quant import quantized_outputs


@dataclass(frozen=True)
class Segment:
    """Rows [r0, r1) of a source tensor viewed as 2-D [prod(shape[:-1]), shape[-1]] (plan/combine.py)."""

    source_key: str
    source_file: str
    rows: tuple[int, int]


@dataclass(frozen=True)
class TensorPlan:
    key: str                      # output tensor name (for quantized: the `.weight`)
    role: str                     # source role
    source_key: str
    source_file: str
    source_dtype: str
    stored_as: str
    rule: str                     # remap rule name
    transforms: tuple[str, ...]
    dtype: str                    # float dtype written (before quantization)
    shape: tuple[int, ...]        # after transforms
    quant: QuantParams | None
    quant_rule: str
    file: str = ""                # output file name, filled by layout
    segments: tuple[Segment, ...] = ()  # split/stack outputs: its source rows, in output order; () = 1:1

    def source_files(self) -> set[str]:
        """Every file this output reads."""
        return {self.source_file} | {s.source_file for s in self.segments}

    def source_names(self) -> list[str]:
        """Every source tensor this output reads, in order."""
        if not self.segments:
            return [self.source_key]
        return list(dict.fromkeys(s.source_key for s in self.segments))

    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor this entry writes."""
        if self.quant is None:
            return [(self.key, self.dtype, self.shape)]
        base = self.key[: -len("weight")]
        return [(base + suffix, dtype, shape)
                for suffix, (dtype, shape) in quantized_outputs(self.shape, self.quant, self.dtype).items()]

    def nbytes(self) -> int:
        total = 0
        for _, dtype, shape in self.outputs():
            n = itemsize(dtype)
            for d in shape:
                n *= d
            total += n
        return total
