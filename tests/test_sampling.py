"""Sampler behaviour: cache exactness, accounting, determinism, input errors and edge cases."""

from __future__ import annotations

import copy

import pytest
import torch

from asarm.errors import InputError
from asarm.sampling import sample
from conftest import hf_reference, random_rows, tiny_model

VOCAB = 40


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1, vocab_size=VOCAB, d_model=32, n_layer=3, n_head=4, d_inner=64, initializer_range=0.2)


def random_batch(B=5, L=24, seed=0):
    return random_rows(B, L, VOCAB, seed)


def record_passes(model, monkeypatch):
    calls = []
    original = model.forward_rows

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.detach().clone())
        return out

    monkeypatch.setattr(model, "forward_rows", wrapped)
    return calls


@pytest.mark.parametrize("method,draft", [("sequential", "self"), ("assd", "self"), ("assd", "ngram")])
def test_cached_passes_equal_full_recompute(model, monkeypatch, method, draft):
    ids, masked = random_batch()
    attn = torch.ones_like(masked)
    attn[1, 18:] = False  # a shorter row
    runs = []
    for cache in (True, False):
        calls = record_passes(model, monkeypatch)
        res = sample(model, ids, masked, method=method, draft=draft, k=4, seed=3, cache=cache,
                     attention_mask=attn, order="random")
        monkeypatch.undo()
        runs.append((calls, res))
    (cached_calls, cached), (full_calls, full) = runs
    assert torch.equal(cached.input_ids, full.input_ids)
    assert torch.equal(cached.nfe, full.nfe)
    assert len(cached_calls) == len(full_calls)
    for a, b in zip(cached_calls, full_calls):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_cached_pass_equals_transformers(model):
    """The first query of a cached run equals `transformers`' XLNet on the same structure."""
    ids, masked = random_batch(B=1, L=12, seed=4)
    ids, masked = ids[0], masked[0]
    res = sample(model, ids, masked, method="sequential", seed=0, return_logprobs=True)
    hidden = torch.nonzero(masked).flatten()
    rank = torch.zeros(12, dtype=torch.long)
    rank[hidden] = torch.arange(1, len(hidden) + 1)
    perm = (masked[None, :] & (rank[:, None] <= rank[None, :])).float()
    tm = torch.zeros(len(hidden), 12)
    tm[torch.arange(len(hidden)), hidden] = 1
    ref = hf_reference(model)(res.input_ids[None], perm_mask=perm[None], target_mapping=tm[None]).logits[0]
    ref[:, model.config.mask_token_id] = -float("inf")
    logp = torch.log_softmax(ref, -1).gather(1, res.input_ids[hidden][:, None]).squeeze(1)
    assert torch.allclose(res.token_logprobs[hidden].float(), logp, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("draft", ["self", "ngram"])
def test_assd_accounting(model, k, draft):
    ids, masked = random_batch(B=6, L=30, seed=k)
    res = sample(model, ids, masked, k=k, draft=draft, seed=k)
    n_hidden = masked.sum(1)
    assert torch.equal(torch.tensor([sum(a) for a in res.accepted]), n_hidden)
    assert torch.equal(res.rounds, torch.tensor([len(a) for a in res.accepted]))
    assert (res.nfe <= n_hidden).all()  # passes never exceed tokens for k >= 2
    assert all(max(a, default=0) <= k for a in res.accepted)
    if draft == "self":
        # every round but a final single-position one yields >= 2 tokens: d_1 is always kept
        for row, acc in enumerate(res.accepted):
            assert all(a >= 2 for a in acc[:-1]) and (not acc or acc[-1] >= 1)
            # a draft pass + an oracle pass per round; a final single-position round (its one
            # token is the draft pass's exact conditional) needs no oracle pass
            assert int(res.nfe[row]) == 2 * len(acc) - (1 if acc and acc[-1] == 1 else 0)
        assert torch.equal(res.draft_calls, torch.tensor([len(a) for a in res.accepted]))
    else:
        assert torch.equal(res.nfe, res.rounds) and torch.equal(res.draft_calls, res.rounds)


def test_sequential_costs_one_pass_per_token(model):
    ids, masked = random_batch(seed=9)
    res = sample(model, ids, masked, method="sequential", seed=0)
    assert torch.equal(res.nfe, masked.sum(1))


@pytest.mark.parametrize("method,draft", [("sequential", "self"), ("assd", "self"), ("assd", "ngram")])
def test_same_seed_same_output_and_visible_kept(model, method, draft):
    ids, masked = random_batch(seed=5)
    a = sample(model, ids, masked, method=method, draft=draft, seed=42, order="random")
    b = sample(model, ids, masked, method=method, draft=draft, seed=42, order="random")
    c = sample(model, ids, masked, method=method, draft=draft, seed=43, order="random")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.nfe, b.nfe)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert torch.equal(a.input_ids[~masked], ids[~masked])
    assert not (a.input_ids[masked] == model.config.mask_token_id).any()


def test_row_result_does_not_depend_on_batch_mates(model):
    ids, masked = random_batch(B=4, seed=6)
    together = sample(model, ids, masked, seed=8)
    shuffled = sample(model, torch.cat([ids[:1], torch.flip(ids[1:], [0])]),
                      torch.cat([masked[:1], torch.flip(masked[1:], [0])]), seed=8)
    # row 0 has the same index and stream in both batches, different batch-mates
    assert torch.equal(together.input_ids[0], shuffled.input_ids[0])


def test_nothing_hidden_returns_input(model):
    ids, masked = random_batch(B=2, seed=1)
    res = sample(model, ids, torch.zeros_like(masked), seed=0)
    assert torch.equal(res.input_ids, ids) and res.nfe.tolist() == [0, 0]


def test_unconditional_generation(model):
    ids = torch.full((10,), 6)
    res = sample(model, ids, torch.ones(10, dtype=torch.bool), seed=0, k=4)
    assert res.input_ids.shape == (10,) and not (res.input_ids == 6).any()
    assert int(res.nfe) <= 10


def test_single_row_shapes(model):
    ids, masked = random_batch(B=1, seed=2)
    res = sample(model, ids[0], masked[0], seed=0)
    assert res.input_ids.shape == ids[0].shape and res.nfe.dim() == 0
    assert isinstance(res.accepted, list) and sum(res.accepted) == int(masked.sum())


def test_k1_assd_is_one_pass_per_token(model):
    ids, masked = random_batch(B=2, seed=3)
    res = sample(model, ids, masked, k=1, seed=0)
    assert torch.equal(res.nfe, masked.sum(1))


def test_callback_reports_every_token_once(model):
    ids, masked = random_batch(B=3, seed=12)
    seen = []
    res = sample(model, ids, masked, seed=1, callback=lambda row, pos, tok: seen.extend((row, p, t) for p, t in zip(pos, tok)))
    assert len(seen) == int(masked.sum())
    for row, p, t in seen:
        assert masked[row, p] and res.input_ids[row, p] == t


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(k=0), "k must be"),
        (dict(k=2.5), "k must be"),
        (dict(temperature=0.0), "greedy=True"),
        (dict(temperature=-1.0), "temperature"),
        (dict(method="beam"), "unknown method"),
        (dict(draft="gpt"), "unknown draft"),
        (dict(order="zigzag"), "unknown order"),
        (dict(order=[0, 1]), "not a permutation"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_options(model, kwargs, message):
    ids = torch.tensor([1, 2, 3, 4])
    masked = torch.tensor([False, True, True, False])
    with pytest.raises(InputError, match=message):
        sample(model, ids, masked, **kwargs)


def test_bad_inputs(model):
    ids = torch.tensor([1, 2, 3, 4])
    masked = torch.tensor([False, True, True, False])
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        sample(model, torch.tensor([1, 2, 3, VOCAB]), masked)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        sample(model, torch.tensor([-1, 2, 3, 4]), masked)
    with pytest.raises(InputError, match="shape"):
        sample(model, ids, masked[:3])
    with pytest.raises(InputError, match="bool"):
        sample(model, ids, masked.long())
    with pytest.raises(InputError, match="integer"):
        sample(model, ids.float(), masked)
    with pytest.raises(InputError, match=r"\[L\] or \[B, L\]"):
        sample(model, ids.view(1, 1, 4), masked.view(1, 1, 4))
    limited = tiny_model(max_length=3)
    with pytest.raises(InputError, match="longer than the model's limit"):
        sample(limited, ids, masked)


@pytest.mark.parametrize("options", [dict(method="sequential"), dict(), dict(draft="ngram"), dict(one_pass=True),
                                     dict(cache=False)])
def test_bf16_sampling_keeps_the_invariants(model, options):
    """bf16 weights and cache: visible tokens kept, no mask token, every hidden position filled,
    ASSD within one pass per token; the distributions are computed in float64 from bf16 logits."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    ids, masked = random_batch(B=4, L=20, seed=8)
    res = sample(low, ids, masked, seed=0, **options)
    assert torch.equal(res.input_ids[~masked], ids[~masked])
    assert (res.input_ids != low.config.mask_token_id).all() and (res.input_ids < VOCAB).all()
    assert (res.nfe <= masked.sum(1)).all()
    again = sample(low, ids, masked, seed=0, **options)
    assert torch.equal(res.input_ids, again.input_ids)
