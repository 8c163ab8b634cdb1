"""The bf16 source's reference log-probs for `parity`, cached by the source's content digest.

The source body never changes between rebuilds of a finetune (only recipes, heads or quant
rules do), so its next-token distributions on the parity sequences are computed once and kept
in `<cache>/verify/<key>.npz`; a rebuild does not even load the ~18 GB bf16 source. The key is
the xxh3_128 of the source files' digests (known to the build: the doit session puts them on
the BodyCache), the token ids and the mlx version. Without digests (`forgekit verify DIR`)
nothing is cached. The files live outside `cache/objects`, so `forgekit cache gc` leaves them;
delete `cache/verify/` to reclaim the space.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import xxhash

from .. import settings
from ..fileio import atomic_write_bytes

VERSION = 2                 # 2: the vocabulary product runs in numpy like the layers (trunk_pass.py)


def key(digests: dict | None, seqs: list[list[int]]) -> str | None:
    if not digests:
        return None
    import mlx.core as mx

    text = json.dumps({"v": VERSION, "mlx": mx.__version__, "source": sorted(digests.values()), "seqs": seqs})
    return xxhash.xxh3_128_hexdigest(text.encode())


def path(cache_key: str) -> Path:
    return settings.cache_root() / "verify" / f"parity-ref-{cache_key}.npz"


def load(cache_key: str | None) -> tuple[list[list[int]], list[np.ndarray]] | None:
    """(sequences, their log-probs) cached, or None (absent or unreadable: then recomputed)."""
    if cache_key is None or not path(cache_key).is_file():
        return None
    try:
        with np.load(path(cache_key)) as data:
            count = len(data.files) // 2
            return ([data[f"t{i}"].tolist() for i in range(count)], [data[f"s{i}"] for i in range(count)])
    except (OSError, ValueError, KeyError):
        return None


def store(cache_key: str | None, seqs: list[list[int]], log_probs: list[np.ndarray]) -> None:
    if cache_key is None:
        return
    buffer = io.BytesIO()
    arrays = {f"s{i}": lp.astype(np.float32) for i, lp in enumerate(log_probs)}
    arrays.update({f"t{i}": np.array(s, dtype=np.int64) for i, s in enumerate(seqs)})
    np.savez(buffer, **arrays)
    path(cache_key).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path(cache_key), buffer.getvalue())
