"""Input validation shared by sampling and scoring: shapes, dtypes, the length limit and the
vocabulary range, each with a specific message."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..seeds import resolve_seed, row_seed  # noqa: F401  (the samplers' seeds, re-exported)


def check_inputs(model, input_ids, masked, attention_mask=None, *, score_hidden=False) -> None:
    """Hidden positions' ids are ignored by the samplers (they get filled) but are the scored
    tokens for ``score_hidden``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InputError("input_ids must be an integer tensor of token ids")
    if input_ids.dim() not in (1, 2):
        raise InputError(f"input_ids must have shape [L] or [B, L], got {tuple(input_ids.shape)}")
    if input_ids.dim() == 2 and input_ids.shape[0] == 0:
        raise InputError("input_ids has no rows: a batch needs at least one sequence")
    if not isinstance(masked, torch.Tensor) or masked.dtype != torch.bool:
        raise InputError("masked must be a bool tensor (True = hidden position)")
    if masked.shape != input_ids.shape:
        raise InputError(f"masked has shape {tuple(masked.shape)} but input_ids has {tuple(input_ids.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise InputError("attention_mask must be a tensor with the same shape as input_ids")
    cfg = model.config
    L = input_ids.shape[-1]
    if cfg.max_length is not None and L > cfg.max_length:
        raise InputError(f"sequence of {L} tokens is longer than the model's limit of {cfg.max_length}")
    real = torch.ones_like(masked) if score_hidden else ~masked
    if attention_mask is not None:
        real = real & attention_mask.bool()
    ids = input_ids[real]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        bad = ids[(ids < 0) | (ids >= cfg.vocab_size)][0]
        raise InputError(f"token id {int(bad)} is outside the model's vocabulary of {cfg.vocab_size}")


def check_row(model, input_ids, masked) -> None:
    """One engine row: [L] ids and hidden mask."""
    check_inputs(model, input_ids, masked)
    if input_ids.dim() != 1:
        raise InputError(f"an engine row is one sequence [L], got shape {tuple(input_ids.shape)}")
