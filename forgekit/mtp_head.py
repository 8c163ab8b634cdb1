"""The Qwen3.5 multi-token-prediction head as an MLX module tree.

Parameter names match the 15 ``mtp.*`` keys MTPLX loads, so
``MTPHeadModel.load_weights(list(mtp_tensors.items()), strict=True)`` proves a
head file has exactly the right keys and shapes. The layer is mlx-lm's own
``qwen3_5.DecoderLayer`` in its full-attention variant; for an MoE config
(``num_experts > 0``) that layer carries mlx-lm's sparse MoE block, so the same
tree has MTPLX's 20 ``switch_mlp`` keys (on CPU it must compute in float32:
mlx's CPU ``gather_mm`` is float32-only, which the probes' default ensures).

Draft step (contract defaults: post-norm trunk hidden, embedding-then-hidden):
    e = pre_fc_norm_embedding(embed(token_{t+1}))
    h = pre_fc_norm_hidden(hidden_t)
    x = layer(fc(concat(e, h)))
    logits = lm_head(norm(x))          -> predicts token_{t+2}
Depth d+1 feeds ``norm(x)`` and the drafted token back in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from .mlx_models import models_module

if TYPE_CHECKING:
    from mlx_lm.models.qwen3_5 import TextModelArgs


class MTPHead(nn.Module):
    def __init__(self, args: TextModelArgs, concat_order: str = "embedding_hidden"):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.concat_order = concat_order
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden, eps=eps)
        decoder_layer = models_module("qwen3_5").DecoderLayer   # mlx-lm's, see mlx_models.py
        self.layers = [decoder_layer(args, layer_idx=args.full_attention_interval - 1)]
        self.norm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache=None) -> mx.array:
        """One draft depth over a whole sequence (causal); returns the pre-norm output x."""
        e = self.pre_fc_norm_embedding(embeddings)
        h = self.pre_fc_norm_hidden(hidden)
        pair = [e, h] if self.concat_order == "embedding_hidden" else [h, e]
        x = self.fc(mx.concatenate(pair, axis=-1))
        mask = models_module("base").create_attention_mask(x, cache)
        return self.layers[0](x, mask=mask, cache=cache)


class MTPHeadModel(nn.Module):
    """Wrapper so parameter paths start with ``mtp.`` exactly as on disk."""

    def __init__(self, args: TextModelArgs, concat_order: str = "embedding_hidden"):
        super().__init__()
        self.mtp = MTPHead(args, concat_order)


def text_args(config: dict) -> TextModelArgs:
    """mlx-lm's TextModelArgs from an HF/MLX Qwen3.5 config.json dict."""
    text_config = dict(config.get("text_config", config))
    return models_module("qwen3_5").TextModelArgs.from_dict(text_config)


def draft_chain(head: MTPHead, embed, lm_head, tokens: mx.array, hidden: mx.array, depth: int):
    """Greedy draft chains of length ``depth`` at every position, sequence-parallel.

    tokens: [B, L] a trace; hidden: [B, L, H] the trunk's post-norm hidden for it.
    Position t drafts tokens t+2 .. t+1+depth. The depth-1 input token is
    tokens[t+1]; deeper steps use the head's own previous draft. Returns an int
    array [depth, B, L-1] of drafted token ids.
    """
    next_tokens = tokens[:, 1:]
    h = hidden[:, :-1]
    drafts = []
    for _ in range(depth):
        x = head(embed(next_tokens), h)
        normed = head.norm(x)
        next_tokens = mx.argmax(lm_head(normed), axis=-1)
        drafts.append(next_tokens)
        h = normed
    return mx.stack(drafts)
