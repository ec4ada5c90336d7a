"""The speculative verify step: pure, batched, on the model's device.

For each row b with ``n_drafts[b]`` drafts d_i drawn from proposals p_i, and the target
conditionals q_i of the same positions (each given the drafts before it):

    accept d_i with probability min(1, q_i(d_i) / p_i(d_i)), left to right;
    at the first rejection j draw the replacement from normalize(max(0, q_j - p_j));
    if every draft is accepted, the next token is the bonus draw from ``bonus_probs`` (if given).

Accepting with min(1, q/p) and resampling from the residual yields exactly q at each position,
whatever p is (Leviathan et al. 2023; Chen et al. 2023), which is why every proposer and
variant in this package draws the same joint.
"""

from __future__ import annotations

import dataclasses

import torch

from . import target as _target


@dataclasses.dataclass
class Verdict:
    n_accepted: torch.Tensor  # [B] drafts accepted (<= n_drafts)
    next_token: torch.Tensor  # [B] replacement at the first rejection, else the bonus token, else -1
    next_prob: torch.Tensor  # [B] its target probability (q_j(replacement) or the bonus probability)
    draft_target_prob: torch.Tensor  # [B, K] q_i(d_i): each draft's target probability


def _at(probs: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """probs[b, rows[b, i], tokens[b, i]] as float64 [B, K], without copying whole rows."""
    B, R, V = probs.shape
    return probs.reshape(B, R * V).gather(1, rows * V + tokens).double()


def _row(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """probs[b, rows[b]] as float64 [B, V]."""
    return probs.gather(1, rows[:, None, None].expand(-1, 1, probs.shape[-1])).squeeze(1).double()


def verify(draft_tokens, draft_probs, target_probs, n_drafts, u_accept, u_next, *, target_rows=None,
           exact=None, bonus_probs=None, has_bonus=None) -> Verdict:
    """draft_tokens [B, K]; draft_probs [B, K, V]; target_probs [B, K, V], or [B, Q, V] with
    ``target_rows`` [B, K] naming the row that holds each draft's target (so a pass's query
    distributions are used in place); n_drafts [B]; u_accept [B, K], u_next [B]: uniforms in
    [0, 1). ``exact`` [B, K]: drafts drawn from their exact conditional (target = proposal; no
    target row is read for them). ``bonus_probs`` [B, V]: the next position's distribution,
    drawn where every draft is accepted and ``has_bonus`` [B] (default all) is True. Entries
    past ``n_drafts[b]`` are padding and are ignored. Probabilities may be float32 or float64;
    the arithmetic is float64."""
    B, K = draft_tokens.shape
    ks = torch.arange(K, device=draft_tokens.device)
    if target_rows is None:
        target_rows = ks.expand(B, K)
    p = _at(draft_probs, ks.expand(B, K), draft_tokens)
    q = _at(target_probs, target_rows, draft_tokens)
    if exact is not None:
        q = torch.where(exact, p, q)
    padding = ks[None] >= n_drafts[:, None]
    accept = (u_accept * p <= q) | padding
    n_accepted = torch.minimum(accept.long().cumprod(-1).sum(-1), n_drafts)
    rejected = n_accepted < n_drafts

    j = n_accepted.clamp(max=K - 1)
    q_j = _row(target_probs, target_rows.gather(1, j[:, None]).squeeze(1))
    fix_probs = _target.residual(q_j, _row(draft_probs, j))
    has_next = rejected
    if bonus_probs is not None:
        bonus = bonus_probs.double()
        fix_probs = torch.where(rejected[:, None], fix_probs, bonus)
        q_j = torch.where(rejected[:, None], q_j, bonus)
        has_next = rejected | (torch.ones_like(rejected) if has_bonus is None else has_bonus)
    next_token = _target.draw(fix_probs, u_next)
    next_token = torch.where(has_next, next_token, torch.full_like(next_token, -1))
    next_prob = q_j.gather(-1, next_token.clamp(min=0)[:, None]).squeeze(-1)
    return Verdict(n_accepted, next_token, next_prob, q)
