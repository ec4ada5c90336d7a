"""Exact joint distributions of a tiny model, enumerated with `transformers`' XLNet as the
independent reference, and goodness-of-fit tests against them."""

from __future__ import annotations

import itertools
import math
import os
import zlib

import torch
from scipy.stats import chi2

from conftest import hf_reference


def chain_logits_reference(model, input_ids: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Logits of every factor p(x_order[i] | visible, x_order[<i]) for a batch of filled
    sequences [N, L], from `transformers` XLNetLMHeadModel: [N, m, V] in decoding order.

    A query that may see nothing (first factor with nothing visible) is the one place where
    we differ from `transformers` on purpose (it would average over all positions, i.e. over
    invisible tokens); that factor is taken from our model, whose value for it depends on
    no token at all (tested separately).
    """
    hf = hf_reference(model)
    N, L = input_ids.shape
    m = len(order)
    rank = torch.zeros(L, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(1, m + 1)
    hidden = rank > 0
    perm_mask = (hidden[None, :] & (rank[:, None] <= rank[None, :])).float()
    target = torch.zeros(m, L)
    target[torch.arange(m), torch.tensor(order)] = 1.0
    with torch.no_grad():
        out = hf(input_ids, perm_mask=perm_mask.expand(N, L, L), target_mapping=target.expand(N, m, L)).logits
        if bool(hidden.all()):
            ours, _, _ = model.chain_logits(input_ids[:1], rank[None])
            first_pos = order[0]
            # chain_logits returns query rows in ascending position
            out[:, 0] = ours[0, sorted(order).index(first_pos)]
    return out


def exact_joint(model, input_ids, masked, order, temperature=1.0, transform=None) -> dict[tuple, float]:
    """{hidden tokens in ascending position order: probability} for one row and one order."""
    L = input_ids.shape[0]
    hidden_pos = torch.nonzero(masked).flatten().tolist()
    vocab = [v for v in range(model.config.vocab_size) if v != model.config.mask_token_id]
    outcomes = list(itertools.product(vocab, repeat=len(hidden_pos)))
    filled = input_ids.repeat(len(outcomes), 1)
    filled[:, hidden_pos] = torch.tensor(outcomes)
    logits = chain_logits_reference(model, filled, list(order)).double()
    logits[..., model.config.mask_token_id] = -math.inf
    if transform is not None:
        logp = torch.log_softmax(transform(logits), -1)
    else:
        logp = torch.log_softmax(logits / temperature, -1)
    tokens_in_order = filled[:, list(order)]
    total = logp.gather(-1, tokens_in_order[..., None]).squeeze(-1).sum(-1).exp()
    return {o: float(p) for o, p in zip(outcomes, total)}


def mixture(joints: list[dict]) -> dict:
    keys = joints[0].keys()
    return {key: sum(j[key] for j in joints) / len(joints) for key in keys}


def stable_seed(*parts) -> int:
    """A seed derived from a test's parameters that is the same in every run (Python's hash()
    of strings changes from process to process, which would make the G-tests non-reproducible)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) % 10_000


# (test id, p-value) of every G-test this session; conftest prints a summary at the end
P_VALUES: list[tuple[str, float]] = []


def g_test(samples: list[tuple], probs: dict[tuple, float], min_expected: float = 5.0) -> tuple[float, float]:
    """G-test of observed samples against exact probabilities; cells with small expected counts
    are pooled into one. Returns (G statistic, p-value). Samples outside the support fail hard."""
    g, p = _g_test(samples, probs, min_expected)
    P_VALUES.append((os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], p))
    return g, p


def _g_test(samples, probs, min_expected):
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    outside = [s for s in counts if probs.get(s, 0.0) <= 0.0]
    if outside:
        return math.inf, 0.0
    obs, exp = [], []
    pooled_o, pooled_e = 0, 0.0
    for key, p in probs.items():
        e = n * p
        if e < min_expected:
            pooled_o += counts.get(key, 0)
            pooled_e += e
        else:
            obs.append(counts.get(key, 0))
            exp.append(e)
    if pooled_e > 0:
        obs.append(pooled_o)
        exp.append(pooled_e)
    g = 2.0 * sum(o * math.log(o / e) for o, e in zip(obs, exp) if o > 0)
    dof = max(len(obs) - 1, 1)
    return g, float(chi2.sf(g, dof))
