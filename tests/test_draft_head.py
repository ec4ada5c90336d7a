"""The learned draft head (``asarm.draft_head``, ``draft="head"``) keeps ASSD exact, trains, saves
and loads.

- G-tests against the enumerated joint of tiny models (the suite's `transformers` reference,
  tests/exact.py) with a random head that disagrees strongly with the model: two-pass and
  one-pass rounds, k in {2, 3}, two temperatures, top-k, adaptive k. A negative control that
  must fail: a head drafter that draws from its head but reports the self-draft's marginal as
  the proposal.
- Greedy head drafting equals greedy sequential decoding token for token.
- ``asarm train-draft`` runs end to end on a tiny model with a tokenizer and saves a head that
  ``load_model`` picks up; heads that do not match their model, corrupt files and models
  without a head fail with clear errors. ``--init-from`` starts a run from a saved head's weights
  and refuses a directory without a head, ``--resume`` and a different ``--d-hidden``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from asarm.draft_head import DraftHead, DraftHeadConfig, load_head, save_head
from asarm.errors import CheckpointError, InputError
from asarm.sampling import sample
from asarm.sampling.config import DecodeConfig
from asarm.sampling.drafts import HeadDrafter
from asarm.sampling.target import draw
from conftest import tiny_model
from exact import exact_joint, g_test, stable_seed
from test_block_verification import LONG_INPUT, LONG_MASKED, SMALL, greedy_case
from test_exactness import INPUT, MASKED, draws, reference

ALPHA = 1e-3
N_SAMPLES = 3000


def random_head(model, seed: int = 0, scale: float = 0.7) -> DraftHead:
    """A head whose drafts differ a lot from the model's marginals (and from its conditionals)."""
    torch.manual_seed(seed)
    head = DraftHead(DraftHeadConfig(model.config.d_model, model.config.vocab_size, d_hidden=16))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, scale)
    return head.eval()


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=3)
    m.attach_draft_head(random_head(m))
    return m


@pytest.fixture(scope="module")
def small_model():
    m = tiny_model(seed=5, **SMALL)
    m.attach_draft_head(random_head(m, seed=1))
    return m


@pytest.fixture(scope="module")
def long_joints(small_model):
    hidden = torch.nonzero(LONG_MASKED).flatten().tolist()
    return {t: exact_joint(small_model, LONG_INPUT, LONG_MASKED, hidden, t) for t in (0.6, 1.0)}


TWO_PASS = [(2, 0.6), (3, 1.0)]


@pytest.mark.parametrize("k,temperature", TWO_PASS, ids=[f"k{k}-T{t}" for k, t in TWO_PASS])
def test_head_drafts_match_exact_joint(model, k, temperature):
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), draft="head", k=k,
                    temperature=temperature, seed=stable_seed("head", k, temperature))
    _, p = g_test(draws(result, MASKED), reference(model, temperature, "left-to-right"))
    assert p > ALPHA, f"head k={k} T={temperature}: G-test p={p:.2e}"


def test_head_drafts_in_random_order_match_exact_joint(model):
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), draft="head", k=3,
                    order="random", bonus=True, seed=stable_seed("head-random"))
    _, p = g_test(draws(result, MASKED), reference(model, 1.0, "random"))
    assert p > ALPHA


ONE_PASS = [(dict(k=2), 1.0), (dict(k=3), 0.6), (dict(k=2, adaptive_k=True), 1.0)]


@pytest.mark.parametrize("options,temperature", ONE_PASS,
                         ids=[f"{'-'.join(f'{a}{b}' for a, b in o.items())}-T{t}" for o, t in ONE_PASS])
def test_one_pass_head_drafts_match_exact_joint(small_model, long_joints, options, temperature):
    result = sample(small_model, LONG_INPUT.repeat(N_SAMPLES, 1), LONG_MASKED.repeat(N_SAMPLES, 1), draft="head",
                    one_pass=True, temperature=temperature, seed=stable_seed("head-one-pass", *options.items(),
                                                                             temperature), **options)
    _, p = g_test(draws(result, LONG_MASKED), long_joints[temperature])
    assert p > ALPHA, f"one-pass head {options} T={temperature}: G-test p={p:.2e}"


def _top_k_joint(model, input_ids, masked, k, temperature):
    def truncate(logits):
        x = logits / temperature
        kth = torch.topk(x, k, dim=-1).values[..., -1:]
        return x.masked_fill(x < kth, -float("inf"))

    return exact_joint(model, input_ids, masked, torch.nonzero(masked).flatten().tolist(), transform=truncate)


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
def test_head_with_top_k_matches_exact_joint(small_model, one_pass):
    joint = _top_k_joint(small_model, LONG_INPUT, LONG_MASKED, 2, 0.8)
    result = sample(small_model, LONG_INPUT.repeat(N_SAMPLES, 1), LONG_MASKED.repeat(N_SAMPLES, 1), draft="head",
                    one_pass=one_pass, k=3, temperature=0.8, top_k=2, seed=stable_seed("head-topk", one_pass))
    _, p = g_test(draws(result, LONG_MASKED), joint)
    assert p > ALPHA


def test_negative_control_wrong_proposal_fails(small_model, long_joints, monkeypatch):
    """Drafts drawn from the head but reported as drawn from the self-draft's marginal (the
    pass's own distribution): verification then corrects the wrong thing and the joint is off."""
    original = HeadDrafter.draft

    def wrong(self, hidden, positions, prev_token, prev_pos, target, generator, first=None):
        tokens, probs = original(self, hidden, positions, prev_token, prev_pos, target, generator, first)
        marginal = target.probs(hidden[: len(tokens)].float() @ self.embedding.T + self.bias)
        if first is not None:
            marginal[0] = probs[0]
        return tokens, marginal.to(probs)

    monkeypatch.setattr(HeadDrafter, "draft", wrong)
    result = sample(small_model, LONG_INPUT.repeat(N_SAMPLES, 1), LONG_MASKED.repeat(N_SAMPLES, 1), draft="head",
                    one_pass=True, k=3, seed=stable_seed("head-negative"))
    _, p = g_test(draws(result, LONG_MASKED), long_joints[1.0])
    assert p < 1e-6, f"a wrong proposal was not detected (p={p:.2e})"


def test_greedy_head_equals_greedy_sequential():
    wide, ids, masked = greedy_case()
    wide.attach_draft_head(random_head(wide, seed=4, scale=0.3))
    for order in ("left-to-right", "random"):
        expected = sample(wide, ids, masked, method="sequential", greedy=True, order=order, seed=1).input_ids
        for options in (dict(k=5), dict(k=3, one_pass=True), dict(k=3, one_pass=True, adaptive_k=True),
                        dict(k=4, bonus=True, verification="block")):
            res = sample(wide, ids, masked, greedy=True, order=order, seed=1, draft="head", **options)
            assert torch.equal(res.input_ids, expected), (order, options)


def test_same_seed_same_tokens(model):
    ids, masked = INPUT.repeat(4, 1), MASKED.repeat(4, 1)
    a = sample(model, ids, masked, draft="head", one_pass=True, k=2, seed=11).input_ids
    b = sample(model, ids, masked, draft="head", one_pass=True, k=2, seed=11).input_ids
    assert torch.equal(a, b)


def test_untrained_head_drafts_the_self_drafts_distribution():
    """The head's correction starts at zero: an untrained head proposes the pass's own marginal."""
    m = tiny_model(seed=3)
    head = DraftHead(DraftHeadConfig(m.config.d_model, m.config.vocab_size, d_hidden=16)).eval()
    m.attach_draft_head(head)
    drafter = HeadDrafter(head, m)
    hidden = torch.randn(3, m.config.d_model)
    target = __import__("asarm.sampling.config", fromlist=["DecodeConfig"]).DecodeConfig().target(6)
    _, probs = drafter.draft(hidden, [2, 3, 4], 1, 1, target, torch.Generator().manual_seed(0))
    expected = target.probs(hidden @ m.transformer.word_embedding.weight.T + m.lm_loss.bias)
    torch.testing.assert_close(probs, expected)


@torch.no_grad()  # as sampling runs (oneDNN's bf16 linear takes another path for inputs that need grad)
def step_by_step_drafts(drafter, hidden, positions, prev_token, prev_pos, target, generator, first=None):
    """The head's drafting written plainly, one ``DraftHead.step`` per position (as training's
    ``forward_blocks`` computes it): what ``HeadDrafter.draft``'s restructured loop must equal."""
    tokens, probs, state = [], [], None
    for i, pos in enumerate(positions):
        gap = 0 if prev_pos is None else pos - prev_pos
        out, state = drafter.head.step(hidden[i : i + 1].float(), drafter.embedding[prev_token][None],
                                       torch.tensor([i]), torch.tensor([gap]), state)
        if i == 0 and first is not None:
            token, p = first
        else:
            p = target.probs(drafter._readout(out))[0]
            token = int(draw(p, torch.rand((), generator=generator, dtype=torch.float64)))
        tokens.append(token)
        probs.append(p)
        prev_token, prev_pos = token, pos
    return tokens, torch.stack(probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_drafter_equals_the_step_by_step_head_bit_for_bit(dtype):
    """Gathering the step/gap embeddings per block and filling the linears' operands in place
    changes no bit: same tokens, same proposals, for gaps past MAX_GAP, negative gaps (random
    orders), steps past max_steps, an exact first draft and a block starting the order."""
    m = tiny_model(seed=2, vocab_size=40, d_model=32).to(dtype)
    head = random_head(m, seed=4, scale=0.3)
    head.config = DraftHeadConfig(32, 40, d_hidden=16, max_steps=3)
    head.step_emb = torch.nn.Embedding(3, 16)
    drafter = HeadDrafter(head, m)
    target = DecodeConfig(temperature=0.8).target(6)
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        hidden = torch.randn(5, 32, generator=g).to(dtype)
        positions = torch.randperm(40, generator=g)[:5].tolist()
        prev_pos = None if trial % 3 == 0 else 45
        first = (3, torch.softmax(torch.randn(40, generator=g), 0)) if trial % 2 else None
        got = drafter.draft(hidden, positions, 5, prev_pos, target, torch.Generator().manual_seed(trial), first)
        want = step_by_step_drafts(drafter, hidden, positions, 5, prev_pos, target,
                                   torch.Generator().manual_seed(trial), first)
        assert got[0] == want[0], trial
        assert torch.equal(got[1], want[1]), trial
    if dtype == torch.bfloat16 and drafter.packed_readout is not None:
        # the prepacked LM head reads out what linear does (the same bits at the shipped model's
        # shapes; at this tiny one's, oneDNN may round a rare logit the other way)
        rows = torch.randn(50, 32, generator=g) * 4
        packed = torch.cat([drafter._readout(row[None]) for row in rows]).float()
        plain = torch.nn.functional.linear(rows.bfloat16(), m.transformer.word_embedding.weight, m.lm_loss.bias.bfloat16())
        torch.testing.assert_close(packed, plain.float(), atol=0.0, rtol=2**-7)


# --- files and errors ----------------------------------------------------------------------------
def test_model_without_head_is_a_clear_error():
    m = tiny_model(seed=3)
    with pytest.raises(InputError, match="train-draft"):
        sample(m, INPUT, MASKED, draft="head", seed=0)


def test_mismatched_and_corrupt_heads(tmp_path):
    m = tiny_model(seed=3)
    with pytest.raises(CheckpointError, match="d_model"):
        m.attach_draft_head(DraftHead(DraftHeadConfig(m.config.d_model + 8, m.config.vocab_size)))
    save_head(DraftHead(DraftHeadConfig(m.config.d_model, m.config.vocab_size + 1, d_hidden=8)), tmp_path)
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_head(tmp_path, m.config)
    save_head(random_head(m), tmp_path)
    assert load_head(tmp_path, m.config).config.d_hidden == 16
    (tmp_path / "draft_head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_head(tmp_path, m.config)
    (tmp_path / "draft_head.json").write_text(json.dumps({"d_model": 16}))
    with pytest.raises(CheckpointError, match="not an asarm draft-head config"):
        load_head(tmp_path, m.config)


def _tiny_recipe(tmp_path):
    """A tiny model with a tokenizer saved in tmp_path/model, and a training config (its recipe)."""
    from asarm.data import load_documents
    from asarm.tokenization import train_tokenizer
    from test_train import corpus_text

    data = tmp_path / "docs"
    data.mkdir()
    for i, doc in enumerate(corpus_text().split("\n\n")):
        (data / f"{i:03d}.txt").write_text(doc + "\n")
    tokenizer = train_tokenizer(load_documents(data), 300, kind="text")
    model = tiny_model(seed=1, vocab_size=len(tokenizer), d_model=32, max_length=32,
                       mask_token_id=tokenizer.mask_token_id)
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"data": [str(data)], "valid_fraction": 0.2, "seq_len": 32, "tokenizer_kind": "text",
                                  "init_from": str(tmp_path / "model")}))  # a training config: the data recipe
    return tokenizer, config


def test_train_draft_end_to_end(tmp_path, capsys):
    from asarm.checkpoint import load_model
    from asarm.cli import main

    tokenizer, config = _tiny_recipe(tmp_path)
    argv = ["train-draft", str(tmp_path / "model"), "--config", str(config), "--steps", "3", "--batch-size", "4",
            "--dtype", "fp32", "--threads", "1"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["trained"]["steps"] == 3 and report["d_model"] == 32
    loaded = load_model(tmp_path / "model", device="cpu")
    assert loaded.draft_head is not None and not (tmp_path / "model" / "draft_head.train.pt").exists()
    ids = torch.tensor(tokenizer("the cat sat on the mat and the dog")["input_ids"][:20])
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.7
    for one_pass in (False, True):
        out = sample(loaded, ids, masked, draft="head", one_pass=one_pass, k=3, seed=0)
        assert not (out.input_ids == loaded.config.mask_token_id).any()
    # an unfinished run is not silently overwritten
    (tmp_path / "model" / "draft_head.train.pt").write_bytes(b"")
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err


def test_return_hidden_is_what_the_lm_head_reads_fast_and_eager():
    m = tiny_model(seed=3)
    ids = INPUT[None]
    pos = torch.arange(ids.shape[1])[None]
    ranks = torch.where(MASKED, 0, 0)[None]  # every token visible to every query (rank 0 keys)
    queries, qrank = torch.tensor([[2, 3, 5]]), torch.ones(1, 3, dtype=torch.long)
    results = []
    for fast in (False, True):
        m.use_fast_path(fast)
        with torch.no_grad():
            logits, hidden = m.forward_rows(ids, pos, ranks, queries, qrank, return_hidden=True)
            assert torch.equal(logits, m.forward_rows(ids, pos, ranks, queries, qrank))
        torch.testing.assert_close(logits, m.lm_loss(hidden))
        results.append(hidden)
    torch.testing.assert_close(results[0], results[1])


def test_bf16_model_drafts_through_its_bf16_lm_head_and_stays_exact_in_greedy():
    wide = tiny_model(seed=2, vocab_size=40, d_model=32).to(torch.bfloat16)
    wide.attach_draft_head(random_head(wide, seed=4, scale=0.3))
    assert HeadDrafter(wide.draft_head, wide).bf16_readout
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 40, (3, 16), generator=g)
    ids[ids == 6] = 7
    masked = torch.rand(3, 16, generator=g) < 0.8
    expected = sample(wide, ids, masked, method="sequential", greedy=True, seed=1).input_ids
    for options in (dict(k=4), dict(k=3, one_pass=True)):
        assert torch.equal(sample(wide, ids, masked, greedy=True, seed=1, draft="head", **options).input_ids, expected)


def test_train_draft_resumes_an_interrupted_run(tmp_path, monkeypatch):
    from asarm.checkpoint import load_model
    from asarm.train import draft

    _, config = _tiny_recipe(tmp_path)
    model = load_model(tmp_path / "model", device="cpu")
    out = tmp_path / "head"
    options = draft.DraftTrainOptions(steps=4, batch_size=4, save_every=3, eval_every=100, d_hidden=16)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(draft, "save_head", interrupted)  # killed after its last resumable state
    with pytest.raises(KeyboardInterrupt):
        draft.train_draft_head(model, str(config), out, options, log=lambda *a: None)
    assert (out / draft.STATE).is_file() and not (out / "draft_head.safetensors").exists()
    monkeypatch.undo()
    with pytest.raises(InputError, match="--resume"):
        draft.train_draft_head(model, str(config), out, options, log=lambda *a: None)
    lines = []
    draft.train_draft_head(model, str(config), out, options, resume=True, log=lines.append)
    assert "resuming at step 3" in lines[1]
    assert json.loads((out / "draft_head.json").read_text())["trained"]["steps"] == 4


def test_init_from_a_shipped_models_name_takes_its_head():
    from asarm.checkpoint import load_model
    from asarm.storage import SHIPPED_DIR
    from asarm.train.draft import initial_head

    model = load_model("asarm-en-small", dtype="fp32")
    head, source = initial_head(model, "asarm-en-small", None)
    shipped = load_head(SHIPPED_DIR / "asarm-en-small", model.config).state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in head.state_dict().items())
    assert source["head"] == str(SHIPPED_DIR / "asarm-en-small") and source["steps"] > 0


def test_train_draft_init_from_starts_from_a_saved_head(tmp_path, capsys, monkeypatch):
    """--init-from: the new run's head starts with the saved head's weights (what the optimizer is
    built on, before any step), trains on from them, and its json names where it came from."""
    from asarm.checkpoint import load_model
    from asarm.cli import main
    from asarm.train import draft

    _, config = _tiny_recipe(tmp_path)
    model = load_model(tmp_path / "model", device="cpu")
    source = tmp_path / "source"
    save_head(random_head(model, seed=5, scale=0.2), source, meta={"trained": {"steps": 7, "minutes": 0.5}})
    expected = load_head(source, model.config).state_dict()
    assert expected["out.weight"].abs().sum() > 0  # unlike an untrained head's zero output layer
    built_on = []
    adamw = torch.optim.AdamW

    def spy(params, **kwargs):
        params = list(params)
        built_on.append([p.detach().clone() for p in params])
        return adamw(params, **kwargs)

    monkeypatch.setattr(draft.torch.optim, "AdamW", spy)
    out = tmp_path / "longer"
    argv = ["train-draft", str(tmp_path / "model"), "--config", str(config), "--steps", "2", "--batch-size", "4",
            "--dtype", "fp32", "--threads", "1", "--out", str(out), "--init-from", str(source), "--lr", "1e-2",
            "--warmup-steps", "1"]
    assert main(argv) == 0
    monkeypatch.undo()
    names = [name for name, _ in draft.DraftHead(load_head(source, model.config).config).named_parameters()]
    assert len(built_on) == 1 and len(names) == len(built_on[0])
    for name, start in zip(names, built_on[0]):
        assert torch.equal(start, expected[name]), name
    trained = load_head(out, model.config).state_dict()
    assert not torch.equal(trained["out.weight"], expected["out.weight"])  # and it did train on
    meta = json.loads((out / "draft_head.json").read_text())
    assert meta["d_hidden"] == 16  # the source's width, without --d-hidden
    assert meta["trained"]["init_from"] == {"head": str(source), "steps": 7, "minutes": 0.5}
    assert meta["trained"]["steps"] == 2 and meta["trained"]["warmup_steps"] == 1
    capsys.readouterr()

    options = draft.DraftTrainOptions(steps=1, batch_size=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"--init-from .*empty: no draft head there \(no draft_head.safetensors\)"):
        draft.train_draft_head(model, str(config), tmp_path / "x", options, init_from=empty, log=lambda *a: None)
    with pytest.raises(InputError, match="--init-from starts a new run.*--resume continues"):
        draft.train_draft_head(model, str(config), tmp_path / "x", options, resume=True, init_from=source,
                               log=lambda *a: None)
    with pytest.raises(InputError, match="its head has d_hidden 16, not the --d-hidden 32"):
        draft.train_draft_head(model, str(config), tmp_path / "x", dataclasses.replace(options, d_hidden=32),
                               init_from=source, log=lambda *a: None)
    save_head(DraftHead(DraftHeadConfig(model.config.d_model + 1, model.config.vocab_size, 8)), tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not match its model"):
        draft.train_draft_head(model, str(config), tmp_path / "x", options, init_from=tmp_path / "other",
                               log=lambda *a: None)
    assert main(argv[:argv.index("--init-from")] + ["--init-from", str(empty)]) == 2  # the CLI says the same
    assert "no draft head there" in capsys.readouterr().err
