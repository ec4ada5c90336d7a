"""Block verification (Sun et al., ICLR 2025; ``asarm.sampling.verification``) is exact.

- The pure verify step on hand-made autoregressive proposals and targets (no model): the tokens
  of a round, continued from the target where the round stops, follow the target's joint; the
  number of drafts kept matches its enumerated expectation, which is above token-by-token's.
  Negative controls that must fail: a block verifier that forgets the residual's w_τ scaling,
  and one that accepts token by token but resamples from the block residual.
- ASSD with ``verification="block"`` against the enumerated joint of a tiny model (the suite's
  `transformers` reference, tests/exact.py): self and n-gram drafts, bonus, one-pass rounds
  (whose carried drafts must be redrawn after a block verdict) with adaptive k, temperatures,
  top-k/top-p. Greedy equals greedy sequential token for token.

(The negative controls live at the step level: the tiny models' drafts agree with their
targets too often for the two wrong verifiers to be told apart end to end at a CI sample size.)
"""

from __future__ import annotations

import itertools

import pytest
import torch

from asarm.sampling import sample, verification
from asarm.sampling.target import draw
from conftest import tiny_model
from exact import exact_joint, g_test, stable_seed
from test_exactness import INPUT, MASKED, draws, reference

ALPHA = 1e-3
N_SAMPLES = 3000

# --- the pure step: blocks over a few symbols, proposals and targets conditioned on the previous
# token (the first position on nothing), plus the bonus position -----------------------------
N = 20000


def _tables(seed: int, K: int = 3, V: int = 4) -> torch.Tensor:
    """[K + 1, V + 1, V]: row t[i, prev] is the distribution at position i after token ``prev``
    (``prev = V``: no previous token, used at position 0)."""
    w = torch.rand(K + 1, V + 1, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w / w.sum(-1, keepdim=True)


def _fixed(*rows) -> torch.Tensor:
    """Tables whose position i has distribution rows[i] whatever came before."""
    t = torch.tensor(rows, dtype=torch.float64)
    return t[:, None, :].expand(-1, t.shape[1] + 1, -1).contiguous()


PROPOSAL, TARGET = _tables(3), _tables(4)  # block verification keeps 1.64 drafts, token by token 1.46
# Where the two verdicts' residuals differ most: after accepting a draft at half its proposal
# probability, the scaled residual 0.5 q_2 - p_2 has no mass on token 1, the unscaled one does.
SKEWED_PROPOSAL = _fixed((0.6, 0.3, 0.1), (0.02, 0.38, 0.6), (1 / 3, 1 / 3, 1 / 3))
SKEWED_TARGET = _fixed((0.3, 0.3, 0.4), (0.5, 0.45, 0.05), (0.2, 0.3, 0.5))


def _target_joint(target: torch.Tensor, length: int) -> dict[tuple, float]:
    joint = {}
    for xs in itertools.product(range(target.shape[-1]), repeat=length):
        prob, prev = 1.0, target.shape[-1]
        for i, x in enumerate(xs):
            prob *= float(target[i, prev, x])
            prev = x
        joint[xs] = prob
    return joint


def _round(seed: int, block: bool, proposal=PROPOSAL, target=TARGET, n_drafts: int | None = None):
    """N independent rounds: drafts drawn from the proposal chain, verified against the target.
    Returns (drafts [N, K], verdict, the round's tokens continued from the target to K + 1)."""
    K, V = proposal.shape[0] - 1, proposal.shape[-1]
    n_drafts = n_drafts or K
    g = torch.Generator().manual_seed(seed)
    uniform = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    prev = torch.full((N,), V)
    drafts, p_rows, q_rows = [], [], []
    for i in range(K):
        p_i, q_i = proposal[i, prev], target[i, prev]
        d = draw(p_i, uniform(N))
        drafts.append(d), p_rows.append(p_i), q_rows.append(q_i)
        prev = d
    drafts = torch.stack(drafts, 1)
    verdict = verification.verify(drafts, torch.stack(p_rows, 1), torch.stack(q_rows, 1),
                                  torch.full((N,), n_drafts), uniform(N, K), uniform(N),
                                  bonus_probs=target[n_drafts, drafts[:, n_drafts - 1]],
                                  block=torch.full((N,), block))
    out, prev, kept = [], torch.full((N,), V), verdict.n_accepted
    for i in range(K + 1):
        later = draw(target[i, prev], uniform(N))  # the next rounds: the target given what was decoded
        token = torch.where(kept > i, drafts[:, min(i, K - 1)], torch.where(kept == i, verdict.next_token, later))
        out.append(token)
        prev = token
    return drafts, verdict, torch.stack(out, 1)


def _samples(out: torch.Tensor) -> list[tuple]:
    return [tuple(r) for r in out.tolist()]


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("tables", ["random", "skewed"])
def test_verify_rounds_follow_the_target_joint(block, tables):
    proposal, target = (PROPOSAL, TARGET) if tables == "random" else (SKEWED_PROPOSAL, SKEWED_TARGET)
    K = proposal.shape[0] - 1
    _, _, out = _round(seed=3, block=block, proposal=proposal, target=target)
    _, p = g_test(_samples(out[:, :K]), _target_joint(target, K))
    assert p > ALPHA
    _, p = g_test(_samples(out), _target_joint(target, K + 1), min_expected=10)
    assert p > ALPHA


def _expected_kept(block: bool, proposal=PROPOSAL, target=TARGET) -> float:
    """E[drafts kept] by enumeration: sum over prefixes x^i of P(x^i) times w_i(x^i) (block,
    the module docstring's Claim 1) or prod_l min(1, q_l/p_l) (token by token)."""
    K, V = proposal.shape[0] - 1, proposal.shape[-1]
    total = 0.0
    for i in range(1, K + 1):
        for xs in itertools.product(range(V), repeat=i):
            prob, w, token_w, prev = 1.0, 1.0, 1.0, V
            for pos, x in enumerate(xs):
                p, q = float(proposal[pos, prev, x]), float(target[pos, prev, x])
                prob, w, token_w, prev = prob * p, min(1.0, w * q / p), token_w * min(1.0, q / p), x
            total += prob * (w if block else token_w)
    return total


@pytest.mark.parametrize("block", [False, True])
def test_kept_drafts_match_their_expectation(block):
    _, verdict, _ = _round(seed=4, block=block)
    kept = verdict.n_accepted.double()
    assert abs(float(kept.mean()) - _expected_kept(block)) < 4 * float(kept.std()) / N ** 0.5


def test_block_keeps_more_drafts_than_token_by_token():
    """Never fewer in expectation (Sun et al.; here w_i >= prod_l min(1, q_l/p_l) prefix by prefix)."""
    assert _expected_kept(True) > _expected_kept(False) + 0.1


def test_block_verify_without_bonus_and_with_padding():
    _, verdict, _ = _round(seed=5, block=True, n_drafts=2)
    assert int(verdict.n_accepted.max()) <= 2
    assert bool((verdict.next_token >= 0).all())  # a replacement, or the bonus after both drafts
    q = TARGET[:2, -1][None]
    same = verification.verify(torch.tensor([[2, 0]]), q, q, torch.tensor([2]),
                               torch.tensor([[0.999, 0.999]], dtype=torch.float64),
                               torch.tensor([0.5], dtype=torch.float64), block=torch.tensor([True]))
    assert int(same.n_accepted[0]) == 2 and int(same.next_token[0]) == -1


def test_greedy_block_verdict_is_the_longest_matching_prefix():
    K, V = 3, 4
    one_hot = lambda t: torch.nn.functional.one_hot(t, V).double()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    drafts = torch.randint(0, V, (500, K), generator=g)
    argmax = torch.where(torch.rand(500, K, generator=g) < 0.6, drafts, (drafts + 1) % V)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    verdict = verification.verify(drafts, one_hot(drafts), one_hot(argmax), torch.full((500,), K), u(500, K), u(500),
                                  block=torch.ones(500, dtype=torch.bool))
    matching = (drafts == argmax).long().cumprod(-1).sum(-1)
    assert torch.equal(verdict.n_accepted, matching)
    rejected = matching < K
    assert torch.equal(verdict.next_token[rejected], argmax[rejected, matching[rejected]])


def _block_accepts_without_scale(p, q, draft_next, target_next, u, n):
    tau, _ = REAL_BLOCK_ACCEPTS(p, q, draft_next, target_next, u, n)
    return tau, torch.ones_like(tau, dtype=torch.float64)  # forgets w_τ: residual max(0, q - p)


def _token_accepts_with_block_residual(p, q, draft_next, target_next, u, n):
    tau = verification.token_accepts(p, q, u, n)
    return tau, verification.block_weights(p, q, n).gather(1, tau[:, None]).squeeze(1)


REAL_BLOCK_ACCEPTS = verification.block_accepts
WRONG_BLOCK_VERIFIERS = {"unscaled-residual": _block_accepts_without_scale,
                         "token-accept-block-residual": _token_accepts_with_block_residual}


@pytest.mark.parametrize("wrong", list(WRONG_BLOCK_VERIFIERS))
def test_negative_control_wrong_block_verifier_fails_on_the_pure_step(monkeypatch, wrong):
    monkeypatch.setattr(verification, "block_accepts", WRONG_BLOCK_VERIFIERS[wrong])
    _, _, out = _round(seed=3, block=True, proposal=SKEWED_PROPOSAL, target=SKEWED_TARGET)
    _, p = g_test(_samples(out[:, :2]), _target_joint(SKEWED_TARGET, 2))
    assert p < 1e-6, f"{wrong} was not rejected (p={p:.2e})"


# --- ASSD with block verification against the enumerated joint of a tiny model ---------------
@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


BLOCK_CASES = [  # (variant, k, temperature): every variant at two k, both temperatures
    (dict(), 3, 0.6),
    (dict(), 2, 1.0),
    (dict(bonus=True), 3, 1.0),
    (dict(draft="ngram", bonus=True, adaptive_k=True), 2, 0.6),
    (dict(draft="ngram", bonus=True, adaptive_k=True), 3, 1.0),
    (dict(one_pass=True), 2, 0.6),
    (dict(one_pass=True), 3, 1.0),
]


@pytest.mark.parametrize("options,k,temperature", BLOCK_CASES,
                         ids=["-".join([*map(str, o.values()), f"k{k}", f"T{t}"]) for o, k, t in BLOCK_CASES])
def test_block_verified_assd_matches_exact_joint(model, options, k, temperature):
    seed = stable_seed("block", *options.items(), k, temperature)
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), k=k, temperature=temperature,
                    order="random", seed=seed, verification="block", **options)
    _, p = g_test(draws(result, MASKED), reference(model, temperature, "random"))
    assert p > ALPHA, f"block/{options}/k={k}/T={temperature}: G-test p={p:.2e}"


@pytest.mark.parametrize("draft", ["self", "ngram"])
def test_block_verified_assd_with_top_k_top_p_matches_exact_joint(model, draft):
    joint = top_k_top_p_joint(model, INPUT, MASKED)
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), draft=draft, k=3,
                    temperature=0.8, top_k=4, top_p=0.8, seed=stable_seed("block-top", draft),
                    verification="block", bonus=True)
    _, p = g_test(draws(result, MASKED), joint)
    assert p > ALPHA


# One-pass rounds carry drafts past a rejection into the next block, which needs more hidden
# positions than the block: 4 tokens over 5 hidden positions, 4^5 outcomes.
SMALL = dict(vocab_size=5, mask_token_id=4, pad_token_id=3, eos_token_id=2)
LONG_INPUT = torch.tensor([1, 0, 0, 0, 2, 0, 0, 3])
LONG_MASKED = torch.tensor([0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)


@pytest.fixture(scope="module")
def small_model():
    return tiny_model(seed=5, **SMALL)


@pytest.fixture(scope="module")
def long_joint(small_model):
    return exact_joint(small_model, LONG_INPUT, LONG_MASKED, torch.nonzero(LONG_MASKED).flatten().tolist())


@pytest.mark.parametrize("options", [dict(k=3), dict(k=3, adaptive_k=True)], ids=["k3", "k3-adaptive"])
def test_one_pass_block_verification_carries_exactly(small_model, long_joint, options):
    options = {"verification": "block", **options}
    result = sample(small_model, LONG_INPUT.repeat(2 * N_SAMPLES, 1), LONG_MASKED.repeat(2 * N_SAMPLES, 1),
                    one_pass=True, seed=stable_seed("one-pass-block", *options.items()), **options)
    _, p = g_test(draws(result, LONG_MASKED), long_joint)
    assert p > ALPHA, f"{options}: G-test p={p:.2e}"


def top_k_top_p_joint(model, input_ids, masked, temperature=0.8, top_k=4, top_p=0.8):
    """The exact joint under top-k, then top-p, at a temperature, as TargetDistribution applies them."""
    def truncate(logits):
        x = logits / temperature
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -float("inf"))
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(sorted_x, -1)
        drop = (p.cumsum(-1) - p) >= top_p
        return x.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), -float("inf"))

    return exact_joint(model, input_ids, masked, torch.nonzero(masked).flatten().tolist(), transform=truncate)


def greedy_case():
    """A wider tiny model (40 tokens) and 4 rows of 20 tokens, 80% hidden: greedy ASSD variants
    must reproduce greedy sequential decoding on it token for token."""
    wide = tiny_model(seed=2, vocab_size=40, d_model=32)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (4, 20), generator=g)
    ids[ids == 6] = 7  # 6 is the mask token
    return wide, ids, torch.rand(4, 20, generator=g) < 0.8


def test_greedy_block_verified_assd_equals_greedy_sequential():
    wide, ids, masked = greedy_case()
    for order in ("left-to-right", "random"):
        expected = sample(wide, ids, masked, method="sequential", greedy=True, order=order, seed=1).input_ids
        for options in (dict(k=5), dict(k=5, one_pass=True), dict(k=3, one_pass=True, adaptive_k=True),
                        dict(draft="ngram", k=4, bonus=True)):
            res = sample(wide, ids, masked, greedy=True, order=order, seed=1, verification="block", **options)
            assert torch.equal(res.input_ids, expected), (order, options)


def test_verification_is_one_decode_option():
    from asarm import InputError
    from asarm.sampling.config import DecodeConfig, speedup_configs, user_fields

    config = DecodeConfig(one_pass=True, verification="block")
    assert config.name == "assd-self-k5+one-pass+block-verify"
    assert config.label == "ASSD self-draft, k=5 + one-pass + block-verify"
    assert DecodeConfig().verification == "token"
    with pytest.raises(InputError, match="verification"):
        DecodeConfig(verification="tree")
    assert "verification" in {f.name for f in user_fields("server")}  # hence --verification and the request field
    assert any(c.verification == "block" and c.one_pass for c in speedup_configs(5))
