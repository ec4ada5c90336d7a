"""Constrained holes: every output matches, and every sampler draws the locally renormalized chain.

The reference (``constrained_joint``) is the chain of `transformers`' XLNet (tests/exact.py) with
each factor's allowed tokens found by brute force: a token is allowed iff some continuation of
the hole's remaining length fully matches the regex (Python's ``re``), independently of the
automaton and its completability analysis.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import sys

import pytest
import torch
from conftest import tiny_model

import asarm
from asarm.errors import InputError
from asarm.sampling import sample
from asarm.sampling.constraints import HoleConstraint
from asarm.text.constraints import compile_regex, compile_spec, escape_regex, token_bytes
from exact import chain_logits_reference, g_test, stable_seed

sys.path.insert(0, __file__.rsplit("/", 1)[0])

ALPHA = 1e-3
N_SAMPLES = 3000

# the tiny model's vocabulary (8 ids, 6 is the mask token) spelled as text
VOCAB = {0: b"a", 1: b"b", 2: b"ab", 3: b"c", 4: b"1", 5: b"2", 7: b"12"}
INPUT = torch.tensor([1, 3, 0, 0, 4, 0, 2])
MASKED = torch.tensor([0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
# hole A = positions 2-3: 'a[ab]*c|12' (length-aware: "12" cannot start a 2-token match); hole B = position 5
HOLES = [(2, 4, "a[ab]*c|12"), (5, 6, "(b|c|12)")]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def automaton(regex):
    return compile_regex(regex, VOCAB, 8, {6})


def row_constraints(holes=HOLES):
    return [HoleConstraint(s, e, automaton(rx)) for s, e, rx in holes]


def brute_allowed(regex: str, prefix: list[int], remaining: int) -> set[int]:
    """Tokens t such that prefix + t + some ``remaining`` tokens fully matches ``regex``."""
    pattern = re.compile(regex.encode())
    head = b"".join(VOCAB[t] for t in prefix)
    return {t for t in VOCAB if any(pattern.fullmatch(head + VOCAB[t] + b"".join(VOCAB[x] for x in rest))
                                    for rest in itertools.product(VOCAB, repeat=remaining))}


def constrained_joint(model, input_ids, masked, order, holes=HOLES, temperature=1.0, top_k=None) -> dict:
    """{hidden tokens in ascending position order: probability} of the locally renormalized chain."""
    hidden = torch.nonzero(masked).flatten().tolist()
    vocab = list(VOCAB)
    outcomes = list(itertools.product(vocab, repeat=len(hidden)))
    filled = input_ids.repeat(len(outcomes), 1)
    filled[:, hidden] = torch.tensor(outcomes)
    logits = chain_logits_reference(model, filled, list(order)).double()
    logits[..., model.config.mask_token_id] = -math.inf
    for n, row in enumerate(filled.tolist()):
        for i, pos in enumerate(order):
            for start, end, rx in holes:
                if start <= pos < end:
                    allowed = brute_allowed(rx, row[start:pos], end - pos - 1)
                    logits[n, i, [t for t in range(8) if t not in allowed]] = -math.inf
    x = logits / temperature
    if top_k is not None:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    logp = torch.log_softmax(x, -1)
    tokens_in_order = filled[:, list(order)]
    total = logp.gather(-1, tokens_in_order[..., None]).squeeze(-1).sum(-1).exp()
    total = torch.nan_to_num(total, nan=0.0)
    return {o: float(p) for o, p in zip(outcomes, total)}


_joints: dict = {}


def reference(model, order_name, temperature=1.0, top_k=None):
    key = (order_name, temperature, top_k)
    if key not in _joints:
        if order_name == "random":  # hole A's positions stay left to right: three orders, each 1/3
            joints = [constrained_joint(model, INPUT, MASKED, o, temperature=temperature, top_k=top_k)
                      for o in ([2, 3, 5], [2, 5, 3], [5, 2, 3])]
            _joints[key] = {k: sum(j[k] for j in joints) / 3 for k in joints[0]}
        else:
            order = [5, 2, 3] if order_name == "permutation" else [2, 3, 5]
            _joints[key] = constrained_joint(model, INPUT, MASKED, order, temperature=temperature, top_k=top_k)
    return _joints[key]


def draws(ids):
    return [tuple(r) for r in ids[:, MASKED].tolist()]


def run(model, order_name="left-to-right", seed=0, n=N_SAMPLES, **options):
    order = [[5, 2, 3]] * n if order_name == "permutation" else order_name
    return sample(model, INPUT.repeat(n, 1), MASKED.repeat(n, 1), order=order, seed=seed,
                  constraints=[row_constraints() for _ in range(n)], **options)


def test_reference_masks_are_length_aware(model):
    joint = reference(model, "left-to-right")
    assert abs(sum(joint.values()) - 1) < 1e-9
    assert all(p == 0 for (a, _, _), p in joint.items() if a == 7)  # "12" leaves no room for a 2nd token
    support = {k for k, p in joint.items() if p > 0}
    assert all(re.fullmatch(HOLES[0][2], (VOCAB[a] + VOCAB[b]).decode()) for a, b, _ in support)


SAMPLERS = {
    "sequential": dict(method="sequential"),
    "self-k2": dict(method="assd", k=2),
    "self-k3-bonus": dict(method="assd", k=3, bonus=True),
    "ngram-k3": dict(method="assd", draft="ngram", k=3),
    "ngram-k2-bonus-adaptive": dict(method="assd", draft="ngram", k=2, bonus=True, adaptive_k=True),
    "one-pass-k3": dict(method="assd", k=3, one_pass=True),
    "one-pass-adaptive-k2": dict(method="assd", k=2, one_pass=True, adaptive_k=True),
}


# every sampler left to right; the other orders with the samplers whose rounds differ most
ORDER_CASES = [(name, "left-to-right") for name in SAMPLERS] + [
    (name, order) for order in ("permutation", "random") for name in ("sequential", "self-k3-bonus", "one-pass-k3",
                                                                       "ngram-k3")]


@pytest.mark.parametrize("name, order_name", ORDER_CASES)
def test_constrained_sampler_matches_constrained_chain(model, name, order_name):
    result = run(model, order_name, seed=stable_seed("constrained", name, order_name), **SAMPLERS[name])
    _, p = g_test(draws(result.input_ids), reference(model, order_name))
    assert p > ALPHA, f"{name}/{order_name}: G-test p={p:.2e}"


@pytest.mark.parametrize("name", ["sequential", "self-k3-bonus", "one-pass-k3"])
def test_constrained_full_recompute_matches_constrained_chain(model, name):
    """cache=False (every pass recomputes the whole sequence): the same constrained chain."""
    result = run(model, "random", seed=stable_seed("constrained-no-cache", name), cache=False, **SAMPLERS[name])
    _, p = g_test(draws(result.input_ids), reference(model, "random"))
    assert p > ALPHA, f"{name}, cache=False: G-test p={p:.2e}"


@pytest.mark.parametrize("options", [dict(temperature=0.6), dict(top_k=3)], ids=["T0.6", "topk3"])
@pytest.mark.parametrize("name", ["sequential", "self-k3-bonus", "one-pass-k3"])
def test_constrained_target_options(model, name, options):
    """Temperature and top-k act on the allowed tokens (the mask comes first)."""
    result = run(model, seed=stable_seed("constrained-options", name, *options), **SAMPLERS[name], **options)
    _, p = g_test(draws(result.input_ids), reference(model, "left-to-right", options.get("temperature", 1.0),
                                                     options.get("top_k")))
    assert p > ALPHA, f"{name}/{options}: G-test p={p:.2e}"


def test_greedy_constrained_assd_equals_sequential(model):
    seq = run(model, n=4, method="sequential", greedy=True)
    for options in SAMPLERS.values():
        out = run(model, n=4, greedy=True, **options)
        assert torch.equal(out.input_ids, seq.input_ids)


def test_mixed_batch_constrained_and_free_rows(model):
    """Constrained and free rows share passes; each keeps its own joint."""
    half = N_SAMPLES // 2
    result = sample(model, INPUT.repeat(2 * half, 1), MASKED.repeat(2 * half, 1), k=3, one_pass=True, seed=31,
                    constraints=[row_constraints() if b % 2 == 0 else None for b in range(2 * half)])
    from exact import exact_joint

    _, p1 = g_test(draws(result.input_ids[0::2]), reference(model, "left-to-right"))
    _, p2 = g_test(draws(result.input_ids[1::2]), exact_joint(model, INPUT, MASKED, [2, 3, 5]))
    assert p1 > ALPHA and p2 > ALPHA


def test_engine_rows_joining_keep_their_constraints(model):
    from asarm.sampling import DecodeConfig, Engine

    engine = Engine(model)
    config = DecodeConfig(k=3, bonus=True)
    handles = [engine.add(INPUT, MASKED, config, seed=5, row_index=b, constraints=row_constraints()) for b in range(50)]
    engine.step()
    handles += [engine.add(INPUT, MASKED, config, seed=5, row_index=50 + b, constraints=row_constraints())
                for b in range(50)]
    engine.run()
    for h in handles:
        ids = h.result().input_ids.tolist()
        assert re.fullmatch(HOLES[0][2], (VOCAB[ids[2]] + VOCAB[ids[3]]).decode())
        assert re.fullmatch(HOLES[1][2], VOCAB[ids[5]].decode())


def test_negative_control_unconstrained_drafts_fail(model, monkeypatch):
    """Drafts drawn without the masks while verification uses them: the self-draft's first draft
    is taken as the exact conditional, so the chain is wrong (and outputs leave the constraint)."""
    from asarm.sampling import constraints as module

    original = module.constrain_pass

    def drafts_unmasked(rows, plans, logits, probs):
        saved = [row.constraint for row in rows]
        for row, plan in zip(rows, plans):
            if plan.kind == "draft":
                row.constraint = None
        try:
            return original(rows, plans, logits, probs)
        finally:
            for row, c in zip(rows, saved):
                row.constraint = c

    monkeypatch.setattr(module, "constrain_pass", drafts_unmasked)
    monkeypatch.setattr(module.RowConstraint, "fit_block", lambda self, block, *a: block)
    result = run(model, seed=1, method="assd", k=3)
    _, p = g_test(draws(result.input_ids), reference(model, "left-to-right"))
    assert p < 1e-6, f"unconstrained drafts were not rejected (p={p:.2e})"


# --- the automaton --------------------------------------------------------------------------------
@pytest.mark.parametrize("regex", ["a[ab]*c|12", "(ab|c){1,3}2?", "1[12]*", "[abc]+", "(a|12)*b"])
def test_masks_equal_brute_force(regex):
    a = automaton(regex)
    for n in range(1, 5):
        assert a.admits(n) == bool(brute_allowed(regex, [], n - 1)), (regex, n)
        for prefix_len in range(n):
            for prefix in itertools.product(VOCAB, repeat=prefix_len):
                state = a.run(prefix)
                mask = a.allowed(state, n - prefix_len - 1)
                got = set() if mask is None else set(torch.nonzero(mask).flatten().tolist())
                assert got == brute_allowed(regex, list(prefix), n - prefix_len - 1), (regex, prefix, n)


# --- always matched: 1,000 randomized cases -----------------------------------------------------
REGEXES = [r" ?[0-9]{1,4}", r" (red|blue|green)", r"[a-z_]+[0-9]?", r" [A-Z][a-z]*", r"( cat| mat)+", r"[^\n]*",
           r" ?(yes|no)", r"[0-9]+(\.[0-9][0-9])?", r" [a-z]+( [a-z]+)*"]
CHOICES = [[" red", " blue", " green"], ["cat", "dog"], [" 1984", " 42", " x = 42"]]


def test_thousand_random_cases_always_match(tok, model300):
    rng = random.Random(0)
    bytes_of = token_bytes(tok)
    configs = list(SAMPLERS.values())
    cases = []
    while len(cases) < 1000:
        spec = {"regex": rng.choice(REGEXES)} if rng.random() < 0.7 else {"choice": rng.choice(CHOICES)}
        a = compile_spec(spec, tok, 300, excluded={6})
        n = rng.randint(1, 6)
        if not a.admits(n):
            continue
        left, right = rng.randint(0, 5), rng.randint(0, 5)
        ids = [rng.randrange(7, 300) for _ in range(left)] + [6] * n + [rng.randrange(7, 300) for _ in range(right)]
        cases.append((spec, a, left, n, ids))
    for c, config in enumerate(configs):
        part = cases[c::len(configs)]
        L = max(len(x[4]) for x in part)
        ids = torch.full((len(part), L), 5)
        attn = torch.zeros(len(part), L, dtype=torch.bool)
        for b, (_, _, _, _, row) in enumerate(part):
            ids[b, :len(row)] = torch.tensor(row)
            attn[b, :len(row)] = True
        masked = (ids == 6) & attn
        cons = [[HoleConstraint(left, left + n, a)] for _, a, left, n, _ in part]
        out = sample(model300, ids, masked, attention_mask=attn, constraints=cons, seed=c, order="random",
                     suppress=tuple(range(6)), **config)
        for b, (spec, a, left, n, _) in enumerate(part):
            hole = out.input_ids[b, left:left + n].tolist()
            text = b"".join(bytes_of[t] for t in hole).decode("utf-8")
            pattern = spec["regex"] if "regex" in spec else "|".join(re.escape(x) for x in spec["choice"])
            assert re.fullmatch(pattern, text), (config, spec, text)


# --- from text ------------------------------------------------------------------------------------
def test_infill_with_constraints(tok, model300):
    for options in (dict(method="sequential"), dict(k=3), dict(draft="ngram"), dict(one_pass=True)):
        text = asarm.infill(model300, "The year [MASK:3] was cold. Colors:[MASK:1-6].", tokenizer=tok, seed=2,
                            constraints={0: {"regex": r" [0-9]+"}, "1": {"choice": [" red", " blue", " green"]}},
                            **options)
        m = re.fullmatch(r"The year( [0-9]+) was cold\. Colors:( red| blue| green)\.", text)
        assert m, text


def test_infill_json_schema_and_unknown_length(tok, model300):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    text, result = asarm.infill(model300, "x =[MASK:4-12]\n", tokenizer=tok, seed=4, return_result=True,
                                constraints={0: {"json_schema": schema}})
    value = json.loads(text[len("x ="):-1])
    assert isinstance(value["n"], int)
    # lengths no JSON object of this schema can take are not candidates
    assert all(n >= 1 for n in result.lengths[0].candidates)
    a = compile_spec({"json_schema": schema}, tok, 300, excluded={6})
    assert result.lengths[0].candidates == [n for n in range(4, 13) if a.admits(n)]


def test_unknown_length_candidates_follow_the_constraint(tok, model300):
    _, result = asarm.infill(model300, "Colors:[MASK] ok", tokenizer=tok, seed=1, return_result=True, max_hole=8,
                             constraints={0: {"choice": [" red"]}})
    a = compile_spec({"choice": [" red"]}, tok, 300, excluded={6})
    assert result.lengths[0].candidates == [n for n in range(1, 9) if a.admits(n)]


@pytest.mark.parametrize("constraints, message", [
    ({0: {"regex": "a("}}, "invalid regex"),
    ({0: {"regex": "x"}, 1: {"regex": "y"}}, "no hole 1"),
    ({0: {"choice": []}}, "non-empty list"),
    ({0: {"regex": "a", "choice": ["a"]}}, "exactly one of"),
    ({0: {"json_schema": "{not json"}}, "not valid JSON"),
    ({0: {"choice": [" red"]}}, "no text of 6 tokens"),
    ({"first": {"regex": "a"}}, "hole indices"),
    ([{"regex": "a"}], "must be an object"),
])
def test_bad_constraints_are_one_clear_error(tok, model300, constraints, message):
    with pytest.raises(InputError, match=message):
        asarm.infill(model300, "Colors:[MASK:6] ok", tokenizer=tok, seed=1, constraints=constraints)


def test_escape_regex_matches_literally():
    a = compile_regex(escape_regex("a+b.c"), {0: b"a", 1: b"+", 2: b"b", 3: b".", 4: b"c"}, 5)
    assert a.accepts([0, 1, 2, 3, 4]) and not a.accepts([0, 2, 3, 4])


def test_compiled_automata_are_cached(tok):
    spec = {"regex": r" [0-9]+"}
    assert compile_spec(spec, tok, 300, {6}) is compile_spec(dict(spec), tok, 300, [6])


# --- interfaces -------------------------------------------------------------------------------------
def test_cli_constraints(capsys):
    from asarm.cli import main

    code = main(["infill", "Born in [MASK:2] and dressed in [MASK:3].", "--model", "asarm-en-small", "--seed", "1",
                 "--constraint", "0:regex: [0-9]{4}", "--constraint", "1:choice: red| dark blue"])
    out = capsys.readouterr().out
    assert code == 0 and re.fullmatch(r"Born in [0-9]{4} and dressed in( red| dark blue)\.\n", out), out
    code = main(["infill", "A [MASK:2] b.", "--model", "asarm-en-small", "--constraints", '{"0": {"regex": "a("}}'])
    captured = capsys.readouterr()
    assert code == 2 and "invalid regex" in captured.err and captured.out == ""
    code = main(["infill", "A [MASK:2] b.", "--model", "asarm-en-small", "--constraint", "3:regex:x"])
    assert code == 2 and "no hole 3" in capsys.readouterr().err


def test_server_constraints():
    import httpx
    from serve_util import running_server

    with running_server(max_batch=8) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/infill", json={"text": "Born in [MASK:2], dressed in [MASK].", "seed": 3, "n": 3,
                                            "constraints": {"0": {"regex": r" [0-9]{4}"},
                                                            "1": {"choice": [" red", " dark blue"]}}})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert re.fullmatch(r"Born in [0-9]{4}, dressed in( red| dark blue)\.", choice["text"]), choice
        r = client.post("/v1/completions", json={"prompt": "The colour is ", "suffix": ".", "max_tokens": 6,
                                                 "guided_choice": ["red", "dark blue"], "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] in ("red", "dark blue")
        r = client.post("/v1/completions", json={"prompt": "Year:", "max_tokens": 6, "guided_regex": r" [0-9]{4}",
                                                 "seed": 1})
        assert r.status_code == 200 and re.fullmatch(r" [0-9]{4}", r.json()["choices"][0]["text"]), r.text
        for body in ({"text": "a [MASK:2] b", "constraints": {"0": {"regex": "a("}}},
                     {"text": "a [MASK:2] b", "constraints": {"1": {"regex": "a"}}},
                     {"text": "a [MASK:1] b", "constraints": {"0": {"choice": [" a b c d e f g h"]}}}):
            r = client.post("/v1/infill", json=body)
            assert r.status_code == 400, r.text


def test_json_options_name_the_option_and_what_to_give(tmp_path):
    """One helper parses --constraints, --defaults (batch) and --length-prior; its errors stay specific."""
    from asarm.cli_args import json_option

    spec = tmp_path / "constraints.json"
    spec.write_text('{"0": {"regex": "[0-9]+"}}')
    assert json_option(str(spec), "--constraints", "an object", source="inline-or-file") == {"0": {"regex": "[0-9]+"}}
    assert json_option('{"k": 2}', "--defaults", "an object") == {"k": 2}
    assert json_option("[0.5, 0.5]", "--length-prior", "weights", types=(dict, list)) == [0.5, 0.5]
    for args, kwargs, message in [
        (("{oops", "--constraints", "an object"), dict(source="inline-or-file"), "--constraints is not valid JSON"),
        (("[1]", "--defaults", "a JSON object of body fields"), {}, "--defaults must be a JSON object of body fields"),
        ((str(tmp_path / "none.json"), "--length-prior", "weights"), dict(source="file"), "--length-prior: cannot read"),
        (("[" * 100_000, "--defaults", "an object"), {}, "nested too deeply"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            json_option(*args, **kwargs)
