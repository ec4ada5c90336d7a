"""Hole markup, parsing to ids/masks, and infill end to end (fake and real sampler)."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import tiny_model

import asarm
import asarm.sampling
from asarm.errors import InputError
from asarm.text import parse_scored_text
from asarm.text import Hole, fill_text, infill, parse_infill, parse_markup, split_markup, stream_infill
from asarm.tokenization import decode, decode_text, encode

# --- markup -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, parts", [
    ("The cat [MASK:3] mat.", ["The cat ", 3, " mat."]),
    ("[MASK:2]start", [2, "start"]),
    ("end[MASK:20]", ["end", 20]),
    ("[MASK:30]", [30]),
    ("a[MASK:1][MASK:2]b", ["a", 1, 2, "b"]),
    ("x [MASK: 4 ] y", ["x ", 4, " y"]),  # spaces around the number are allowed: [MASK: 3] is 3
    ("a [MASK] b", ["a ", Hole(), " b"]),
    ("[MASK:2-5]x", [Hole(2, 5), "x"]),
    ("[MASK: 2 - 5 ]", [Hole(2, 5)]),
    ("[MASK:3-3]", [3]),
    ("[MASK:007]", [7]),
    (r"literal \[MASK:3] here", ["literal [MASK:3] here"]),
    (r"back\\slash[MASK:1]", ["back\\slash", 1]),
    (r"other \n backslash", [r"other \n backslash"]),
    ("xs[0] + d['k'] [MASKED] [mask:3]", ["xs[0] + d['k'] [MASKED] [mask:3]"]),
    ("", []),
    ("no holes", ["no holes"]),
])
def test_parse_markup(text, parts):
    assert parse_markup(text) == parts


@pytest.mark.parametrize("text, message", [
    ("a [MASK:5-2] b", "from the shorter length to the longer"),
    ("a [MASK:0-3] b", "at least 1"),
    ("a [MASK:10^30] b", "whole number of tokens"),
    ("a [MASK:1000000000000000000000000000000] b", "far beyond any model's length limit"),
    ("a [MASK:1-99999999] b", "far beyond any model's length limit"),
    ("a [MASK:0] b", "at least 1"),
    ("a [MASK:-2] b", "at least 1"),
    ("a [MASK:abc] b", "whole number of tokens"),
    ("a [MASK:2.5] b", "whole number of tokens"),
    ("a [MASK:3 b", "bad hole markup.*closing bracket"),
    ("a [MASK", "bad hole markup"),
    ("a [MASK:", "bad hole markup"),
])
def test_bad_markup(text, message):
    with pytest.raises(InputError, match=message):
        parse_markup(text)


def test_markup_error_says_where():
    with pytest.raises(InputError, match="at character 4"):
        parse_markup("abc [MASK:x]")


# --- parse_infill -----------------------------------------------------------------------------
def test_parse_infill_lengths(tok):
    ids, masked = parse_infill(tok, "The cat[MASK:3] on the mat.")
    pre, post = encode(tok, "The cat"), encode(tok, " on the mat.")
    assert ids.dtype == torch.long and masked.dtype == torch.bool
    assert ids.tolist() == pre + [6, 6, 6] + post
    assert masked.tolist() == [False] * len(pre) + [True] * 3 + [False] * len(post)


def test_parse_infill_shapes(tok):
    ids, masked = parse_infill(tok, "[MASK:30]")
    assert ids.tolist() == [6] * 30 and bool(masked.all())
    ids, masked = parse_infill(tok, "[MASK:2][MASK:3]x")
    assert masked.tolist()[:5] == [True] * 5 and not masked[5:].any()
    ids, masked = parse_infill(tok, "Once upon a time[MASK:4]")
    assert masked[-4:].all() and not masked[:-4].any()


def test_parse_infill_escape_and_literal_mask(tok):
    ids, masked = parse_infill(tok, r"a \[MASK:2] <mask> b")
    assert not masked.any()
    assert decode(tok, ids) == "a [MASK:2] <mask> b"


def test_parse_infill_mask_id_and_max_length(tok):
    ids, _ = parse_infill(tok, "[MASK:2]", mask_token_id=4)
    assert ids.tolist() == [4, 4]
    parse_infill(tok, "[MASK:8]", max_length=8)
    with pytest.raises(InputError, match="9 tokens long.*maximum length of 8"):
        parse_infill(tok, "[MASK:9]", max_length=8)


def test_fill_text(tok):
    ids = encode(tok, "  x\n\ty ")
    assert fill_text(tok, torch.tensor(ids)) == "  x\n\ty "
    assert fill_text(tok, torch.tensor([ids])) == "  x\n\ty "
    assert fill_text(tok, ids) == "  x\n\ty "
    with pytest.raises(InputError, match="one sequence"):
        fill_text(tok, torch.tensor([ids, ids]))


# --- infill with a fake sampler ---------------------------------------------------------------
def fake_sampler(fill_id, calls):
    def sample(model, input_ids, masked, **options):
        calls.append((input_ids.clone(), masked.clone(), options))
        out = input_ids.clone()
        out[masked] = fill_id
        n = int(masked.sum())
        return types.SimpleNamespace(input_ids=out[None], nfe=n, rounds=n, accepted=[1] * n)
    return sample


def test_infill_with_fake_sampler(tok, model300, monkeypatch):
    calls = []
    x_id = encode(tok, "x")[0]
    monkeypatch.setattr(asarm.sampling, "sample", fake_sampler(x_id, calls))
    text = "  The cat\tsat [MASK:3] on\n\nthe mat.  "
    out = infill(model300, text, tokenizer=tok, method="sequential", seed=3, k=4)
    # the space before the hole moved into the hole (the tokenizer attaches it to the next word):
    # a real model writes it with its first token, this fake one fills "x"s
    assert out == "  The cat\tsatxxx on\n\nthe mat.  "
    ids, masked, options = calls[0]
    assert options == {"method": "sequential", "seed": 3, "k": 4, "suppress": (0, 1, 2, 3, 4, 5, 6)}
    assert ids[masked].tolist() == [model300.config.mask_token_id] * 3


def test_infill_return_result_and_model_tokenizer(tok, model300, monkeypatch):
    calls = []
    monkeypatch.setattr(asarm.sampling, "sample", fake_sampler(encode(tok, "a")[0], calls))
    model = tiny_model(seed=7, vocab_size=300)
    model.tokenizer = tok
    out, result = infill(model, "[MASK:2]b[MASK:1]", return_result=True)
    assert out == "aaba" and result.nfe == 3
    assert asarm.infill is infill


def test_infill_errors(tok, model300, monkeypatch):
    monkeypatch.setattr(asarm.sampling, "sample", fake_sampler(0, []))
    with pytest.raises(InputError, match="no tokenizer"):
        infill(model300, "a [MASK:2]")
    with pytest.raises(InputError, match="no holes"):
        infill(model300, "nothing to do", tokenizer=tok)
    with pytest.raises(InputError, match="max_hole must be an integer >= 1"):
        infill(model300, "a [MASK] b", tokenizer=tok, max_hole=0)
    with pytest.raises(InputError, match="unknown length.*use infill"):
        parse_infill(tok, "a [MASK] b")
    small = tiny_model()  # vocab 8: the tokenizer's ids do not fit
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        infill(small, "The cat [MASK:2]", tokenizer=tok)
    limited = tiny_model(seed=7, vocab_size=300, max_length=10)
    infill(limited, "[MASK:10]", tokenizer=tok)
    with pytest.raises(InputError, match="maximum length of 10"):
        infill(limited, "The cat sat on the mat [MASK:6]", tokenizer=tok)


# --- infill with the real sampler ---------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"method": "assd", "draft": "self", "k": 3},
    {"method": "sequential"},
    {"method": "assd", "draft": "ngram", "k": 4},
])
def test_infill_real_sampler(tok, model300, options):
    text = "The cat [MASK:5] on the\n\tmat.[MASK:3]"
    out, result = infill(model300, text, tokenizer=tok, return_result=True, seed=0, **options)
    ids, masked = parse_infill(tok, text)
    filled = result.input_ids.view(-1)
    assert filled.shape == ids.shape
    assert torch.equal(filled[~masked], ids[~masked])  # visible tokens untouched
    assert not (filled[masked] == model300.config.mask_token_id).any()  # mask never sampled
    assert out == decode_text(tok, filled.tolist())
    assert int(result.nfe) >= 1
    again = infill(model300, text, tokenizer=tok, seed=0, **options)
    assert again == out  # seeded runs repeat


def test_infill_real_sampler_unconditional(tok, model300):
    out, result = infill(model300, "[MASK:6]", tokenizer=tok, return_result=True, seed=1)
    assert result.input_ids.numel() == 6
    assert out == decode_text(tok, result.input_ids.view(-1).tolist())


# --- word boundaries with the shipped tokenizers -------------------------------------------------
@pytest.fixture(scope="module", params=["asarm-en-small", "asarm-py-small"])
def shipped_tok(request):
    return asarm.load_model(request.param).tokenizer


@pytest.mark.parametrize("full, marked, middle", [
    ("The cat sat on the mat.", "The [MASK:1] sat on the mat.", " cat"),
    ("The cat sat on the mat.", "The[MASK:1] sat on the mat.", " cat"),
    ("def add(a, b):\n    return a + b\n", "def add(a, b):\n    [MASK:1] a + b\n", " return"),
])
def test_hole_markup_splits_where_the_tokenizer_does(shipped_tok, full, marked, middle):
    segments, holes = split_markup(shipped_tok, marked)
    assert holes == [1]
    # the tokenizer's own encoding of the filled text: context segments + the middle's token
    assert encode(shipped_tok, full) == segments[0] + encode(shipped_tok, middle) + segments[1]


def test_span_markup_puts_the_leading_space_in_the_span(shipped_tok):
    a_ids, a_hidden = parse_scored_text(shipped_tok, "the cat sat on the [[mat]].")
    b_ids, b_hidden = parse_scored_text(shipped_tok, "the cat sat on the[[ mat]].")
    assert torch.equal(a_ids, b_ids) and torch.equal(a_hidden, b_hidden)
    assert a_ids[a_hidden].tolist() == encode(shipped_tok, " mat")
    assert a_ids.tolist() == encode(shipped_tok, "the cat sat on the mat.")
    c_ids, c_hidden = parse_scored_text(shipped_tok, "x [[ mat]]")  # a space already inside stays one space
    assert decode(shipped_tok, c_ids.tolist()) == "x  mat"


@pytest.mark.parametrize("text, message", [
    ("the [[mat", "unclosed \\[\\[ at character 4"),
    ("a [[b [[c]] d", "unclosed or nested"),
    ("the [[]] x", "empty"),
])
def test_scored_text_errors(tok, text, message):
    with pytest.raises(InputError, match=message):
        parse_scored_text(tok, text)


# --- text hygiene: no special tokens, no U+FFFD ------------------------------------------------
def test_infill_excludes_special_tokens_inside_the_target(tok, model300):
    """A model that prefers <unk>, <s>, padding: infill never writes them (they are excluded
    from the target), unless allow_special=True."""
    from asarm.tokenization import special_text_ids

    special = special_text_ids(tok)
    assert set(special) >= {tok.unk_token_id, tok.pad_token_id, tok.bos_token_id}
    assert tok.eos_token_id not in special  # end-of-text stays: stop_at="</s>" needs it
    excluded = set(special) | {tok.eos_token_id}  # end-of-text too, unless stop_at may cut at it
    biased = tiny_model(seed=7, vocab_size=300)
    with torch.no_grad():
        biased.lm_loss.bias[sorted(excluded)] += 8.0
    text = "the cat [MASK:6] mat."
    allowed = []
    for seed in range(4):
        for options in ({}, {"method": "assd", "k": 3}):
            out, result = infill(biased, text, tokenizer=tok, return_result=True, seed=seed, **options)
            assert not set(result.input_ids.view(-1).tolist()) & excluded, (seed, options)
            _, free = infill(biased, text, tokenizer=tok, return_result=True, seed=seed, allow_special=True, **options)
            allowed += free.input_ids.view(-1).tolist()
    assert set(allowed) & set(special)  # the bias works: without the exclusion they are drawn
    # with stop_at the end-of-text token stays drawable, so the text can be cut at "</s>"
    _, kept = infill(biased, "the cat[MASK:1-4]", tokenizer=tok, return_result=True, seed=0, stop_at="</s>")
    assert tok.eos_token_id in kept.input_ids.view(-1).tolist()


def test_decode_text_drops_invalid_utf8_only(shipped_tok):
    e_acute = encode(shipped_tok, "é")
    assert len(e_acute) == 2  # two byte tokens: a sampler can draw the first without the second
    broken = encode(shipped_tok, "ab") + e_acute[:1] + encode(shipped_tok, " ok")
    assert "\ufffd" in decode(shipped_tok, broken)
    assert decode_text(shipped_tok, broken) == "ab ok"
    literal = "café \ufffd ok"  # a U+FFFD that is really in the text stays
    assert decode_text(shipped_tok, encode(shipped_tok, literal)) == literal


def test_stream_infill_never_shows_a_replacement_character(tok, model300, monkeypatch):
    lone_byte = tok.convert_tokens_to_ids("Ã")  # the first byte of "é" alone: invalid UTF-8
    monkeypatch.setattr(asarm.sampling, "sample", _streaming_fake(lone_byte))
    pieces = []
    out, _ = stream_infill(model300, "the [MASK:3] mat", pieces.append, tokenizer=tok, seed=0)
    assert "".join(pieces) == out == infill(model300, "the [MASK:3] mat", tokenizer=tok, seed=0)
    assert "\ufffd" not in out and out == "the mat"


def _streaming_fake(fill_id):
    def sample(model, input_ids, masked, callback=None, **options):
        out = input_ids.clone()
        positions = masked.nonzero().view(-1).tolist()
        out[masked] = fill_id
        if callback is not None:
            callback(0, positions, [fill_id] * len(positions))
        n = len(positions)
        return types.SimpleNamespace(input_ids=out[None], nfe=n, rounds=n, accepted=[1] * n)
    return sample


# --- reliability (issue 30) ----------------------------------------------------------------------
def test_unknown_length_hole_with_room_for_one_token_is_an_error():
    """Near the length limit a [MASK] used to become a 1-token hole silently."""
    from asarm.text import read_markup

    model = asarm.load_model("asarm-en-small")
    limit = model.config.max_length
    text = " ".join(["word"] * (limit - 1))
    assert len(encode(model.tokenizer, text)) == limit - 1  # one position left: the hole's
    with pytest.raises(InputError, match=r"room for only 1 token.*\[MASK:1\]"):
        read_markup(model, text + "[MASK]")
    assert read_markup(model, text + "[MASK:1]").candidates == [[1]]  # asked for: fine
    assert read_markup(model, " ".join(["word"] * (limit - 3)) + "[MASK]").candidates == [[1, 2, 3]]


def test_text_far_beyond_the_limit_is_refused_before_tokenizing(monkeypatch):
    """A 10 MB input used 2.1 GB and 12.7 s to tokenize before its length error."""
    import asarm.text.markup as markup
    from asarm.text import read_markup

    model = asarm.load_model("asarm-en-small")
    calls = []
    monkeypatch.setattr(markup, "encode", lambda *a: calls.append(a) or [])
    huge = "y" * (markup.MAX_CHARS_PER_TOKEN * model.config.max_length + 1)
    with pytest.raises(InputError, match="characters long, far more than the model's maximum length of 128"):
        read_markup(model, huge + "[MASK]")
    with pytest.raises(InputError, match="characters long"):
        parse_scored_text(model.tokenizer, huge, max_length=model.config.max_length)
    with pytest.raises(InputError, match="characters long"):
        read_markup(model, [huge, asarm.text.Hole()])  # the server's parts
    assert calls == []


def test_lowercase_mask_is_literal_text_with_one_warning(monkeypatch, tok):
    import asarm.text.markup as markup
    from asarm.errors import LiteralMaskWarning

    monkeypatch.setattr(markup, "_warned_other_case", False)
    with pytest.warns(LiteralMaskWarning, match=r"\[mask\] at character 4 is literal text.*\[MASK\]"):
        assert parse_markup("The [mask] sat on [MASK:2].") == ["The [mask] sat on ", 2, "."]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_markup("xs[Mask:3] = [MASK:1]") == ["xs[Mask:3] = ", 1]  # once per process
        monkeypatch.setattr(markup, "_warned_other_case", False)
        assert parse_markup("\\[mask] [MASKED] [mask [MASK:1]") == ["[mask] [MASKED] [mask ", 1]  # escaped: silent
