"""Holes of unknown length: the length posterior against `transformers`' XLNet, the exactness
of the joint (length, hole tokens), grids of several holes, edge cases, the command line."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hf_reference, tiny_model
from exact import exact_joint, g_test

from asarm.errors import InputError
from asarm.lengths import _pick, choose_lengths, joint_posterior, length_posterior, normalize_prior
from asarm.sampling import TargetDistribution, sample

ALPHA = 1e-3
N_SAMPLES = 3000
LEFT, RIGHT = [1, 3, 0], [4, 2, 5]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def reference_log_likelihood(model, segments, cell, factorization, temperature=1.0) -> float:
    """log p(scored segments | visible segment, holes of the cell's lengths) from transformers:
    hole positions hidden from every row (perm_mask), target_mapping on the scored tokens."""
    hf = hf_reference(model)
    visible = 0 if factorization == "right-given-left" else len(segments) - 1
    ids, rank = [], []
    for i, seg in enumerate(segments):
        if i:
            ids += [0] * cell[i - 1]
            rank += [None] * cell[i - 1]  # absent
        ids += seg
        rank += [0] * len(seg) if i == visible else [1] * len(seg)
    scored = [p for p, r in enumerate(rank) if r == 1]
    for j, p in enumerate(scored):
        rank[p] = j + 1
    L = len(ids)
    absent = torch.tensor([r is None for r in rank])
    r = torch.tensor([-1 if x is None else x for x in rank])
    # row i may not see key j if j is absent, or j is scored with rank >= i's rank (content rows
    # see themselves through XLNet's own diagonal; query rows never see their own token)
    perm = absent[None, :] | ((r[None, :] > 0) & (r[None, :] >= r[:, None]) & (r[:, None] >= 0))
    perm = perm | ((r[None, :] > 0) & (r[:, None] == 0))  # visible rows see only visible keys
    target = torch.zeros(len(scored), L)
    target[torch.arange(len(scored)), torch.tensor(scored)] = 1.0
    with torch.no_grad():
        logits = hf(torch.tensor([ids]), perm_mask=perm.float()[None], target_mapping=target[None]).logits[0]
    logp = torch.log_softmax(TargetDistribution(model.config.mask_token_id, temperature).logits(logits).double(), -1)
    return float(logp[torch.arange(len(scored)), torch.tensor([ids[p] for p in scored])].sum())


def reference_posterior(model, segments, cells, factorization, prior, temperature=1.0) -> torch.Tensor:
    ll = torch.tensor([reference_log_likelihood(model, segments, c, factorization, temperature) for c in cells],
                      dtype=torch.float64)
    return torch.softmax(ll + torch.as_tensor(prior, dtype=torch.float64).log(), 0)


@pytest.mark.parametrize("factorization", ["right-given-left", "left-given-right"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_length_posterior_matches_transformers(model, factorization, temperature):
    lengths = [1, 2, 3, 4, 6]
    prior = [0.1, 0.3, 0.2, 0.25, 0.15]
    ours = length_posterior(model, LEFT, RIGHT, lengths=lengths, prior=prior, temperature=temperature,
                            factorization=factorization)
    ref = reference_posterior(model, [LEFT, RIGHT], [(n,) for n in lengths], factorization, prior, temperature)
    print(f"length posterior vs transformers, {factorization}, T={temperature}: max |diff| {float((ours - ref).abs().max()):.1e}")
    assert float((ours - ref).abs().max()) < 1e-5
    assert abs(float(ours.sum()) - 1.0) < 1e-9
    assert float((ours - torch.tensor(prior)).abs().max()) > 1e-3  # the context does move the posterior


@pytest.mark.parametrize("factorization", ["right-given-left", "left-given-right"])
def test_joint_posterior_of_two_holes_matches_transformers(model, factorization):
    segments = [[1, 3], [4], [2, 0]]
    cells, probs = joint_posterior(model, segments, [[1, 2, 3], [1, 2]], factorization=factorization)
    ref = reference_posterior(model, segments, cells, factorization, [1.0] * len(cells))
    print(f"joint posterior of two holes vs transformers, {factorization}: max |diff| {float((probs - ref).abs().max()):.1e}")
    assert float((probs - ref).abs().max()) < 1e-5


def test_posterior_is_the_prior_without_context_on_one_side(model):
    prior = [0.5, 0.2, 0.3]
    for f in ("right-given-left", "left-given-right"):
        for left, right in ((LEFT, []), ([], RIGHT)):
            post = length_posterior(model, left, right, lengths=[1, 2, 3], prior=prior, factorization=f)
            assert torch.allclose(post, torch.tensor(prior, dtype=torch.float64), atol=1e-6)
    [choice] = choose_lengths(model, [LEFT, []], [[1, 2, 3]], greedy=True)
    assert choice.method == "prior (no context)"


def test_lengths_beyond_the_limit_are_excluded(model):
    limited = tiny_model(seed=3, max_length=9)
    post = length_posterior(limited, LEFT, RIGHT, lengths=[1, 2, 3, 4, 5])
    assert post[3:].tolist() == [0.0, 0.0] and abs(float(post.sum()) - 1) < 1e-9
    with pytest.raises(InputError, match="no candidate hole length fits"):
        length_posterior(limited, LEFT, RIGHT, lengths=[4, 5])


@pytest.mark.parametrize("bad, message", [
    (dict(lengths=[]), "no candidate lengths"),
    (dict(lengths=[0, 1]), ">= 1"),
    (dict(lengths=[1, 1]), "distinct"),
    (dict(factorization="both"), "factorization must be one of"),
    (dict(prior=[1.0]), "1 weights for 3 candidate"),
    (dict(prior=[0, 0, 0]), "no weight"),
    (dict(prior=[1, -1, 1]), ">= 0"),
    (dict(temperature=0), "temperature"),
])
def test_length_posterior_errors(model, bad, message):
    kwargs = dict(lengths=[1, 2, 3], **bad) if "lengths" not in bad else bad
    with pytest.raises(InputError, match=message):
        length_posterior(model, LEFT, RIGHT, **kwargs)


def test_normalize_prior_forms():
    assert normalize_prior({2: 1.0, 3: 3.0}, [1, 2, 3]).tolist() == [0.0, 0.25, 0.75]
    assert normalize_prior(lambda n: n, [1, 3]).tolist() == [0.25, 0.75]


def test_hole_by_hole_beyond_the_grid_limit(model):
    segments = [[1, 3], [4], [2, 0]]
    exact = choose_lengths(model, segments, [[1, 2, 3], [1, 2]], greedy=True)
    approx = choose_lengths(model, segments, [[1, 2, 3], [1, 2]], greedy=True, max_cells=4)
    assert {c.method for c in exact} == {"exact-joint"}
    assert {c.method for c in approx} == {"hole-by-hole (approximate)"}
    assert all(abs(sum(c.posterior) - 1) < 1e-9 for c in exact + approx)
    given = choose_lengths(model, segments, [[2], [3]])
    assert [(c.length, c.method) for c in given] == [(2, "given"), (3, "given")]


# --- the joint (length, hole tokens) is exact ---------------------------------------------------
JOINT_LEFT, JOINT_RIGHT, JOINT_LENGTHS, JOINT_PRIOR = [1, 3], [4, 2], [1, 2, 3], [0.2, 0.3, 0.5]


def draw_pairs(model, seed, lengths_from=None):
    """N (length, tokens...) draws: the length as infill chooses it (the joint posterior and
    ``_pick`` with a seeded generator: ``choose_lengths`` is exactly that, tested below), then the
    hole tokens by ``sample`` given the length, batched per length. ``lengths_from``: a negative
    control that draws the lengths from these weights instead."""
    gen = torch.Generator().manual_seed(seed)
    if lengths_from is None:
        cells, probs = joint_posterior(model, [JOINT_LEFT, JOINT_RIGHT], [JOINT_LENGTHS], prior=[JOINT_PRIOR],
                                       factorization="left-given-right")
        chosen = [cells[_pick(probs, False, gen)][0] for _ in range(N_SAMPLES)]
    else:
        chosen = [JOINT_LENGTHS[i] for i in torch.multinomial(torch.tensor(lengths_from), N_SAMPLES, True, generator=gen)]
    out = []
    for n in JOINT_LENGTHS:
        rows = chosen.count(n)
        if not rows:
            continue
        ids = torch.tensor(JOINT_LEFT + [0] * n + JOINT_RIGHT)
        masked = torch.tensor([False] * len(JOINT_LEFT) + [True] * n + [False] * len(JOINT_RIGHT))
        res = sample(model, ids.repeat(rows, 1), masked.repeat(rows, 1), method="assd", k=2, seed=seed + n)
        out += [(n, *row[masked].tolist()) for row in res.input_ids]
    return out


def reference_joint(model) -> dict:
    post = reference_posterior(model, [JOINT_LEFT, JOINT_RIGHT], [(n,) for n in JOINT_LENGTHS],
                               "left-given-right", JOINT_PRIOR)
    joint = {}
    for n, pn in zip(JOINT_LENGTHS, post.tolist()):
        ids = torch.tensor(JOINT_LEFT + [0] * n + JOINT_RIGHT)
        masked = torch.tensor([False] * len(JOINT_LEFT) + [True] * n + [False] * len(JOINT_RIGHT))
        hidden = torch.nonzero(masked).flatten().tolist()
        for tokens, p in exact_joint(model, ids, masked, hidden).items():
            joint[(n, *tokens)] = pn * p
    return joint


def test_choose_lengths_draws_from_the_joint_posterior(model):
    cells, probs = joint_posterior(model, [JOINT_LEFT, JOINT_RIGHT], [JOINT_LENGTHS], prior=[JOINT_PRIOR],
                                   factorization="left-given-right")
    for seed in range(20):
        [c] = choose_lengths(model, [JOINT_LEFT, JOINT_RIGHT], [JOINT_LENGTHS], prior=[JOINT_PRIOR],
                             factorization="left-given-right", generator=torch.Generator().manual_seed(seed))
        assert c.length == cells[_pick(probs, False, torch.Generator().manual_seed(seed))][0]
        assert c.posterior == probs.tolist() and c.method == "exact"
    [g] = choose_lengths(model, [JOINT_LEFT, JOINT_RIGHT], [JOINT_LENGTHS], prior=[JOINT_PRIOR], greedy=True,
                         factorization="left-given-right")
    assert g.length == JOINT_LENGTHS[int(probs.argmax())] and abs(g.probability - float(probs.max())) < 1e-12


def test_length_and_tokens_match_the_exact_joint(model):
    ref = reference_joint(model)
    assert abs(sum(ref.values()) - 1) < 1e-9
    g, p = g_test(draw_pairs(model, seed=5), ref)
    print(f"(length, tokens) vs the exact joint: G = {g:.1f}, p = {p:.3f}")
    assert p > ALPHA, f"G-test p={p:.2e}"


def test_negative_control_lengths_from_the_prior_alone_fail(model):
    ref = reference_joint(model)
    marginal = [sum(v for k, v in ref.items() if k[0] == n) for n in JOINT_LENGTHS]
    assert max(abs(a - b) for a, b in zip(marginal, JOINT_PRIOR)) > 0.05  # the evidence matters here
    g, p = g_test(draw_pairs(model, seed=5, lengths_from=JOINT_PRIOR), ref)
    print(f"negative control (lengths from the prior alone): G = {g:.1f}, p = {p:.1e}")
    assert p < ALPHA, f"the control passed: p={p:.2e}"


# --- the command line, end to end with the shipped models ------------------------------------------
def run_cli(capsys, *argv):
    from asarm.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_infill_without_a_length(capsys):
    code, out, err = run_cli(capsys, "infill", "The [MASK] sat on the mat.", "--seed", "0", "--stats")
    assert code == 0, err
    assert out.startswith("The") and out.endswith(" sat on the mat.\n") and len(out) > len("The sat on the mat.\n")
    assert "hole 1: length" in err and "candidates 1-32, exact" in err
    again = run_cli(capsys, "infill", "The [MASK] sat on the mat.", "--seed", "0")[1]
    assert again == out  # same seed, same length and text


def test_cli_code_infill_without_a_length(capsys):
    code, out, err = run_cli(capsys, "infill", "--model", "asarm-py-small", "def add(a, b):\n    [MASK]\n",
                             "--greedy", "--stats", "--max-hole", "16")
    assert code == 0, err
    assert out.startswith("def add(a, b):\n    ") and out.endswith("\n\n")
    assert "candidates 1-16" in err


def test_cli_stop_at_and_errors(capsys, tmp_path):
    code, out, err = run_cli(capsys, "infill", "--model", "asarm-py-small", "def add(a, b):\n    [MASK]",
                             "--greedy", "--stop-at", "newline", "--max-hole", "12")
    assert code == 0, err
    assert out.startswith("def add(a, b):\n    ") and "\n" not in out[len("def add(a, b):\n    "):-1]
    prior = tmp_path / "prior.json"
    prior.write_text("[0, 0, 1]")
    code, out, err = run_cli(capsys, "infill", "The [MASK] sat.", "--length-prior", str(prior), "--stats", "--seed", "1")
    assert code == 0 and "hole 1: length 3 (posterior probability 1.000" in err
    for argv, message in [
        (["The [MASK] sat.", "--stop-at", "\\n"], "stop_at applies to a hole of unknown length at the end"),
        (["The [MASK:10^30] sat."], "whole number of tokens"),
        (["The [MASK:1-9999999999999] sat."], "far beyond"),
        (["The [MASK] sat.", "--length-prior", str(tmp_path / "none.json")], "--length-prior: cannot read"),
        (["The [MASK] sat.", "--max-hole", "0"], "max_hole must be an integer >= 1"),
    ]:
        code, out, err = run_cli(capsys, "infill", *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, "score", "the [[mat")
    assert code == 2 and "unclosed [[" in err


def test_hole_length_summary_from_records():
    from asarm.evaluation.hole_length import mode_names
    from asarm.evaluation.hole_length_report import summarize

    fits = [True, True, True]
    rec = {"true_length": 2, "fits": fits, "loglik": {"right-given-left": [0.0, math.log(3), 0.0],
                                                      "left-given-right": [0.0, 0.0, 0.0]},
           "lengths": {m: 2 for m in mode_names()} | {"fixed": 3, "prior-mode": 1},
           "fills": {"1": {"passed": False}, "2": {"passed": True}, "3": {"passed": False}}}
    meta = {"task": "humaneval-infilling", "fixed_length": 3, "prior_mode": 1, "candidates": [1, 3]}
    s = summarize([rec], meta, prior=[0.5, 0.25, 0.25])
    rows = s["modes"]
    assert rows["oracle"]["pass@1"]["mean"] == 1.0 and rows["fixed"]["pass@1"]["mean"] == 0.0
    assert rows["fixed"]["mae"]["mean"] == 1.0 and rows["prior-mode"]["exact"]["mean"] == 0.0
    assert abs(rows["posterior/right-given-left/uniform"]["p_true"]["mean"] - 0.6) < 1e-12  # 3 / (1 + 3 + 1)
    assert abs(rows["posterior/left-given-right/learned"]["p_true"]["mean"] - 0.25) < 1e-12
    assert abs(rows["prior-mode"]["p_true"]["mean"] - 0.25) < 1e-12


# --- a length prior measured on text ---------------------------------------------------------------
SAMPLE = "The cat sat. It was warm!\nA dog (old) barked? Yes.\n\n  Nobody came.\n\n\ndef f():\n    return 1\n"


def test_text_units():
    from asarm.lengths import text_units

    assert text_units(SAMPLE, "line") == ["The cat sat. It was warm!\n", "A dog (old) barked? Yes.\n",
                                          "  Nobody came.\n", "def f():\n", "    return 1\n"]
    assert text_units(SAMPLE, "sentence") == [" The cat sat.", " It was warm!", " A dog (old) barked?", " Yes.",
                                              " Nobody came.", " def f(): return 1"]
    assert text_units(SAMPLE, "paragraph") == [" The cat sat. It was warm! A dog (old) barked? Yes.",
                                               " Nobody came.", " def f(): return 1"]
    with pytest.raises(InputError, match="unknown unit"):
        text_units(SAMPLE, "word")


def test_length_prior_from_text_counts_tokens():
    from asarm.cli_args import SHIPPED_DIR
    from asarm.lengths import length_counts, length_prior_from_text, text_units
    from asarm.tokenization import encode, load_tokenizer

    tok = load_tokenizer(SHIPPED_DIR / "asarm-en-small")
    lengths = [len(encode(tok, u)) for u in text_units(SAMPLE, "sentence")]
    top = max(lengths)
    counts, longer = length_counts(tok, text_units(SAMPLE, "sentence"), top - 1)
    assert longer == lengths.count(top) and sum(counts) == len(lengths) - longer
    prior = length_prior_from_text(tok, [SAMPLE], "sentence", max_length=top, smoothing=0.5)
    assert len(prior) == top and abs(sum(prior) - 1) < 1e-12
    total = len(lengths) + 0.5 * top
    assert all(abs(prior[n - 1] - (lengths.count(n) + 0.5) / total) < 1e-12 for n in range(1, top + 1))
    with pytest.raises(InputError, match="no sentence of 1 to 1 tokens"):
        length_prior_from_text(tok, ["Nothing here is one token long at all."], "sentence", max_length=1, smoothing=0)
    with pytest.raises(InputError, match="smoothing"):
        length_prior_from_text(tok, [SAMPLE], smoothing=-1)
    with pytest.raises(InputError, match="max_length"):
        length_counts(tok, ["a"], 0)


def test_cli_length_prior_feeds_infill(capsys, tmp_path):
    import json

    text = tmp_path / "stories.txt"
    text.write_text("She went home. He stayed at the party until late.\n\nThey met again the next day.\n")
    out = tmp_path / "prior.json"
    code, _, err = run_cli(capsys, "length-prior", str(text), "--max-hole", "12", "--out", str(out))
    assert code == 0, err
    assert "3 sentences of 1-12 tokens" in err and "--length-prior" in err
    prior = json.loads(out.read_text())
    assert len(prior) == 12 and abs(sum(prior) - 1) < 1e-6 and max(prior) > min(prior)
    code, _, err = run_cli(capsys, "infill", "The [MASK] sat on the mat.", "--length-prior", str(out), "--max-hole", "12",
                           "--seed", "0", "--stats")
    assert code == 0 and "candidates 1-12, exact" in err, err
    code, _, err = run_cli(capsys, "length-prior", str(tmp_path / "missing.txt"))
    assert code == 2 and "cannot read" in err and err.count("\n") == 1
