"""mtp: greedy chain-agreement probe of the head against the built trunk, on CPU.

For each prompt the trunk extends the prompt greedily by `new_tokens` tokens (KV
cache), keeping its post-norm hidden states. The head then drafts chains of depth
1..D at every position with `draft_chain`, under the contract config.json declares
(`mtplx_mtp_contract`: the concat order is honoured; the hidden variants must be
post_norm, the only ones draft_chain implements).

A *round* is a decode step of the trunk: at position t the trunk has just produced
token t+1 and the head drafts tokens t+2 .. t+1+D. Rounds are the t with every drafted
token trunk-generated and inside the trace: P-1 <= t <= L-2-D (P prompt tokens,
L = P + new_tokens). Per depth d, with c_d(t) = [draft_d(t) == trace[t+1+d]]:
    marginal[d]     mean of c_d over rounds
    cumulative[d]   mean over rounds of c_1 * ... * c_d (the first d drafts all accepted)
    acceptance[d]   cumulative[d] / cumulative[d-1]: acceptance at depth d given that
                    depths < d were accepted (cumulative[0] = 1)
    mean_accepted   mean over rounds of the number of leading accepted drafts (0..D)
The step fails when acceptance[d] is below the recipe's threshold for depth d, or at
or below `collapse` (0.05) at any depth.

params: prompts (token id lists or text), max_prompt_tokens, new_tokens (32), depth
(3), min_agreement (one threshold per depth), collapse (0.05), compute_dtype (float32).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..mtp_head import draft_chain
from ..verify_params import MtpParams, prompt_list
from .cpu_linear import numpy_linears
from .load import BodyCache, compute_dtype, contract, load_head, prompt_tokens, trunk
from .trunk_pass import trunk_pass

MIN_EVALUABLE = 8     # rounds a depth needs before its acceptance is judged


def greedy_trace(model, prompts: mx.array, new_tokens: int) -> tuple[mx.array, mx.array]:
    """Tokens [B, P+new] and post-norm hidden [B, P+new, H] of the trunk's greedy run.

    The hidden state of the last token is never used by `draft_chain` (nothing follows
    it), so it is left as zeros instead of costing one more decode step.
    """
    from mlx_lm.models.cache import make_prompt_cache

    decoder, _, lm_head = trunk(model)
    cache = make_prompt_cache(model)
    hidden = [decoder(prompts, cache=cache)]
    tokens = [prompts]
    for i in range(new_tokens):
        nxt = mx.argmax(lm_head(hidden[-1][:, -1]), axis=-1)[:, None].astype(prompts.dtype)
        tokens.append(nxt)
        hidden.append(decoder(nxt, cache=cache) if i < new_tokens - 1 else mx.zeros_like(hidden[-1][:, -1:]))
        mx.eval(nxt, hidden[-1])
    return mx.concatenate(tokens, axis=1), mx.concatenate(hidden, axis=1)


def chain_stats(drafts: np.ndarray, tokens: np.ndarray, prompt_len: int, greedy: np.ndarray | None = None) -> dict:
    """Agreement by depth (module docstring) from drafts [D, B, L-1] and the sequences [B, L].

    `greedy` [B, L]: the trunk's argmax after each position. Omitted, `tokens` is the trunk's
    own greedy trace (greedy[t] = tokens[t+1]; the last is unknown, so rounds end one earlier).
    Given, `tokens` is teacher text: depth d at round t is evaluable only where the text's
    tokens t+2 .. t+d are the trunk's own greedy choices (the path accepted drafts take).
    """
    depth, length = drafts.shape[0], tokens.shape[1]
    if greedy is None:
        greedy = np.concatenate([tokens[:, 1:], np.full_like(tokens[:, :1], -1)], axis=1)
    rounds = np.arange(prompt_len - 1, length - 1 - depth)
    correct = np.stack([drafts[d][:, rounds] == greedy[:, rounds + 1 + d] for d in range(depth)])
    agree = tokens[:, rounds[:, None] + 2 + np.arange(depth)] == greedy[:, rounds[:, None] + 1 + np.arange(depth)]
    on_path = np.stack([np.all(agree[:, :, :d], axis=2) for d in range(depth)])   # [D, B, R]
    lead = np.cumprod(correct, axis=0)                   # [D, B, R]: first d+1 drafts all right
    before = np.concatenate([np.ones_like(lead[:1]), lead[:-1]])
    evaluable = (before & on_path).reshape(depth, -1).sum(axis=1)
    accepted = (lead & on_path).reshape(depth, -1).sum(axis=1)
    acceptance = np.divide(accepted, evaluable, out=np.zeros(depth), where=evaluable > 0)
    n = max(rounds.size * tokens.shape[0], 1)
    return {"rounds": int(rounds.size * tokens.shape[0]),
            "evaluable_by_depth": evaluable.astype(int).tolist(),
            "marginal": correct.reshape(depth, -1).mean(axis=1).round(4).tolist(),
            "cumulative": (accepted / n).round(4).tolist(),
            "acceptance": acceptance.round(4).tolist(),
            "mean_accepted": round(float((lead & on_path).sum(axis=0).mean()), 4)}


def teacher_pass(model, tokens: mx.array, bodies: BodyCache | None):
    """(hidden [B, L, H], greedy [B, L]) of one prefill over teacher text (shared with parity)."""
    hidden, log_probs = trunk_pass(model, tokens, bodies)
    return hidden, np.argmax(log_probs, axis=-1)


def head_drafts(model, head, tokens: mx.array, hidden: mx.array, depth: int) -> np.ndarray:
    """`draft_chain` drafts [D, B, L-1] with the head's and the trunk's linears in numpy on a CPU.

    The lm_head is taken from the model inside the block, so the drafts' vocabulary product
    (the largest matrix) runs in numpy too, not in mlx's CPU kernel.
    """
    with numpy_linears(head, model):
        _, embed, lm_head = trunk(model)
        drafts = draft_chain(head, embed, lm_head, tokens, hidden, depth)
        mx.eval(drafts)
    return np.array(drafts)


def run(directory: Path, plan, params: MtpParams, bodies: BodyCache | None = None) -> dict:
    config = json.loads((directory / "config.json").read_text())
    declared = contract(config)
    for key in ("base_hidden_variant", "hidden_variant"):
        if declared[key] != "post_norm":
            return {"passed": False, "cause": f"config.json mtplx_mtp_contract.{key} is '{declared[key]}'; "
                                              f"the probe implements post_norm only"}
    if declared["concat_order"] not in ("embedding_hidden", "hidden_embedding"):
        return {"passed": False, "cause": f"config.json mtplx_mtp_contract.concat_order "
                                          f"'{declared['concat_order']}' is not a known order"}
    depth, new_tokens = params.depth, params.new_tokens
    collapse, thresholds = params.collapse, params.thresholds()
    start = time.time()
    try:
        dtype = compute_dtype(params)
        model, tokenizer = (bodies or BodyCache()).load(directory, dtype)
        head = load_head(directory, config, dtype).mtp
        ids = prompt_tokens(prompt_list(params.prompts), tokenizer, params.max_prompt_tokens)
    except Exception as exc:  # the load step names these precisely; here they only stop the probe
        return {"passed": False, "cause": f"cannot set up the probe: {type(exc).__name__}: {exc}"}
    prompt_len = min(len(p) for p in ids)          # one batch: every prompt cut to the shortest
    prompts = mx.array([p[:prompt_len] for p in ids])
    load_seconds = time.time() - start
    if params.trace == "text":
        tokens, first_round = prompts, params.context
        hidden, greedy = teacher_pass(model, tokens, bodies)
    else:
        tokens, hidden = greedy_trace(model, prompts, new_tokens)
        greedy, first_round = None, prompt_len
    trace_seconds = time.time() - start - load_seconds
    drafts = head_drafts(model, head, tokens, hidden, depth)
    stats = chain_stats(drafts, np.array(tokens), first_round, greedy)
    summary = {**stats, "depth": depth, "prompts": len(ids), "prompt_tokens": prompt_len, "trace": params.trace,
               "new_tokens": new_tokens if params.trace == "greedy" else 0, "trunk_tokens": int(tokens.size),
               "head_positions": int(drafts.size), "concat_order": declared["concat_order"],
               "compute_dtype": str(dtype).split(".")[-1],
               "seconds": {"load": round(load_seconds, 2), "trace": round(trace_seconds, 2),
                           "draft": round(time.time() - start - load_seconds - trace_seconds, 2)}}
    judged = [n >= MIN_EVALUABLE for n in stats["evaluable_by_depth"]]
    warnings = [f"depth {d}: only {n} evaluable rounds (the text leaves the trunk's greedy path); not judged"
                for d, (n, ok) in enumerate(zip(stats["evaluable_by_depth"], judged), 1) if not ok]
    collapsed = [f"depth {d} {a:.3f}" for d, (a, ok) in enumerate(zip(stats["acceptance"], judged), 1)
                 if ok and a <= collapse]
    low = [f"depth {d} acceptance {a:.3f} < threshold {t}"
           for d, (a, t, ok) in enumerate(zip(stats["acceptance"], thresholds, judged), 1) if ok and collapse < a < t]
    problems = low
    if collapsed:
        problems = [f"acceptance {', '.join(collapsed)} <= {collapse}: collapsed (the head does not draft "
                    f"for this trunk under the declared contract, concat_order {declared['concat_order']})"] + low
    if problems:
        return {"passed": False, "cause": "; ".join(problems), "summary": summary, "warnings": warnings}
    return {"passed": True, "summary": summary, "warnings": warnings}
