"""Where a verification ran and what it ran on: mlx's device and version, and whether the
MTP head was dequantized from a block-quantized GGUF type (so its bf16 values are not the
original precision). Recorded in forgekit-report.json and mtplx_runtime.json."""

from __future__ import annotations

import platform

from ..dtypes import BY_GGML


def device_facts() -> dict:
    """mlx's default device, Metal availability, mlx version, machine."""
    import mlx.core as mx

    return {"device": str(mx.default_device()), "metal_available": bool(mx.metal.is_available()),
            "mlx": mx.__version__, "machine": f"{platform.system()} {platform.machine()}"}


def head_dequantized_from(plan) -> list[str]:
    """GGML types the head's tensors were dequantized from (empty: stored exactly)."""
    if plan is None:
        return []
    sidecars = {t.key for t in plan.tensors if any(t.key.startswith(p) for p in ("mtp.",))}
    return sorted({t.stored_as for t in plan.tensors
                   if t.key in sidecars and t.stored_as and t.stored_as not in BY_GGML})


def verified_where(plan) -> dict:
    """The block both reports carry: device facts + `head`: 'dequantized from Q8_0' or as stored."""
    types = head_dequantized_from(plan)
    head = f"dequantized from {', '.join(types)}" if types else "as stored in its source"
    return {**device_facts(), "head": head, "head_from_quantized_types": types}
