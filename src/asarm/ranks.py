"""Rank structures: which tokens are visible and in which order the hidden ones are decoded.

Sampling, scoring and training all describe a sequence the same way (DESIGN §1): rank 0 for
visible tokens, ranks 1..m for hidden positions in decoding order, -1 for padding. This module
is the one place that turns a hidden mask plus an order into ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError

ORDERS = ("left-to-right", "random")


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
    """[L] ranks: 0 for visible, i for the i-th hidden position of ``hidden_order``, -1 for padding."""
    ranks = torch.zeros(length, dtype=torch.long)
    ranks[hidden_order] = torch.arange(1, len(hidden_order) + 1)
    if valid_length is not None:
        ranks[valid_length:] = -1
    return ranks


def training_ranks(batch: int, length: int, hidden_fraction: torch.Tensor, generator: torch.Generator,
                   random_order: bool = False) -> torch.Tensor:
    """The paper's training structure: per row, round(fraction * L) hidden positions chosen
    uniformly; visible first, then hidden left to right (or in a uniformly random order)."""
    ranks = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        n_hidden = int(round(float(hidden_fraction[b]) * length))
        n_hidden = min(max(n_hidden, 1), length)
        masked = torch.zeros(length, dtype=torch.bool)
        masked[torch.randperm(length, generator=generator)[:n_hidden]] = True
        order = decoding_order(masked, "random" if random_order else "left-to-right", generator)
        ranks[b] = ranks_from_order(length, order)
    return ranks
