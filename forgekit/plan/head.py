"""Facts about the MTP head a plan writes (the sidecar entries), said once: whether and how
it is quantized (for config.json, mtplx_runtime.json and the structural step), and which of
its source tensors were dequantized from a GGUF block type.

MTPLX accepts a prequantized dense head in two shapes: every linear quantized, `fc` included
(its policy "all"), or only the seven decoder-layer linears (policy "cyankiwi"); norms stay
float. `config.json`'s `mtplx_mtp_quantization` tells its loader which, and with what bits.
"""

from __future__ import annotations

from ..dtypes import BY_GGML
from .tensor import TensorPlan

ACCEPTANCE_WARNING = ("the MTP head is quantized ({how}): drafts from a quantized head are accepted less "
                      "often than from the bf16 head; keep bf16 unless memory forces it")


def head_entries(tensors: list[TensorPlan], sidecar_files: list[str]) -> list[TensorPlan]:
    return [t for t in tensors if t.file in sidecar_files]


def describe(t: TensorPlan) -> str:
    return f"{t.quant.bits}-bit g{t.quant.group_size} {t.quant.mode}"


def head_quantization(head: list[TensorPlan]) -> dict | None:
    """config.json's `mtplx_mtp_quantization` for a quantized head, None for a float one."""
    quantized = [t for t in head if t.quant is not None]
    if not quantized:
        return None
    q = quantized[0].quant
    fc = any(t.key == "mtp.fc.weight" for t in quantized)
    return {"prequantized": True, "policy": "all" if fc else "cyankiwi", "bits": q.bits,
            "group_size": q.group_size, "mode": q.mode, "quantized_modules": len(quantized)}


def mixed_head_params(head: list[TensorPlan]) -> str | None:
    """MTPLX quantizes the head with one (bits, group size, mode): a head mixing them cannot load."""
    kinds = sorted({describe(t) for t in head if t.quant is not None})
    return None if len(kinds) <= 1 else ", ".join(kinds)


def sidecar_format(head: list[TensorPlan]) -> str:
    """The head's storage, in MTPLX's words: bf16, fp16, f32 or prequantized-mlx-<mode>-<bits>bit-g<group>."""
    q = head_quantization(head)
    if q:
        return f"prequantized-mlx-{q['mode']}-{q['bits']}bit-g{q['group_size']}"
    dtypes = sorted({t.dtype for t in head})
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "f32"}.get(dtypes[0], dtypes[0]) if len(dtypes) == 1 \
        else "+".join(dtypes)


def dequantized_types(tensors: list[TensorPlan]) -> list[str]:
    """GGUF block types (Q8_0, Q4_K...) some planned tensors are dequantized from."""
    return sorted({t.stored_as for t in tensors if t.stored_as and t.stored_as not in BY_GGML})


def dequantized_note(tensors: list[TensorPlan]) -> str | None:
    types = dequantized_types(tensors)
    return f"dequantized from {', '.join(types)}" if types else None
