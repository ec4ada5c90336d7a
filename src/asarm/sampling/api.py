"""``sample()``: fill the hidden positions of a batch by exact chain sampling (the public entry)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..errors import InputError
from .checks import check_inputs, resolve_seed
from .config import DecodeConfig
from .engine import Engine
from .row import SampleResult


def row_orders(order, B: int) -> list:
    """One order spec per row: a string for all rows, one permutation ([L] input), or a list of them."""
    if isinstance(order, str):
        return [order] * B
    seq = order.tolist() if isinstance(order, torch.Tensor) else list(order)
    if B > 1 and seq and all(isinstance(o, (list, tuple, torch.Tensor)) for o in seq):
        if len(seq) != B:
            raise InputError(f"got {len(seq)} orders for {B} rows")
        return seq
    if B > 1:
        raise InputError("for a batch, order must be 'left-to-right', 'random' or a list of per-row permutations")
    return [seq]


def _valid_lengths(attention_mask, B: int, L: int) -> torch.Tensor:
    if attention_mask is None:
        return torch.full((B,), L, dtype=torch.long)
    valid = attention_mask.view(B, L).bool().cpu()
    valid_len = valid.sum(1)
    if not bool((valid == (torch.arange(L)[None] < valid_len[:, None])).all()):
        raise InputError("attention_mask must mark a prefix of each row (right padding)")
    return valid_len


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, masked: torch.Tensor, config: DecodeConfig | None = None, *,
           order="left-to-right", seed: int | None = None, attention_mask: torch.Tensor | None = None,
           return_logprobs: bool = False, callback: Callable[[int, list[int], list[int]], None] | None = None,
           constraints=None, **options) -> SampleResult:
    """Fill the hidden positions of ``input_ids`` by exact chain sampling.

    input_ids: LongTensor [B, L] or [L]; masked: BoolTensor of the same shape, True = hidden.
    config: a ``DecodeConfig``; or its fields as keywords (method, draft, k, temperature,
    greedy, top_k, top_p, bonus, one_pass, adaptive_k, cache, suppress). order: "left-to-right",
    "random" (per row, from its seed) or a permutation of the hidden positions (a list of them
    for a batch). seed: row b draws from its own stream, ``row_seed(seed, b)``, so a row's
    result does not depend on the batch it is in. attention_mask: Bool [B, L], False for right
    padding. return_logprobs: fill ``token_logprobs`` with each sampled token's target-chain
    log-prob. callback(row, positions, tokens) is called as each round's tokens are accepted.
    constraints: per row a list of ``asarm.sampling.constraints.HoleConstraint`` (or None), or
    one list for a single row: those holes are filled inside their automata (exact for the
    locally renormalized chain; docs/constraints.md).
    """
    if config is None:
        config = DecodeConfig(**options)
    elif options:
        config = config.replace(**options)
    check_inputs(model, input_ids, masked, attention_mask)
    start = time.perf_counter()
    squeeze = input_ids.dim() == 1
    ids = input_ids.view(1, -1) if squeeze else input_ids
    hid = masked.view(1, -1) if squeeze else masked
    B, L = ids.shape
    valid_len = _valid_lengths(attention_mask, B, L)
    seed = resolve_seed(seed)
    engine = Engine(model, cache=config.cache)
    if constraints and not isinstance(constraints[0], (list, tuple, type(None))):  # one row's holes
        constraints = [constraints]
    if constraints is not None and len(constraints) != B:
        raise InputError(f"got constraints for {len(constraints)} rows, but the batch has {B}")
    handles = []
    for b, row_order in enumerate(row_orders(order, B)):
        n = int(valid_len[b])
        on_round = None if callback is None else (lambda ev, b=b: callback(b, ev.positions, ev.tokens))
        handles.append(engine.add(ids[b, :n], hid[b, :n].cpu(), config, seed=seed, row_index=b, order=row_order,
                                  on_round=on_round, return_logprobs=return_logprobs,
                                  constraints=None if constraints is None else constraints[b]))
    engine.run()
    return SampleResult.of_rows([h.row for h in handles], ids, return_logprobs, time.perf_counter() - start, squeeze)
