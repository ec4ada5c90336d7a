"""Rank structures: which tokens are visible and in which order the hidden ones are decoded.

Sampling, scoring and training all describe a sequence the same way (docs/design.md, "Rank structure"): rank 0 for
visible tokens, ranks 1..m for hidden positions in decoding order, PADDING_RANK (-1) for padding. This module
is the one place that turns a hidden mask plus an order into ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .errors import InputError

ORDERS = ("left-to-right", "random")

# The one "no key / padding" sentinel. Callers mark padding positions in rank tensors with
# PADDING_RANK (-1, the documented public value); inside the network and its cache a padding
# position or an unused cache slot is a key of rank NO_KEY, larger than any row's visibility
# limit, so no row ever sees it. ``key_ranks`` is the one conversion between the two.
PADDING_RANK = -1
NO_KEY = 2**40


def key_ranks(ranks: torch.Tensor) -> torch.Tensor:
    """Public ranks (PADDING_RANK for padding) as key ranks (NO_KEY for padding)."""
    ranks = ranks.long()
    return torch.where(ranks < 0, torch.full_like(ranks, NO_KEY), ranks)  # any negative rank pads


def decoding_order(masked: torch.Tensor, order, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hidden positions of one row ([L] bool mask) in decoding order.

    ``order`` is "left-to-right" (ascending position), "random" (uniform permutation drawn from
    ``generator``) or an explicit sequence of the hidden positions.
    """
    hidden = torch.nonzero(masked.cpu(), as_tuple=False).flatten()
    if isinstance(order, str):
        if order == "left-to-right":
            return hidden
        if order == "random":
            return hidden[torch.randperm(len(hidden), generator=generator)]
        raise InputError(f"unknown order {order!r}: use 'left-to-right', 'random' or a permutation of the hidden positions")
    if isinstance(order, torch.Tensor):
        order = order.tolist()
    if not isinstance(order, Sequence):
        raise InputError(f"order must be 'left-to-right', 'random' or a sequence of positions, got {type(order).__name__}")
    perm = [int(p) for p in order]
    if sorted(perm) != hidden.tolist():
        raise InputError(
            f"order {perm} is not a permutation of the hidden positions {hidden.tolist()}"
        )
    return torch.tensor(perm, dtype=torch.long)


def ranks_from_order(length: int, hidden_order: torch.Tensor, valid_length: int | None = None) -> torch.Tensor:
    """[L] ranks: 0 for visible, i for the i-th hidden position of ``hidden_order``, PADDING_RANK (-1)
    for padding."""
    ranks = torch.zeros(length, dtype=torch.long)
    ranks[hidden_order] = torch.arange(1, len(hidden_order) + 1)
    if valid_length is not None:
        ranks[valid_length:] = PADDING_RANK
    return ranks


def training_ranks(batch: int, length: int, hidden_fraction: torch.Tensor, generator: torch.Generator,
                   random_order: bool | float = False) -> torch.Tensor:
    """The paper's training structure: per row, round(fraction * L) hidden positions (at least 1)
    chosen uniformly; visible first (rank 0), then hidden left to right (or in a uniformly random
    order). Vectorised over the batch; the same ranks ``ranks_from_order`` would build from the
    hidden mask and its decoding order.

    ``random_order``: False (every row left to right), True (every row in a uniformly random
    order) or a probability p in [0, 1]: each row independently takes a random order with
    probability p (a mixture of orders; 0 and 1 draw exactly what False and True draw)."""
    p = random_order_probability(random_order)
    fraction = torch.as_tensor(hidden_fraction, dtype=torch.float64).reshape(-1).cpu()
    if fraction.numel() != batch:
        raise InputError(f"hidden_fraction needs {batch} values, got {fraction.numel()}")
    n_hidden = torch.round(fraction * length).long().clamp(1, length)
    # The n smallest of L uniform keys are a uniformly random n-subset.
    keys = torch.rand(batch, length, generator=generator)
    slot = keys.argsort(dim=1).argsort(dim=1)  # position's place in the random permutation
    masked = slot < n_hidden[:, None]
    rank = masked.long().cumsum(dim=1)
    if p > 0:
        okeys = torch.rand(batch, length, generator=generator).masked_fill(~masked, 2.0)
        shuffled = okeys.argsort(dim=1).argsort(dim=1) + 1
        # p == 1 draws no choice, so True and 1.0 consume the generator exactly as before
        chosen = torch.ones(batch, dtype=torch.bool) if p == 1 else torch.rand(batch, generator=generator) < p
        rank = torch.where(chosen[:, None], shuffled, rank)
    return torch.where(masked, rank, torch.zeros_like(rank))


def random_order_probability(random_order: bool | float) -> float:
    """``random_order`` as the probability of a random order per row (checked)."""
    if isinstance(random_order, bool):
        return float(random_order)
    if not isinstance(random_order, (int, float)) or not 0 <= random_order <= 1:
        raise InputError(f"random_order must be true, false or a probability in [0, 1], got {random_order!r}")
    return float(random_order)


class PassGeometry(NamedTuple):
    """What one pass's rows may see, shared by the eager and the fast pass (built once per pass,
    used by every layer): the rows are the pass's N content rows then its Q query rows."""

    content_ids: torch.Tensor  # [B, N] (one padding row when the pass has no content)
    content_rank: torch.Tensor  # [B, N] long, NO_KEY for padding
    query_rank: torch.Tensor  # [B, Q] long, 0 for padding
    allowed: torch.Tensor  # [B, N + Q, K] bool: row may attend to key (key_rank < row limit)
    rel_index: torch.Tensor  # [B, N + Q, K] column of each (row, key) distance in ``rel_table``
    rel_table: list  # per layer [n_head, d_head, 2 * span - 1]
    real_rows: torch.Tensor  # [B, N + Q] bool: not padding


def pass_geometry(content_ids, content_pos, content_rank, query_pos, query_rank, cache, rel_table,
                  make_table, branches=None) -> PassGeometry:
    """The pass's keys (this pass's content rows, or the cache's committed slots followed by them:
    ``cache.write_slots`` places them), which row sees which key (a key is visible to a row iff
    key_rank < limit: rank + 1 for content rows, rank for query rows), and each pair's relative
    distance as a column of ``rel_table`` (``make_table(span)`` when it is missing or too short).

    ``branches``: (content_branch [B, N], query_branch [B, Q]) for a pass that checks several
    drafted continuations at once (multi-draft verification): a new content row of branch j > 0
    is seen only by rows of branch j, on top of the rank rule; branch 0 (the trunk: committed
    keys, pending rows, a shared first draft) is seen by every row the rank rule allows."""
    if content_ids.shape[1] == 0:  # no content at all: one padding row keeps shapes non-empty
        content_ids, content_pos = content_ids.new_zeros(len(content_ids), 1), content_pos.new_zeros(len(content_pos), 1)
        content_rank = torch.full_like(content_pos, NO_KEY)
        if branches is not None:
            branches = (content_pos.new_zeros(content_pos.shape), branches[1])
    content_rank, query_rank = content_rank.long(), query_rank.long()
    row_pos = torch.cat([content_pos, query_pos], dim=1).long()
    row_limit = torch.cat([(content_rank + 1).clamp(max=NO_KEY), query_rank], dim=1)
    if cache is None:
        key_pos, key_rank = content_pos.long(), content_rank
    else:
        key_pos, key_rank = cache.write_slots(content_pos, content_rank)
    span = int(max(row_pos.max().item(), key_pos.max().item())) + 1 if row_pos.numel() else 1
    if rel_table is None or rel_table[0].shape[-1] < 2 * span - 1:
        rel_table = make_table(span)
    table_span = (rel_table[0].shape[-1] + 1) // 2
    rel_index = row_pos[:, :, None] - key_pos[:, None, :] + (table_span - 1)
    allowed = key_rank[:, None, :] < row_limit[:, :, None]
    if branches is not None:
        content_branch, query_branch = (b.long() for b in branches)
        key_branch = content_branch if cache is None else cache.new_slot_values(content_branch)
        row_branch = torch.cat([content_branch, query_branch], dim=1)
        allowed &= (key_branch[:, None, :] == 0) | (key_branch[:, None, :] == row_branch[:, :, None])
    real_rows = torch.cat([content_rank != NO_KEY, query_rank > 0], dim=1)
    return PassGeometry(content_ids, content_rank, query_rank, allowed, rel_index, rel_table, real_rows)
