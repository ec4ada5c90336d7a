"""Statistical exactness: every sampler draws the exact chain joint of the model.

The reference joint is enumerated by the chain rule from `transformers`' XLNet (see exact.py).
Each configuration draws thousands of rows in one batch at a fixed seed and must pass a G-test
at ALPHA; a negative control (independent per-position sampling) must fail it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from asarm.sampling import sample
from conftest import tiny_model
from exact import exact_joint, g_test, mixture, stable_seed

ALPHA = 1e-3
N_SAMPLES = 3000

# A tiny model (vocab 8 incl. the mask token) and a row with 3 hidden positions: 7^3 outcomes.
INPUT = torch.tensor([1, 3, 0, 0, 4, 0, 2])
MASKED = torch.tensor([0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
HIDDEN = torch.nonzero(MASKED).flatten().tolist()
PERMUTATION = [5, 2, 3]

SAMPLERS = [("sequential", "self", 1)] + [("assd", d, k) for d in ("self", "ngram") for k in (2, 3, 5)]
ORDERS = ["left-to-right", "random", "permutation"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


_joint_cache: dict = {}


def reference(model, temperature, order_name, input_ids=INPUT, masked=MASKED):
    key = (temperature, order_name, tuple(input_ids.tolist()), tuple(masked.tolist()))
    if key not in _joint_cache:
        hidden = torch.nonzero(masked).flatten().tolist()
        if order_name == "left-to-right":
            joint = exact_joint(model, input_ids, masked, hidden, temperature)
        elif order_name == "permutation":
            joint = exact_joint(model, input_ids, masked, PERMUTATION, temperature)
        else:  # "random": uniform mixture over every order
            joint = mixture([exact_joint(model, input_ids, masked, list(o), temperature)
                             for o in itertools.permutations(hidden)])
        _joint_cache[key] = joint
    return _joint_cache[key]


def draws(result, masked_row):
    hidden = torch.nonzero(masked_row).flatten()
    return [tuple(row[hidden].tolist()) for row in result.input_ids]


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("order_name", ORDERS)
@pytest.mark.parametrize("method,draft,k", SAMPLERS)
def test_sampler_matches_exact_joint(model, method, draft, k, temperature, order_name):
    order = PERMUTATION if order_name == "permutation" else order_name
    batch_order = [PERMUTATION] * N_SAMPLES if order_name == "permutation" else order
    seed = stable_seed(method, draft, k, temperature, order_name)
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), method=method,
                    draft=draft, k=k, temperature=temperature, order=batch_order, seed=seed)
    _, p = g_test(draws(result, MASKED), reference(model, temperature, order_name))
    assert p > ALPHA, f"{method}/{draft}/k={k}/T={temperature}/{order}: G-test p={p:.2e}"
    # visible tokens never change; the mask token is never produced
    assert torch.equal(result.input_ids[:, ~MASKED], INPUT[~MASKED].expand(N_SAMPLES, -1))
    assert not (result.input_ids == model.config.mask_token_id).any()


@pytest.mark.parametrize("method,draft,k", [("sequential", "self", 1), ("assd", "self", 3), ("assd", "ngram", 2)])
def test_full_recompute_matches_exact_joint(model, method, draft, k):
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), method=method,
                    draft=draft, k=k, cache=False, seed=11)
    _, p = g_test(draws(result, MASKED), reference(model, 1.0, "left-to-right"))
    assert p > ALPHA


def test_unconditional_generation_is_exact(model):
    """Nothing visible: the first factor is the model's query with no key (see model.py)."""
    ids = torch.full((3,), 6)
    masked = torch.ones(3, dtype=torch.bool)
    result = sample(model, ids.repeat(N_SAMPLES, 1), masked.repeat(N_SAMPLES, 1), k=3, seed=5)
    _, p = g_test(draws(result, masked), reference(model, 1.0, "left-to-right", ids, masked))
    assert p > ALPHA


def test_mixed_batch_rows_follow_their_own_joint(model):
    """Rows with different hidden sets and lengths share passes; each keeps its exact joint."""
    other_ids = torch.tensor([4, 0, 0, 1, 0, 5, 5])  # 5 real tokens, then padding
    other_masked = torch.tensor([0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    half = N_SAMPLES // 2
    ids = torch.cat([INPUT.repeat(half, 1), other_ids.repeat(half, 1)])
    masked = torch.cat([MASKED.repeat(half, 1), other_masked.repeat(half, 1)])
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[half:, 5:] = False
    result = sample(model, ids, masked, attention_mask=attn, k=3, seed=21)
    first = draws(type(result)(**{**result.__dict__, "input_ids": result.input_ids[:half]}), MASKED)
    second = draws(type(result)(**{**result.__dict__, "input_ids": result.input_ids[half:]}), other_masked)
    _, p1 = g_test(first, reference(model, 1.0, "left-to-right"))
    short_ref = reference(model, 1.0, "left-to-right", other_ids[:5], other_masked[:5])
    _, p2 = g_test(second, short_ref)
    assert p1 > ALPHA and p2 > ALPHA
    assert torch.equal(result.input_ids[half:, 5:], other_ids[5:].expand(half, -1))


def test_negative_control_fails(model):
    """Sampling each hidden position independently from p(x_j | visible) is NOT the chain
    joint; the test must reject it, showing it has the power to catch a wrong sampler."""
    from asarm.sampling import TargetDistribution

    logits_rows = []
    for pos in HIDDEN:
        query_pos = torch.tensor([[pos]])
        content_pos = torch.nonzero(~MASKED).flatten()[None]
        logits = model.forward_rows(INPUT[~MASKED][None], content_pos, torch.zeros_like(content_pos),
                                    query_pos, torch.ones_like(query_pos))
        logits_rows.append(TargetDistribution(model.config.mask_token_id).probs(logits)[0, 0].detach())
    gen = torch.Generator().manual_seed(0)
    columns = [torch.multinomial(p, N_SAMPLES, replacement=True, generator=gen) for p in logits_rows]
    independent = list(zip(*[c.tolist() for c in columns]))
    _, p = g_test(independent, reference(model, 1.0, "left-to-right"))
    assert p < 1e-6, f"negative control was not rejected (p={p:.2e})"


@pytest.mark.parametrize("draft", ["self", "ngram"])
def test_negative_control_wrong_residual_fails(model, monkeypatch, draft):
    """The classic speculative-sampling bug: a rejected draft replaced by a draw from the target
    itself instead of normalize(max(0, q - p)). It must be rejected too."""
    from asarm import sampling

    monkeypatch.setattr(sampling.target, "residual", lambda target, proposal: target)
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), method="assd", draft=draft,
                    k=3, seed=0)
    _, p = g_test(draws(result, MASKED), reference(model, 1.0, "left-to-right"))
    assert p < 1e-6, f"a sampler with the wrong residual was not rejected (p={p:.2e})"


VARIANTS = {
    "bonus": dict(bonus=True),
    "one-pass": dict(one_pass=True),
    "adaptive-k": dict(adaptive_k=True),
    "one-pass+adaptive-k": dict(one_pass=True, adaptive_k=True),
    "ngram+bonus+adaptive-k": dict(draft="ngram", bonus=True, adaptive_k=True),
}


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("order_name", ["left-to-right", "random"])
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_faster_variants_match_exact_joint(model, variant, k, order_name, temperature):
    seed = stable_seed(variant, k, order_name, temperature)
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), k=k,
                    temperature=temperature, order=order_name, seed=seed, **VARIANTS[variant])
    _, p = g_test(draws(result, MASKED), reference(model, temperature, order_name))
    assert p > ALPHA, f"{variant}/k={k}/T={temperature}/{order_name}: G-test p={p:.2e}"
