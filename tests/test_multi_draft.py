"""Multi-draft verification (``branches`` > 1) keeps ASSD exact.

- The network: a pass whose content rows belong to several draft branches gives every branch's
  query rows exactly the logits of a pass holding that branch alone (eager and fast pass, with
  and without the cache), and committing a branch that is not the first moves its rows into
  place: the next pass equals one after committing that branch as a plain chain.
- The pure step: recursive rejection over independent candidates yields the target; a whole
  round (``verify_tree``) continued from the target follows the target's joint. Negative
  controls that must fail: a residual left unnormalized between siblings, and siblings all
  tested against the first target.
- ASSD with branches against the enumerated joint of tiny models (the suite's `transformers`
  reference, tests/exact.py): self and head drafts, 2 and 3 branches, k in {2, 3}, two
  temperatures, two-pass and one-pass rounds, the bonus, adaptive k, random order,
  top-k/top-p, without the cache. Greedy
  equals greedy sequential token for token.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from asarm.cache import ContentCache
from asarm.errors import InputError
from asarm.model import NO_KEY
from asarm.sampling import sample, verification
from asarm.sampling.config import DecodeConfig
from asarm.sampling.target import draw, residual as target_residual
from conftest import tiny_model
from exact import exact_joint, g_test, stable_seed
from test_block_verification import LONG_INPUT, LONG_MASKED, SMALL, greedy_case, top_k_top_p_joint
from test_draft_head import random_head
from test_exactness import INPUT, MASKED, draws, reference

ALPHA = 1e-3
N_SAMPLES = 3000


# --- the network: one attention mask per branch ------------------------------------------------
def _pass(model, contents, queries, cache=None, branches=None):
    """forward_rows for one row: contents [(pos, token, rank)], queries [(pos, rank)]."""
    c = torch.tensor(contents)[None]
    q = torch.tensor(queries)[None]
    if branches is not None:
        branches = tuple(torch.tensor(b)[None] for b in branches)
    return model.forward_rows(c[..., 1], c[..., 0], c[..., 2], q[..., 0], q[..., 1], cache=cache, branches=branches)[0]


VISIBLE = [(0, 1, 0), (1, 3, 0), (6, 2, 0)]  # positions 2..5 hidden, decoded in order 2, 3, 4, 5
FIRST = (2, 4, 1)  # the shared first draft
BRANCH_A, BRANCH_B = [(3, 5, 2), (4, 0, 3)], [(3, 7, 2), (4, 7, 3)]
QUERIES = [(3, 2), (4, 3), (5, 4)]  # each branch's targets after the first draft, and its bonus


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_each_branch_sees_only_its_own_drafts(fast, cached):
    model = tiny_model(seed=1, vocab_size=8).use_fast_path(fast, warn=False)
    alone = {}
    for name, branch in (("a", BRANCH_A), ("b", BRANCH_B)):
        cache = ContentCache(model, 1, 16) if cached else None
        alone[name] = _pass(model, VISIBLE + [FIRST] + branch, QUERIES, cache)
    cache = ContentCache(model, 1, 16) if cached else None
    contents = VISIBLE + [FIRST] + BRANCH_A + BRANCH_B
    together = _pass(model, contents, QUERIES * 2, cache,
                     ([0] * 4 + [1, 1, 2, 2], [1] * 3 + [2] * 3))
    torch.testing.assert_close(together[:3], alone["a"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[3:], alone["b"], rtol=1e-5, atol=1e-5)
    # the mask matters: without branch ids every query sees both branches and the logits differ
    mixed = _pass(model, contents, QUERIES * 2, ContentCache(model, 1, 16) if cached else None)
    assert not torch.allclose(mixed[1:3], alone["a"][1:3], atol=1e-4)


def test_committing_a_later_branch_moves_its_rows_into_place():
    model = tiny_model(seed=1, vocab_size=8)
    chain = ContentCache(model, 1, 16)
    _pass(model, VISIBLE + [FIRST] + BRANCH_B[:1], QUERIES[:1], chain)
    chain.commit(torch.tensor([5]))
    tree = ContentCache(model, 1, 16)
    _pass(model, VISIBLE + [FIRST] + BRANCH_A + BRANCH_B, QUERIES * 2, tree,
          ([0] * 4 + [1, 1, 2, 2], [1] * 3 + [2] * 3))
    tree.commit(torch.tensor([0]), {0: [0, 1, 2, 3, 6]})  # visible, first draft, branch B's first draft
    assert int(tree.length[0]) == 5
    assert (tree.key_rank[0, 5:] == NO_KEY).all()
    torch.testing.assert_close(tree.keys[0][0, :5], chain.keys[0][0, :5])
    after = [_pass(model, [(4, 7, 3)], [(5, 4)], cache) for cache in (chain, tree)]
    torch.testing.assert_close(after[0], after[1])


# --- the pure step --------------------------------------------------------------------------------
N = 20000
PROPOSAL = torch.tensor([0.55, 0.3, 0.1, 0.05], dtype=torch.float64)
TARGET = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)


def _picks(n_candidates: int, seed: int, **kwargs) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N):
        candidates = draw(PROPOSAL.expand(n_candidates, -1), torch.rand(n_candidates, generator=g, dtype=torch.float64))
        u = torch.rand(n_candidates + 1, generator=g, dtype=torch.float64).tolist()
        picked, rest = verification.recursive_rejection(TARGET, PROPOSAL, candidates.tolist(), u[:-1], **kwargs)
        out.append((int(candidates[picked]) if picked >= 0 else int(draw(rest, torch.tensor(u[-1]))),))
    return out


@pytest.mark.parametrize("n_candidates", [1, 2, 4])
def test_recursive_rejection_draws_the_target(n_candidates):
    _, p = g_test(_picks(n_candidates, seed=n_candidates), {(v,): float(TARGET[v]) for v in range(4)})
    assert p > ALPHA


def test_more_candidates_accept_more_often():
    rates = []
    for n in (1, 2, 3):
        g = torch.Generator().manual_seed(0)
        hits = 0
        for _ in range(4000):
            candidates = draw(PROPOSAL.expand(n, -1), torch.rand(n, generator=g, dtype=torch.float64)).tolist()
            hits += verification.recursive_rejection(TARGET, PROPOSAL, candidates,
                                                     torch.rand(n, generator=g, dtype=torch.float64).tolist())[0] >= 0
        rates.append(hits / 4000)
    assert rates[0] < rates[1] < rates[2], rates
    assert abs(rates[0] - float(torch.minimum(PROPOSAL, TARGET).sum())) < 0.03  # one candidate: 1 - TV


def test_negative_control_unnormalized_residual_fails():
    _, p = g_test(_picks(3, seed=9, renormalize=False), {(v,): float(TARGET[v]) for v in range(4)})
    assert p < 1e-6, f"an unnormalized residual was not rejected (p={p:.2e})"


# A round: an exact first draft, then two tokens. Position 2's proposal and target are fixed; the
# third position's depend on the second token (tables [prev, V]); the bonus on the third token.
V = 3
P2, Q2 = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
_g = torch.Generator().manual_seed(11)
P3, Q3, BONUS = (t / t.sum(-1, keepdim=True) for t in torch.rand(3, V, V, generator=_g, dtype=torch.float64))


def _tree_rounds(n_branches: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    out = []
    for _ in range(N):
        seconds = draw(P2.expand(n_branches, -1), rand(n_branches)).tolist()
        thirds = [int(draw(P3[s], rand(()))) for s in seconds]
        chains = [([t], P3[s][None], Q3[s][None], BONUS[t]) for s, t in zip(seconds, thirds)]
        verdict = verification.verify_tree([1.0], seconds, P2, Q2, chains, rand(n_branches + 2).tolist())
        kept = [seconds[verdict.branch], thirds[verdict.branch]] if verdict.branch >= 0 else []
        tokens = kept[: verdict.n_accepted - 1] + [verdict.next_token]
        if len(tokens) < 2:
            tokens.append(int(draw(Q3[tokens[0]], rand(()))))  # the next round: the target given it
        out.append(tuple(tokens[:2]))
    return out


def _round_joint() -> dict[tuple, float]:
    return {(a, b): float(Q2[a] * Q3[a, b]) for a, b in itertools.product(range(V), repeat=2)}


@pytest.mark.parametrize("n_branches", [1, 2, 3])
def test_tree_round_follows_the_target_joint(n_branches):
    _, p = g_test(_tree_rounds(n_branches, seed=20 + n_branches), _round_joint())
    assert p > ALPHA


def test_negative_control_siblings_tested_against_the_target_fail(monkeypatch):
    def without_residual(target, proposal, candidates, uniforms):  # every sibling against the target itself
        for j, (token, u) in enumerate(zip(candidates, uniforms)):
            if u * float(proposal[token]) <= float(target[token]):
                return j, target
        return -1, target_residual(target, proposal)

    monkeypatch.setattr(verification, "recursive_rejection", without_residual)
    _, p = g_test(_tree_rounds(3, seed=30), _round_joint())
    assert p < 1e-6, f"testing every sibling against the target was not rejected (p={p:.2e})"


# --- ASSD with branches against the enumerated joint ------------------------------------------------
@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=3)
    m.attach_draft_head(random_head(m))
    return m


CASES = [  # (options, k, temperature)
    (dict(branches=2), 3, 0.6),
    (dict(branches=2), 2, 1.0),
    (dict(branches=3, bonus=True), 3, 1.0),
    (dict(branches=2, draft="head"), 3, 1.0),
    (dict(branches=3, draft="head", bonus=True), 3, 0.6),
    (dict(branches=2, draft="head", cache=False), 2, 0.6),
    (dict(branches=2, one_pass=True), 2, 1.0),
    (dict(branches=3, draft="head", one_pass=True), 3, 0.6),
]


@pytest.mark.parametrize("options,k,temperature", CASES,
                         ids=["-".join([*map(str, o.values()), f"k{k}", f"T{t}"]) for o, k, t in CASES])
def test_multi_draft_assd_matches_exact_joint(model, options, k, temperature):
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), k=k, temperature=temperature,
                    seed=stable_seed("branches", *options.items(), k, temperature), **options)
    _, p = g_test(draws(result, MASKED), reference(model, temperature, "left-to-right"))
    assert p > ALPHA, f"{options}/k={k}/T={temperature}: G-test p={p:.2e}"


def test_multi_draft_in_random_order_matches_exact_joint(model):
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), k=3, branches=2, draft="head",
                    order="random", seed=stable_seed("branches-random"))
    _, p = g_test(draws(result, MASKED), reference(model, 1.0, "random"))
    assert p > ALPHA


@pytest.fixture(scope="module")
def small_model():
    m = tiny_model(seed=5, **SMALL)
    m.attach_draft_head(random_head(m, seed=1))
    return m


LONG_CASES = [dict(draft="self", bonus=True, adaptive_k=True), dict(draft="head", bonus=True),
              dict(draft="self", one_pass=True), dict(draft="head", one_pass=True, adaptive_k=True)]


@pytest.mark.parametrize("options", LONG_CASES, ids=["self-adaptive", "head", "self-one-pass", "head-one-pass-adaptive"])
def test_multi_draft_over_several_rounds_matches_exact_joint(small_model, options):
    joint = exact_joint(small_model, LONG_INPUT, LONG_MASKED, torch.nonzero(LONG_MASKED).flatten().tolist())
    result = sample(small_model, LONG_INPUT.repeat(2 * N_SAMPLES, 1), LONG_MASKED.repeat(2 * N_SAMPLES, 1), k=3,
                    branches=2, seed=stable_seed("branches-long", *options.items()), **options)
    assert int(result.rounds.float().mean() * 10) > 10  # several rounds per row: carried state is exercised
    _, p = g_test(draws(result, LONG_MASKED), joint)
    assert p > ALPHA, f"{options}: G-test p={p:.2e}"


def test_multi_draft_with_top_k_top_p_matches_exact_joint(model):
    joint = top_k_top_p_joint(model, INPUT, MASKED)
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), draft="head", k=3, branches=2,
                    temperature=0.8, top_k=4, top_p=0.8, bonus=True, seed=stable_seed("branches-top"))
    _, p = g_test(draws(result, MASKED), joint)
    assert p > ALPHA


def test_greedy_multi_draft_equals_greedy_sequential():
    wide, ids, masked = greedy_case()
    wide.attach_draft_head(random_head(wide, seed=4, scale=0.3))
    for order in ("left-to-right", "random"):
        expected = sample(wide, ids, masked, method="sequential", greedy=True, order=order, seed=1).input_ids
        for options in (dict(k=5, branches=2), dict(k=4, branches=3, bonus=True), dict(k=5, branches=2, draft="head"),
                        dict(k=3, branches=2, draft="head", adaptive_k=True, bonus=True),
                        dict(k=4, branches=2, one_pass=True), dict(k=5, branches=3, draft="head", one_pass=True)):
            res = sample(wide, ids, masked, greedy=True, order=order, seed=1, **options)
            assert torch.equal(res.input_ids, expected), (order, options)


def test_same_seed_same_tokens(model):
    runs = [sample(model, INPUT.repeat(50, 1), MASKED.repeat(50, 1), k=3, branches=3, draft="head", seed=4).input_ids
            for _ in range(2)]
    assert torch.equal(*runs)


def test_branches_is_one_decode_option_with_clear_errors():
    config = DecodeConfig(draft="head", branches=2)
    assert config.name == "assd-head-k5+2-branches"
    assert config.label == "ASSD draft head, k=5 + 2-branches"
    for bad in (dict(branches=0), dict(branches=1.5), dict(branches=2, draft="ngram"),
                dict(branches=2, verification="block"), dict(branches=2, method="sequential")):
        with pytest.raises(InputError, match="branches"):
            DecodeConfig(**bad)


def test_branches_with_constraints_is_a_clear_error():
    from asarm.sampling.engine import Engine

    engine = Engine(tiny_model(seed=3))
    with pytest.raises(InputError, match="branches"):
        engine.add(INPUT, MASKED, DecodeConfig(branches=2), constraints=[object()])
