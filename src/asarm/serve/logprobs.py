"""Top-n log-probabilities of generated tokens, exact: the target conditional each token was drawn
from, recomputed for the finished row in one pass.

A token at position p was drawn (by the sequential sampler, or by ASSD, which is exact) from the
target distribution of p given the visible tokens and the tokens decoded before it in the row's
decoding order. With that order's ranks fixed, ``model.chain_logits`` gives every such conditional
of the finished row in one pass (docs/design.md, "Rank structure"), and the row's own
``TargetDistribution`` (temperature, top-k, top-p, excluded tokens, greedy) turns them into the
distributions the sampler used. Equal to the sampling passes up to float rounding.
"""

from __future__ import annotations

import math

import torch

from ..ranks import ranks_from_order
from ..tokenization import decode


@torch.no_grad()
def top_logprobs(model, tokenizer, result, config, start: int, end: int, n: int) -> list[dict]:
    """For each position in ``[start, end)`` (all hidden), {token text: log-prob} of its ``n`` most
    likely tokens under the target it was drawn from, most likely first. Tokens with probability
    zero under the target (truncated by top-k/top-p, excluded, or not the greedy choice) are left
    out; two tokens that decode to the same text keep the likelier."""
    ids = result.input_ids.reshape(1, -1).to(model.device)
    order = torch.tensor(result.order, dtype=torch.long)
    ranks = ranks_from_order(ids.shape[1], order)[None].to(model.device)
    logits, query_pos, _ = model.chain_logits(ids, ranks)
    logp = torch.log_softmax(config.target(model.config.mask_token_id).logits(logits[0]).double(), -1)
    position_row = {int(p): i for i, p in enumerate(query_pos[0].tolist())}
    values, tokens = logp.topk(min(n, logp.shape[-1]), -1)
    out = []
    for pos in range(start, end):
        row = position_row[pos]
        alternatives = {}
        for value, token in zip(values[row].tolist(), tokens[row].tolist()):
            if math.isfinite(value):
                alternatives.setdefault(decode(tokenizer, [token]), value)
        out.append(alternatives)
    return out
