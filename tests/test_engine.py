"""The sampling engine's pieces: the pure verify step (hand-made p/q, no model), the target
distribution's numerics, DecodeConfig, and rows joining and leaving a running engine."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest

from asarm import DecodeConfig, InputError
from asarm.errors import Cancelled
from asarm.sampling import Engine, TargetDistribution, draw, sample, verify
from conftest import tiny_model
from exact import g_test

ALPHA = 1e-3
N = 20000


def _dist(*weights):
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


P = torch.stack([_dist(5, 1, 1, 3), _dist(1, 1, 6, 2), _dist(2, 2, 2, 4)])  # proposals, K=3 positions
Q = torch.stack([_dist(1, 3, 2, 4), _dist(1, 1, 6, 2), _dist(4, 1, 1, 4)])  # targets
BONUS = _dist(1, 2, 3, 4)


def _run_verify(seed=0, n_drafts=3, bonus=True):
    g = torch.Generator().manual_seed(seed)
    drafts = torch.stack([draw(P[i].expand(N, -1), torch.rand(N, generator=g, dtype=torch.float64))
                          for i in range(3)], 1)
    verdict = verify(drafts, P.expand(N, -1, -1), Q.expand(N, -1, -1), torch.full((N,), n_drafts),
                     torch.rand(N, 3, generator=g, dtype=torch.float64), torch.rand(N, generator=g, dtype=torch.float64),
                     bonus_probs=BONUS.expand(N, -1) if bonus else None)
    return drafts, verdict


def _token_at(drafts, verdict, i):
    """The token the round produces at position i (draft if accepted, else the replacement)."""
    ok = verdict.n_accepted > i
    return torch.where(ok, drafts[:, i], verdict.next_token), verdict.n_accepted >= i


def test_verify_first_acceptance_rate_is_overlap():
    drafts, verdict = _run_verify()
    overlap = float(torch.minimum(P[0], Q[0]).sum())
    accepted = int((verdict.n_accepted >= 1).sum())
    assert binomtest(accepted, N, overlap).pvalue > ALPHA


@pytest.mark.parametrize("i", [0, 1, 2])
def test_verify_output_at_each_position_follows_the_target(i):
    drafts, verdict = _run_verify(seed=i + 1)
    tokens, reached = _token_at(drafts, verdict, i)
    samples = [(int(t),) for t in tokens[reached]]
    _, p = g_test(samples, {(v,): float(Q[i, v]) for v in range(4)})
    assert p > ALPHA


def test_verify_replacement_follows_the_residual():
    drafts, verdict = _run_verify(seed=7)
    rejected_first = verdict.n_accepted == 0
    rest = (Q[0] - P[0]).clamp(min=0)
    rest = rest / rest.sum()
    samples = [(int(t),) for t in verdict.next_token[rejected_first]]
    _, p = g_test(samples, {(v,): float(rest[v]) for v in range(4)})
    assert p > ALPHA
    assert set(t for (t,) in samples) <= {v for v in range(4) if rest[v] > 0}


def test_verify_bonus_after_full_acceptance_and_none_without():
    drafts, verdict = _run_verify(seed=9)
    full = verdict.n_accepted == 3
    samples = [(int(t),) for t in verdict.next_token[full]]
    _, p = g_test(samples, {(v,): float(BONUS[v]) for v in range(4)})
    assert p > ALPHA
    _, plain = _run_verify(seed=9, bonus=False)
    assert bool((plain.next_token[plain.n_accepted == 3] == -1).all())
    assert bool((plain.next_token[plain.n_accepted < 3] >= 0).all())


def test_verify_next_token_is_the_residual_or_the_bonus_draw_exactly():
    """The next token is one draw with u_next: from normalize(max(0, q_j - p_j)) at a rejection,
    from the bonus distribution after a full accept, whether the bonus comes as a tensor
    (``bonus_probs``) or as a row of the targets (``bonus_rows``, the engine's way), one row or
    a batch; token for token what ``draw`` gives on those distributions."""
    from asarm.sampling.target import residual

    drafts, verdict = _run_verify(seed=4)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):  # (the draft uniforms of _run_verify)
        torch.rand(N, generator=g, dtype=torch.float64)
    u_accept = torch.rand(N, 3, generator=g, dtype=torch.float64)
    u_next = torch.rand(N, generator=g, dtype=torch.float64)
    j = verdict.n_accepted.clamp(max=2)
    rejected = verdict.n_accepted < 3
    expected = torch.where(rejected, draw(residual(Q[j], P[j]), u_next), draw(BONUS.expand(N, -1), u_next))
    assert torch.equal(verdict.next_token, expected)
    targets = torch.cat([Q, BONUS[None]])[None].expand(N, -1, -1)  # the bonus as query row 3
    as_rows = verify(drafts, P.expand(N, -1, -1), targets, torch.full((N,), 3), u_accept, u_next,
                     target_rows=torch.arange(3).expand(N, -1), bonus_rows=torch.full((N,), 3))
    assert torch.equal(as_rows.next_token, expected) and torch.equal(as_rows.n_accepted, verdict.n_accepted)
    assert torch.equal(as_rows.next_prob, verdict.next_prob)
    for i in range(20):  # one row at a time (the engine's single-row path)
        one = verify(drafts[i : i + 1], P[None], targets[:1], torch.tensor([3]), u_accept[i : i + 1], u_next[i : i + 1],
                     target_rows=torch.arange(3)[None], bonus_rows=torch.tensor([3]))
        assert int(one.next_token) == int(expected[i]) and int(one.n_accepted) == int(verdict.n_accepted[i])


def test_verify_ignores_padding_and_accepts_identical_proposals():
    _, verdict = _run_verify(seed=3, n_drafts=1)
    assert int(verdict.n_accepted.max()) <= 1
    same = verify(torch.tensor([[2, 0]]), Q[:2][None], Q[:2][None], torch.tensor([2]),
                  torch.tensor([[0.999, 0.999]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    assert int(same.n_accepted[0]) == 2 and int(same.next_token[0]) == -1


def test_host_lists_one_transfer_reads_what_the_tensors_hold():
    """A pass's decisions reach the host as Python values: read in place on the CPU, or in one
    float64 transfer from an accelerator; both give the same ints and floats."""
    from asarm.sampling.engine import host_lists

    parts = [torch.tensor([3, -1, 8191]), torch.tensor([0.1, 1e-30], dtype=torch.float32),
             torch.tensor([[0.25, 1 / 3]], dtype=torch.float64), torch.zeros(0, dtype=torch.long)]
    direct, packed = host_lists(parts), host_lists(parts, one_transfer=True)
    assert direct == packed == [[3, -1, 8191], [float(parts[1][0]), float(parts[1][1])], [[0.25, 1 / 3]], []]
    assert all(type(x) is int for x in packed[0])


def test_draw_never_returns_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64).expand(5, -1)
    u = torch.tensor([0.0, 0.25, 0.5, 0.999999, 1.0 - 1e-17], dtype=torch.float64)
    assert draw(probs, u).tolist() == [1, 1, 3, 3, 3]
    # float32 probabilities whose tiny trailing mass vanishes in the float64 sum: the largest u
    # below 1 still lands on a token with mass, and u = 1 itself (the guard) on the token at
    # which the cdf reaches its total
    tail = torch.tensor([[0.0, 0.25, 0.75, 1e-30, 0.0]], dtype=torch.float32).expand(3, -1)
    assert draw(tail, torch.tensor([0.25, 1.0 - 2.0**-53, 1.0], dtype=torch.float64)).tolist() == [2, 2, 2]


def test_tiny_temperature_is_finite_and_equals_greedy():
    logits = torch.randn(4, 3, 11, generator=torch.Generator().manual_seed(0))
    greedy = TargetDistribution(0, greedy=True).probs(logits)
    for t in (1e-8, 1e-38, 1e-40, 1e-300):
        probs = TargetDistribution(0, temperature=t).probs(logits)
        assert not torch.isnan(probs).any()
        assert torch.allclose(probs.double(), greedy.double())


def test_suppressed_tokens_are_never_drawn():
    model = tiny_model(seed=1)
    ids = torch.zeros(200, 6, dtype=torch.long)
    masked = torch.ones(200, 6, dtype=torch.bool)
    res = sample(model, ids, masked, k=3, seed=0, suppress=(1, 2))
    assert not bool(((res.input_ids == 1) | (res.input_ids == 2)).any())


def test_decode_config_validates_and_names():
    assert DecodeConfig().name == "assd-self-k5"
    assert DecodeConfig("assd", "self", 3, one_pass=True).name == "assd-self-k3+one-pass"
    assert DecodeConfig("sequential", k=1).name == "sequential"
    for bad in (dict(k=0), dict(method="beam"), dict(draft="oracle"), dict(temperature=0), dict(top_p=1.5),
                dict(top_k=0), dict(draft="ngram", one_pass=True), dict(suppress=(-1,))):
        with pytest.raises(InputError):
            DecodeConfig(**bad)


# --- rows joining and leaving a running engine ----------------------------------------------------
def _rows(model, count, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (count, length), generator=g)
    ids[ids == model.config.mask_token_id] = 1
    masked = torch.rand(count, length, generator=g) < 0.7
    return ids, masked


@pytest.mark.parametrize("config", [DecodeConfig(k=3), DecodeConfig(k=3, one_pass=True, adaptive_k=True),
                                    DecodeConfig("assd", "ngram", 2, bonus=True), DecodeConfig("sequential"),
                                    DecodeConfig(k=4, cache=False), DecodeConfig(k=3, branches=2, bonus=True),
                                    DecodeConfig(k=3, one_pass=True, branches=3)])
def test_row_result_is_the_same_alone_in_a_batch_or_joining_late(config):
    model = tiny_model(seed=2)
    ids, masked = _rows(model, 6)
    alone = Engine(model, cache=config.cache)
    h = alone.add(ids[0], masked[0], config, seed=11, order="random")
    alone.run()
    expected = h.result()

    together = Engine(model, cache=config.cache)
    handles = [together.add(ids[b], masked[b], config, seed=11 if b == 0 else b, order="random") for b in range(6)]
    together.run()
    assert torch.equal(handles[0].result().input_ids, expected.input_ids)

    late = Engine(model, cache=config.cache)
    others = [late.add(ids[b], masked[b], config, seed=b, order="random") for b in range(1, 6)]
    for _ in range(2):
        late.step()
    joined = late.add(ids[0], masked[0], config, seed=11, order="random")
    late.run()
    assert torch.equal(joined.result().input_ids, expected.input_ids)
    assert joined.result().nfe == expected.nfe and joined.result().accepted == expected.accepted
    for b, h in enumerate(others, start=1):  # the rows already running are unaffected too
        solo = Engine(model, cache=config.cache)
        s = solo.add(ids[b], masked[b], config, seed=b, order="random")
        solo.run()
        assert torch.equal(h.result().input_ids, s.result().input_ids)


def test_engine_grows_for_a_longer_row_and_cancel_frees_it():
    model = tiny_model(seed=2)
    short_ids, short_masked = _rows(model, 1, length=5, seed=1)
    long_ids, long_masked = _rows(model, 2, length=14, seed=2)
    engine = Engine(model)
    a = engine.add(short_ids[0], short_masked[0], DecodeConfig(k=2), seed=0)
    engine.step()
    b = engine.add(long_ids[0], long_masked[0], DecodeConfig(k=2), seed=1)
    c = engine.add(long_ids[1], long_masked[1], DecodeConfig(k=2), seed=2)
    engine.cancel(c)
    assert engine.active == 2 and c.cancelled
    engine.run()
    assert a.done and b.done and not c.done
    with pytest.raises(Cancelled, match="cancelled"):  # it used to return the mask ids as its text
        c.result()
    solo = Engine(model)
    s = solo.add(long_ids[0], long_masked[0], DecodeConfig(k=2), seed=1)
    solo.run()
    assert torch.equal(b.result().input_ids, s.result().input_ids)


def test_engine_rejects_mismatched_rows():
    model = tiny_model(seed=2)
    ids, masked = _rows(model, 2)
    engine = Engine(model, cache=True)
    with pytest.raises(InputError):
        engine.add(ids[0], masked[0], DecodeConfig(cache=False))
    with pytest.raises(InputError):
        engine.add(ids, masked)  # a batch is not one row
    with pytest.raises(InputError):
        engine.add(ids[0], masked[0], seed=1.5)


def test_sample_accepts_a_config_and_keywords_alike():
    model = tiny_model(seed=2)
    ids, masked = _rows(model, 3)
    a = sample(model, ids, masked, DecodeConfig(k=2, bonus=True), seed=5)
    b = sample(model, ids, masked, k=2, bonus=True, seed=5)
    assert torch.equal(a.input_ids, b.input_ids)
    assert math.isclose(a.tokens_per_round, b.tokens_per_round)


def test_rows_with_different_targets_share_an_engine_and_keep_their_results():
    model = tiny_model(seed=2)
    ids, masked = _rows(model, 5)
    configs = [DecodeConfig(k=3), DecodeConfig(k=3, greedy=True), DecodeConfig(k=2, temperature=0.5, top_k=3),
               DecodeConfig(k=3, branches=3), DecodeConfig(k=4, one_pass=True, branches=2)]  # chains and trees in one pass
    engine = Engine(model)
    handles = [engine.add(ids[b], masked[b], c, seed=b) for b, c in enumerate(configs)]
    engine.run()
    for b, (h, c) in enumerate(zip(handles, configs)):
        solo = Engine(model)
        s = solo.add(ids[b], masked[b], c, seed=b)
        solo.run()
        assert torch.equal(h.result().input_ids, s.result().input_ids)


def test_engine_builds_no_autograd_graph():
    model = tiny_model(seed=2)
    ids, masked = _rows(model, 2)
    engine = Engine(model)
    engine.add(ids[0], masked[0], seed=0)
    engine.step()
    assert all(not k.requires_grad and k.grad_fn is None for k in engine.cache.keys)
