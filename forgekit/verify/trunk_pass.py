"""One forward of a body over whole sequences (a prefill), shared by the steps of one build.

parity needs the built body's next-token distributions on its sequences; mtp in `trace: text`
mode needs the same body's post-norm hidden states and greedy choices on the same text. Both
come from one forward, kept on the build's BodyCache (keyed by the loaded body and the token
ids), so a recipe whose parity and mtp steps share their prompts runs the 9B trunk once. On a
CPU the linear layers run in numpy (cpu_linear.py).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cpu_linear import numpy_linears
from .load import trunk


def forward(model, tokens: mx.array) -> tuple[mx.array, np.ndarray]:
    """(post-norm hidden [B, L, H], float32 log-probs [B, L, V]) of one forward over `tokens`."""
    with numpy_linears(model):
        decoder, _, lm_head = trunk(model)     # inside the block: the swapped lm_head, not mlx's kernel
        hidden = decoder(tokens)
        logits = lm_head(hidden).astype(mx.float32)
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(hidden, log_probs)
    return hidden, np.array(log_probs)


def trunk_pass(model, tokens: mx.array, bodies=None) -> tuple[mx.array, np.ndarray]:
    """`forward`, memoized on `bodies` (a load.BodyCache) for the body it holds."""
    memo = getattr(bodies, "passes", None)
    if memo is None or bodies.value is None or bodies.value[0] is not model:
        return forward(model, tokens)
    key = (bodies.key, tokens.shape, np.array(tokens).tobytes())
    if key not in memo:
        memo[key] = forward(model, tokens)
    return memo[key]


def log_probs_by_sequence(model, seqs: list[list[int]], bodies=None) -> list[np.ndarray]:
    """Log-probs [L_i, V] per sequence; sequences of one length go through one batched forward."""
    out: dict[int, np.ndarray] = {}
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_length.setdefault(len(s), []).append(i)
    for indices in by_length.values():
        _, lp = trunk_pass(model, mx.array([seqs[i] for i in indices]), bodies)
        out.update({i: lp[n] for n, i in enumerate(indices)})
    return [out[i] for i in range(len(seqs))]
