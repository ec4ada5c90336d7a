"""Scoring (parallel density estimation) and the sampling controls: greedy, top-k, top-p,
log-probs, streaming callbacks; truncated ASSD stays exact."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from asarm.errors import InputError
from asarm.sampling import sample
from asarm.scoring import score
from conftest import random_rows, tiny_model
from exact import exact_joint, g_test, mixture, stable_seed
from test_exactness import ALPHA, HIDDEN, INPUT, MASKED, N_SAMPLES, draws

VOCAB = 40


@pytest.fixture(scope="module")
def small():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def wide():
    return tiny_model(seed=1, vocab_size=VOCAB, d_model=32, n_layer=3, n_head=4, d_inner=64, initializer_range=0.3)


def batch(B=6, L=20, seed=0):
    return random_rows(B, L, VOCAB, seed, max_hidden=1.0)


# --- scoring -------------------------------------------------------------------------------------
def test_score_equals_log_of_exact_joint(small):
    joint = exact_joint(small, INPUT, MASKED, HIDDEN)
    outcomes = list(joint)[::37]
    ids = INPUT.repeat(len(outcomes), 1)
    ids[:, HIDDEN] = torch.tensor(outcomes)
    res = score(small, ids, MASKED.repeat(len(outcomes), 1))
    expected = torch.tensor([math.log(joint[o]) for o in outcomes], dtype=torch.float64)
    assert torch.allclose(res.log_prob, expected, atol=1e-5)
    assert res.nfe == 1 and torch.equal(res.num_tokens, torch.full((len(outcomes),), 3))


def test_score_of_permutation_and_random_order(small):
    ids = INPUT.clone()
    ids[HIDDEN] = torch.tensor([0, 3, 1])
    perm = [5, 2, 3]
    joint = exact_joint(small, INPUT, MASKED, perm)
    res = score(small, ids, MASKED, order=perm)
    assert abs(float(res.log_prob) - math.log(joint[(0, 3, 1)])) < 1e-5
    # "random" draws one order per row: the score is that order's chain
    rnd = score(small, ids, MASKED, order="random", seed=3)
    chains = [math.log(exact_joint(small, INPUT, MASKED, list(o))[(0, 3, 1)]) for o in itertools.permutations(HIDDEN)]
    assert min(abs(float(rnd.log_prob) - c) for c in chains) < 1e-5


@torch.no_grad()
def test_score_equals_sum_of_one_pass_at_a_time_conditionals(wide):
    ids, masked = batch(seed=1)
    res = score(wide, ids, masked)
    for b in range(ids.shape[0]):
        total = 0.0
        hidden = torch.nonzero(masked[b]).flatten().tolist()
        for i, pos in enumerate(hidden):
            seen = torch.cat([torch.nonzero(~masked[b]).flatten(), torch.tensor(hidden[:i], dtype=torch.long)])
            ranks = torch.cat([torch.zeros((~masked[b]).sum(), dtype=torch.long), torch.arange(1, i + 1)])
            logits = wide.forward_rows(ids[b, seen][None], seen[None], ranks[None],
                                       torch.tensor([[pos]]), torch.tensor([[i + 1]]))[0, 0].double()
            logits[wide.config.mask_token_id] = -math.inf
            total += float(torch.log_softmax(logits, -1)[ids[b, pos]])
            assert abs(float(res.token_log_probs[b, pos]) - float(torch.log_softmax(logits, -1)[ids[b, pos]])) < 1e-5
        assert abs(float(res.log_prob[b]) - total) < 1e-4


def test_score_row_independent_of_batch_mates(wide):
    ids, masked = batch(seed=2)
    attn = torch.ones_like(masked)
    attn[0, 15:] = False
    together = score(wide, ids, masked, attention_mask=attn)
    alone = score(wide, ids[0, :15], masked[0, :15])
    assert abs(float(together.log_prob[0]) - float(alone.log_prob)) < 1e-5
    assert int(together.num_tokens[0]) == int(masked[0, :15].sum())


def test_score_errors(wide):
    ids, masked = batch(B=1)
    with pytest.raises(InputError, match="mask token"):
        score(wide, torch.full((4,), 6), torch.ones(4, dtype=torch.bool))
    with pytest.raises(InputError, match="vocabulary"):
        score(wide, torch.tensor([1, VOCAB]), torch.tensor([True, True]))
    with pytest.raises(InputError, match="temperature"):
        score(wide, ids, masked, temperature=0)


def test_sample_logprobs_match_score(wide):
    ids, masked = batch(seed=4)
    res = sample(wide, ids, masked, k=3, seed=0, return_logprobs=True)
    scored = score(wide, res.input_ids, masked)
    assert torch.allclose(res.token_logprobs, scored.token_log_probs, atol=1e-5)


# --- greedy: ASSD equals sequential token for token ---------------------------------------------
@pytest.mark.parametrize("order", ["left-to-right", "random"])
@pytest.mark.parametrize("draft", ["self", "ngram"])
def test_greedy_assd_equals_sequential_greedy(wide, draft, order):
    ids, masked = batch(B=8, L=24, seed=5)
    reference = sample(wide, ids, masked, method="sequential", greedy=True, order=order, seed=1)
    for k in (1, 2, 3, 5, 8):
        for cache in (True, False):
            res = sample(wide, ids, masked, draft=draft, k=k, greedy=True, order=order, seed=1, cache=cache)
            assert torch.equal(res.input_ids, reference.input_ids), (draft, k, cache)
    # the faster exact variants draw the same greedy chain
    variants = [dict(bonus=True), dict(adaptive_k=True)] + ([dict(one_pass=True), dict(one_pass=True, adaptive_k=True)]
                                                            if draft == "self" else [])
    for options in variants:
        for k in (2, 5):
            res = sample(wide, ids, masked, draft=draft, k=k, greedy=True, order=order, seed=1, **options)
            assert torch.equal(res.input_ids, reference.input_ids), (draft, k, options)
    # and row by row, outside the batch
    for b in range(2):
        single = sample(wide, ids[b], masked[b], k=4, draft=draft, greedy=True, order=order, seed=1)
        assert torch.equal(single.input_ids, reference.input_ids[b])


def parallel_argmaxes(model, filled, hidden, decoded, positions):
    """For each of ``positions``, the argmax of p(x_pos | visible tokens, the ``decoded``
    positions of ``filled`` in that order), mask token excluded: what one self-draft pass
    proposes after them. One full-recompute chain (`chain_logits`, what `score` uses) per
    position, with pos right after ``decoded``."""
    L = filled.shape[0]
    ranks = torch.zeros(len(positions), L, dtype=torch.long)
    for i, pos in enumerate(positions):
        rest = [p for p in torch.nonzero(hidden).flatten().tolist() if p != pos and p not in decoded]
        for r, p in enumerate(decoded + [pos] + rest):
            ranks[i, p] = r + 1
    logits, query_pos, _ = model.chain_logits(filled.repeat(len(positions), 1), ranks)
    logits[..., model.config.mask_token_id] = -math.inf
    return [int(logits[i, (query_pos[i] == pos).nonzero()[0, 0]].argmax()) for i, pos in enumerate(positions)]


def test_greedy_self_draft_accepts_everything_it_should(wide):
    """Greedy self-draft ASSD, round by round: the drafts are the parallel argmaxes given the
    tokens known at the round's start; draft j is kept exactly when it equals the greedy chain's
    token, the first mismatch is replaced by the chain's token and ends the round. Each round
    costs a draft pass and an oracle pass, a final single-position round only the draft pass."""
    k = 4
    ids, masked = batch(B=4, seed=6)
    res = sample(wide, ids, masked, k=k, greedy=True, seed=0)
    chain = sample(wide, ids, masked, method="sequential", greedy=True, seed=0).input_ids
    assert torch.equal(res.input_ids, chain)
    outcomes = set()
    for b in range(ids.shape[0]):
        order = torch.nonzero(masked[b]).flatten().tolist()  # left to right
        expected, nfe, n = [], 0, 0
        while n < len(order):
            block = min(k, len(order) - n)
            drafts = parallel_argmaxes(wide, chain[b], masked[b], order[:n], order[n:n + block])
            assert drafts[0] == int(chain[b, order[n]])  # the first draft is the exact conditional
            mismatch = next((j for j in range(1, block) if drafts[j] != int(chain[b, order[n + j]])), None)
            outcomes.add("single" if block == 1 else "full" if mismatch is None else "rejected")
            expected.append(block if mismatch is None else mismatch + 1)
            nfe += 1 if block == 1 else 2
            n += expected[-1]
        assert res.accepted[b] == expected, b
        assert int(res.nfe[b]) == nfe and int(res.rounds[b]) == len(expected)
    assert {"full", "rejected"} <= outcomes  # both kinds of round were checked


# --- truncated sampling stays exact ------------------------------------------------------------
def reference_top_k(logits, k):
    out = logits.clone()
    for idx in itertools.product(*[range(s) for s in logits.shape[:-1]]):
        row = out[idx]
        keep = torch.argsort(row, descending=True)[:k]
        mask = torch.ones_like(row, dtype=torch.bool)
        mask[keep] = False
        row[mask] = -math.inf
    return out


def reference_top_p(logits, p):
    out = logits.clone()
    for idx in itertools.product(*[range(s) for s in logits.shape[:-1]]):
        row = out[idx]
        probs = torch.softmax(row, -1)
        order = torch.argsort(probs, descending=True)
        total, keep = 0.0, []
        for j in order.tolist():
            keep.append(j)
            total += float(probs[j])
            if total >= p:
                break
        mask = torch.ones_like(row, dtype=torch.bool)
        mask[keep] = False
        row[mask] = -math.inf
    return out


@pytest.mark.parametrize("control", [dict(top_k=3), dict(top_p=0.7), dict(top_k=4, temperature=0.6),
                                     dict(top_p=0.8, temperature=0.6)])
@pytest.mark.parametrize("method,draft,k", [("sequential", "self", 1), ("assd", "self", 3),
                                            ("assd", "self", 5), ("assd", "ngram", 3)])
def test_truncated_sampling_matches_exact_truncated_chain(small, control, method, draft, k):
    T = control.get("temperature", 1.0)

    def transform(logits):
        x = logits / T
        if "top_k" in control:
            x = reference_top_k(x, control["top_k"])
        if "top_p" in control:
            x = reference_top_p(x, control["top_p"])
        return x

    key = tuple(sorted(control.items()))
    if key not in _truncated:
        _truncated[key] = exact_joint(small, INPUT, MASKED, HIDDEN, transform=transform)
    joint = _truncated[key]
    res = sample(small, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), method=method, draft=draft,
                 k=k, seed=stable_seed(method, draft, k, key), **control)
    _, p = g_test(draws(res, MASKED), joint)  # a sample outside the truncated support fails outright
    assert p > ALPHA, f"{control} {method}/{draft}/k={k}: p={p:.2e}"


_truncated: dict = {}


def test_truncation_negative_control(small):
    """Untruncated samples are rejected against the truncated joint."""
    joint = exact_joint(small, INPUT, MASKED, HIDDEN, transform=lambda x: reference_top_k(x, 3))
    res = sample(small, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), k=3, seed=0)
    _, p = g_test(draws(res, MASKED), joint)
    assert p < 1e-6
