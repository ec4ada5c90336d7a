"""The fast inference pass (asarm/fastpass.py): the same logits as the eager pass, the same
exact samplers on top of it, and a quiet fall-back to eager where it cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch

from asarm import fastpass
from asarm import quantize as quant
from asarm.cache import ContentCache
from asarm.checkpoint import load_model, save_model
from asarm.model import ASARM
from asarm.sampling import sample
from conftest import random_rows, tiny_model
from exact import exact_joint, g_test, stable_seed

FP32_TOLERANCE = 1e-4
ALPHA = 1e-3
N_SAMPLES = 3000


def wider_model(seed=0, **overrides) -> ASARM:
    """Big enough that fused and separate projections take different GEMM paths."""
    base = dict(vocab_size=40, d_model=48, n_head=4, d_inner=96, n_layer=3, initializer_range=0.3)
    base.update(overrides)
    return tiny_model(seed, **base)


def chain(model, ids, ranks):
    with torch.no_grad():
        return model.chain_logits(ids, ranks)[0]


def both(model, fn):
    """fn(model) with the eager pass, then with the fast pass."""
    model.use_fast_path(False)
    eager = fn(model)
    model.use_fast_path(True)
    assert model.fast_path
    return eager, fn(model)


def batch_ranks(B=4, L=24, seed=0):
    ids, masked = random_rows(B, L, 40, seed=seed)
    ranks = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        hidden = torch.nonzero(masked[b]).flatten()
        ranks[b, hidden[torch.randperm(len(hidden), generator=torch.Generator().manual_seed(b))]] = \
            torch.arange(1, len(hidden) + 1)
    ranks[1, L - 5:] = -1  # padding
    return ids, ranks


def test_full_recompute_logits_equal_eager_fp32():
    model = wider_model(1)
    ids, ranks = batch_ranks()
    eager, fast = both(model, lambda m: chain(m, ids, ranks))
    assert (eager - fast).abs().max() <= FP32_TOLERANCE


def cached_passes(model, B=3):
    """A prefill pass, then a verify-like pass where batch rows carry different numbers of
    content and query rows (padding rows in both), all through one ContentCache."""
    g = torch.Generator().manual_seed(5)
    cache = ContentCache(model, B, 40)
    table = model.relative_table(40)
    out = []
    with torch.no_grad():
        pos = torch.arange(12).expand(B, 12)
        ids = torch.randint(0, 6, (B, 12), generator=g)
        rank = torch.zeros(B, 12, dtype=torch.long)
        out.append(model.forward_rows(ids, pos, rank, torch.full((B, 1), 12), torch.ones(B, 1, dtype=torch.long),
                                      cache=cache, rel_table=table))
        cache.commit(torch.full((B,), 12))
        n_content = torch.tensor([3, 0, 1])[:B]
        n_query = torch.tensor([4, 1, 2])[:B]
        N, Q = int(n_content.max()), int(n_query.max())
        cpos = (12 + torch.arange(N)).expand(B, N).clone()
        crank = (1 + torch.arange(N)).expand(B, N).clone()
        crank[torch.arange(N)[None] >= n_content[:, None]] = 2**40  # padding content rows
        qpos = (12 + torch.arange(Q)).expand(B, Q).clone()
        qrank = (1 + torch.arange(Q)).expand(B, Q).clone()
        qrank[torch.arange(Q)[None] >= n_query[:, None]] = 0  # padding query rows
        cids = torch.randint(0, 6, (B, N), generator=g)
        out.append(model.forward_rows(cids, cpos, crank, qpos, qrank, cache=cache, rel_table=table))
        cache.commit(n_content)
        # one more pass over what was committed: the cache holds the fast pass's keys too
        out.append(model.forward_rows(cids[:, :1], cpos[:, :1] + 4, crank[:, :1].clamp(max=5) + 4, qpos[:, :1] + 5,
                                      torch.full((B, 1), 9), cache=cache, rel_table=table))
    return out


def test_cached_passes_with_padding_rows_equal_eager_fp32():
    model = wider_model(2)
    eager, fast = both(model, cached_passes)
    for e, f in zip(eager, fast):
        assert e.shape == f.shape
        assert (e - f).abs().max() <= FP32_TOLERANCE


def bf16_errors(model, ids, ranks):
    """(eager, fast) bf16 logits' errors against the same model in fp32: (max, mean) each."""
    reference = chain(model, ids, ranks)
    model.to(torch.bfloat16)
    eager, fast = both(model, lambda m: chain(m, ids, ranks).float())
    assert fast.shape == reference.shape
    return [((x - reference).abs().max(), (x - reference).abs().mean()) for x in (eager, fast)]


def test_bf16_fast_pass_is_as_close_to_fp32_as_eager_bf16():
    """Both bf16 passes round differently (other kernels, other summation orders); neither is
    the reference, so the fast one must be as close to the fp32 model as eager bf16 is."""
    model = wider_model(3)
    ids, ranks = batch_ranks(seed=1)
    (eager_max, eager_mean), (fast_max, fast_mean) = bf16_errors(model, ids, ranks)
    assert model._fast_pass.kernel == ("onednn" if fastpass.onednn_bf16_available() else "addmm")
    assert fast_max <= 1.5 * eager_max and fast_mean <= 1.5 * eager_mean


def test_bf16_without_native_support_uses_addmm(monkeypatch):
    monkeypatch.setattr(fastpass, "onednn_bf16_available", lambda: False)
    model = wider_model(3)
    ids, ranks = batch_ranks(seed=1)
    (eager_max, eager_mean), (fast_max, fast_mean) = bf16_errors(model, ids, ranks)
    assert model._fast_pass.kernel == "addmm"
    assert fast_max <= 1.5 * eager_max and fast_mean <= 1.5 * eager_mean


def test_int8_fast_pass_multiplies_by_the_dequantized_weights():
    model = quant.quantize_model(wider_model(4), "int8")
    ids, ranks = batch_ranks(seed=2)
    eager, fast = both(model, lambda m: chain(m, ids, ranks))
    assert (eager - fast).abs().max() <= FP32_TOLERANCE


def test_samplers_give_the_same_tokens_fast_and_eager_fp32():
    model = wider_model(5)
    ids, masked = random_rows(6, 20, 40, seed=3)
    for kw in (dict(method="sequential"), dict(method="assd", k=4), dict(method="assd", k=3, one_pass=True),
               dict(method="assd", draft="ngram", k=3, adaptive_k=True)):
        eager, fast = both(model, lambda m: sample(m, ids, masked, seed=7, **kw))
        assert torch.equal(eager.input_ids, fast.input_ids), kw
        assert torch.equal(eager.nfe, fast.nfe)


def test_greedy_assd_equals_greedy_sequential_on_the_fast_pass():
    model = wider_model(6).use_fast_path()
    ids, masked = random_rows(4, 20, 40, seed=4)
    seq = sample(model, ids, masked, method="sequential", greedy=True, seed=0)
    for kw in (dict(k=3), dict(k=5, one_pass=True)):
        assd = sample(model, ids, masked, method="assd", greedy=True, seed=1, **kw)
        assert torch.equal(seq.input_ids, assd.input_ids)


# --- exactness on the fast pass: G-tests against `transformers`' XLNet (see exact.py) ---------
INPUT = torch.tensor([1, 3, 0, 0, 4, 0, 2])
MASKED = torch.tensor([0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)


@pytest.fixture(scope="module")
def fast_model():
    model = tiny_model(seed=3).use_fast_path()
    assert model.fast_path
    return model


@pytest.fixture(scope="module")
def joint(fast_model):
    hidden = torch.nonzero(MASKED).flatten().tolist()
    return {t: exact_joint(fast_model, INPUT, MASKED, hidden, t) for t in (0.7, 1.0)}


@pytest.mark.parametrize("kw", [dict(method="sequential"), dict(method="assd", k=3),
                                dict(method="assd", k=3, one_pass=True), dict(method="assd", draft="ngram", k=2),
                                dict(method="assd", k=2, adaptive_k=True, bonus=True)],
                         ids=["sequential", "assd-self", "one-pass", "ngram", "adaptive-bonus"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_fast_pass_samplers_match_the_exact_joint(fast_model, joint, kw, temperature, monkeypatch):
    calls = []
    original = fastpass.FastPass.forward_rows
    monkeypatch.setattr(fastpass.FastPass, "forward_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = sample(fast_model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), temperature=temperature,
                    seed=stable_seed("fast", temperature, *kw.items()), **kw)
    assert calls, "the fast pass was not used"
    hidden = torch.nonzero(MASKED).flatten()
    _, p = g_test([tuple(r[hidden].tolist()) for r in result.input_ids], joint[temperature])
    assert p > ALPHA, f"{kw} T={temperature}: G-test p={p:.2e}"


def test_negative_control_fails_on_the_fast_pass(fast_model, joint):
    """Independent per-position draws (no chain) must fail the same G-test."""
    hidden = torch.nonzero(MASKED).flatten()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ranks = torch.zeros(1, 7, dtype=torch.long)
        ranks[0, hidden] = 1  # every hidden position sees only the visible tokens
        logits, _, _ = fast_model.chain_logits(INPUT[None], ranks)
    logits[..., fast_model.config.mask_token_id] = -float("inf")
    probs = torch.softmax(logits[0].double(), -1)
    draws = torch.multinomial(probs, N_SAMPLES, replacement=True, generator=g).T
    _, p = g_test([tuple(r.tolist()) for r in draws], joint[1.0])
    assert p < ALPHA


# --- the switch, rebuilds and fall-backs ----------------------------------------------------------
def test_load_model_turns_the_fast_pass_on_for_cpu_and_keeps_fp32(tmp_path):
    save_model(wider_model(7), tmp_path / "m")
    assert load_model(tmp_path / "m", device="cpu").fast_path
    assert load_model(tmp_path / "m", device="cpu").dtype == torch.float32
    assert not load_model(tmp_path / "m", device="cpu", fast_path=False).fast_path


def test_fast_pass_follows_new_weights_and_training_mode():
    model = wider_model(8).use_fast_path()
    ids, ranks = batch_ranks(seed=3)
    other = wider_model(9)
    model.load_state_dict(other.state_dict())
    assert model.fast_path
    assert (chain(model, ids, ranks) - chain(other, ids, ranks)).abs().max() <= FP32_TOLERANCE
    model.train()
    assert not model.fast_path  # training always runs eager (gradients, dropout)
    model.eval()
    assert model.fast_path
    model.to(torch.bfloat16)
    assert model.fast_path and model._fast_pass.dtype == torch.bfloat16


def test_gradients_take_the_eager_pass():
    model = wider_model(10).use_fast_path()
    ids, ranks = batch_ranks(seed=4)
    logits = model.chain_logits(ids, ranks)[0]  # grad mode on: eager, differentiable
    assert logits.requires_grad


def test_a_fast_pass_that_cannot_be_built_warns_once_and_runs_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN in this build\nsecond line")

    monkeypatch.setattr(fastpass, "FastPass", broken)
    model = wider_model(11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.use_fast_path()
    assert not model.fast_path
    assert len(caught) == 1 and "no oneDNN in this build" in str(caught[0].message)
    assert "second line" not in str(caught[0].message)
    ids, masked = random_rows(2, 10, 40, seed=5)
    assert sample(model, ids, masked, seed=0).input_ids.shape == ids.shape


# --- asarm bench --suite pass, on tiny models (the timings themselves live in results/) ---------
def test_pass_bench_tables_and_plot(tmp_path, monkeypatch):
    from asarm.bench import passes as bench_pass

    monkeypatch.setattr(bench_pass, "ROWS", (1, 11))
    monkeypatch.setattr(bench_pass, "SAMPLERS", {k: bench_pass.SAMPLERS[k] for k in ("sequential", "ASSD one-pass k=5")})
    models = {"eager fp32": wider_model(12), "fast fp32": wider_model(12).use_fast_path()}
    passes = bench_pass.bench_passes(models, length=16, rounds=1, passes=1, seed=0)
    assert {(r["build"], r["rows"]) for r in passes} == {(b, n) for b in models for n in bench_pass.ROWS}
    assert all(r["seconds_per_pass"] > 0 for r in passes)
    samplers, protocol = bench_pass.bench_samplers(models, "random-base", 16, seeds=1, seed=0)
    assert "95% hidden" in protocol
    assert {(r["sampler"], r["build"]) for r in samplers} == {(s, b) for s in bench_pass.SAMPLERS for b in models}
    reference = [r for r in samplers if r["sampler"] == "sequential" and r["build"] == "eager fp32"]
    assert reference[0]["vs_eager_fp32_sequential"] == 1.0
    rows = [dict(model="tiny", threads=1, floor_seconds=1.0, floor_multiple=r["seconds_per_pass"], **r) for r in passes]
    assert "| tiny | 1 | fast fp32 |" in bench_pass.pass_table(rows)
    assert "| tiny | 1 | sequential | eager fp32 |" in bench_pass.sampler_table([dict(model="tiny", threads=1, **r) for r in samplers])
    bench_pass.plot(rows, tmp_path / "pass.png")
    assert (tmp_path / "pass.png").stat().st_size > 1000
