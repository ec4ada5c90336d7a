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


def verify(draft_tokens, draft_probs, target_probs, n_drafts, u_accept, u_next, bonus_probs=None,
           has_bonus=None) -> Verdict:
    """draft_tokens [B, K]; draft_probs, target_probs [B, K, V] (float64); n_drafts [B];
    u_accept [B, K], u_next [B]: uniforms in [0, 1); bonus_probs [B, V] or None, used for the
    rows where ``has_bonus`` [B] is True (all rows if None). Entries past ``n_drafts[b]`` are
    padding and are ignored."""
    B, K = draft_tokens.shape
    p = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
    q = target_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
    padding = torch.arange(K, device=draft_tokens.device)[None] >= n_drafts[:, None]
    accept = (u_accept * p <= q) | padding
    n_accepted = torch.minimum(accept.long().cumprod(-1).sum(-1), n_drafts)
    rejected = n_accepted < n_drafts

    j = n_accepted.clamp(max=K - 1)[:, None, None].expand(B, 1, target_probs.shape[-1])
    q_j, p_j = target_probs.gather(1, j).squeeze(1), draft_probs.gather(1, j).squeeze(1)
    fix_probs = _target.residual(q_j, p_j)
    if bonus_probs is not None:
        fix_probs = torch.where(rejected[:, None], fix_probs, bonus_probs)
        q_j = torch.where(rejected[:, None], q_j, bonus_probs)
    next_token = _target.draw(fix_probs, u_next)
    has_next = rejected
    if bonus_probs is not None:
        has_next = rejected | (torch.ones_like(rejected) if has_bonus is None else has_bonus)
    next_token = torch.where(has_next, next_token, torch.full_like(next_token, -1))
    next_prob = q_j.gather(-1, next_token.clamp(min=0)[:, None]).squeeze(-1)
    return Verdict(n_accepted, next_token, next_prob)
