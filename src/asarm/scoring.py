"""Parallel joint density estimation: log p(x_hidden | x_visible) in ONE pass per row.

An AS-ARM evaluates a whole chain of conditionals at once (docs/design.md, "Rank structure"): with ranks fixed by the
order, the query stream at each hidden position gives p(x_sigma_i | visible, x_sigma_<i), and
their sum is the exact log-likelihood of the chain that the samplers draw from.
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import InputError
from .ranks import decoding_order, ranks_from_order
from .sampling import TargetDistribution, check_inputs, check_temperature, resolve_seed, row_orders, row_seed


@dataclasses.dataclass
class ScoreResult:
    log_prob: torch.Tensor  # [B] (scalar for [L] input): sum over hidden positions, in nats
    token_log_probs: torch.Tensor  # [B, L]: log p of each hidden token given its chain prefix; 0 elsewhere
    num_tokens: torch.Tensor  # [B] hidden tokens scored
    nfe: int  # network passes used (one for the whole batch)

    @property
    def nll_per_token(self) -> torch.Tensor:
        return -self.log_prob / self.num_tokens.clamp(min=1)

    @property
    def perplexity(self) -> torch.Tensor:
        return torch.exp(self.nll_per_token)


def chain_log_probs(model, ids: torch.Tensor, ranks: torch.Tensor, target: TargetDistribution):
    """(log-prob [B, Q] float64 of each scored token under ``target``, 0 for padding queries;
    the query positions [B, Q]): one ``model.chain_logits`` pass over rows laid out by
    ``ranks`` (0 visible, 1.. scored in that order, -1 absent)."""
    logits, query_pos, query_valid = model.chain_logits(ids, ranks)
    logp = torch.log_softmax(target.logits(logits), -1)
    picked = logp.gather(-1, ids.gather(1, query_pos)[..., None]).squeeze(-1).double()
    return torch.where(query_valid, picked, torch.zeros_like(picked)), query_pos


@torch.no_grad()
def score(model, input_ids: torch.Tensor, masked: torch.Tensor, *, order="left-to-right",
          temperature: float = 1.0, attention_mask: torch.Tensor | None = None,
          seed: int | None = None) -> ScoreResult:
    """Exact chain log-likelihood of the hidden tokens given the visible ones, mask token
    excluded from every softmax as in sampling. ``order`` as in ``sample``; "random" draws each
    row's order from ``seed``. ``temperature`` scores the tempered chain."""
    check_inputs(model, input_ids, masked, attention_mask, score_hidden=True)
    check_temperature(temperature)
    squeeze = input_ids.dim() == 1
    ids = input_ids.view(1, -1).cpu().long() if squeeze else input_ids.cpu().long()
    hid = masked.view(1, -1).cpu() if squeeze else masked.cpu()
    B, L = ids.shape
    valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.view(B, L).cpu().bool()
    hid = hid & valid
    if bool((ids[hid] == model.config.mask_token_id).any()):
        raise InputError("a hidden position holds the mask token: score needs the real tokens at hidden positions")
    seed = resolve_seed(seed)
    ranks = torch.stack([
        ranks_from_order(L, decoding_order(hid[b], o, torch.Generator().manual_seed(row_seed(seed, b))),
                         int(valid[b].sum()))
        for b, o in enumerate(row_orders(order, B))
    ])
    target = TargetDistribution(model.config.mask_token_id, float(temperature))
    picked, query_pos = chain_log_probs(model, ids.to(model.device), ranks.to(model.device), target)
    picked = picked.cpu()
    token_log_probs = torch.zeros(B, L, dtype=torch.float64)
    token_log_probs.scatter_(1, query_pos.cpu(), picked)
    token_log_probs[~hid] = 0.0
    result = ScoreResult(token_log_probs.sum(1), token_log_probs, hid.sum(1), nfe=1)
    if squeeze:
        result.log_prob, result.token_log_probs, result.num_tokens = result.log_prob[0], token_log_probs[0], result.num_tokens[0]
    return result
