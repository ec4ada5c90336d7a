"""Tokenizer training, loading and the exact text round trip (all local, no hub)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest

from asarm.errors import CheckpointError, InputError
from asarm.tokenization import (SPECIAL_TOKENS, FastTokenizer, _load_auto, decode, encode, load_tokenizer,
                                train_tokenizer)
from conftest import ROOT

PARAGRAPH = (
    "Once upon a time, in a quiet village by the sea, there lived an old fisherman. "
    "Every morning he rowed out past the rocks, cast his nets, and waited.\n"
    "The gulls knew him; the children waved.  Some days the sea gave nothing at all!\n\n"
)
CODE = inspect.getsource(textwrap)

TRICKY = [
    "",
    " ",
    "  leading and trailing  ",
    "tabs\tinside\t\tand\tout\t",
    "many\n\n\nnewlines\n",
    "\r\nwindows line\r\n",
    "Unicode: café, naïve, 日本語, Ελληνικά, emoji 😀🚀, ligature ﬁ, combining e\u0301",
    "UPPER lower MiXeD",
    "def f(x):\n    if x:\n        return x  # comment\n\treturn None\n\n\n",
    "class A:\n  pass\n    \n",
    "literal specials: <mask> <pad> </s> <s> <unk>",
    "numbers 1234567890 3.14159 -42",
    "   \n\t \n  ",
]


@pytest.fixture(scope="module")
def text_tok():
    return train_tokenizer([PARAGRAPH * 8], vocab_size=320, kind="text")


@pytest.fixture(scope="module")
def code_tok():
    return train_tokenizer([CODE, PARAGRAPH], vocab_size=400, kind="code")


def test_special_token_ids(text_tok, code_tok):
    for tok in (text_tok, code_tok):
        for i, name in enumerate(SPECIAL_TOKENS):
            assert tok.convert_tokens_to_ids(name) == i
        assert tok.mask_token_id == 6 and tok.pad_token_id == 5 and tok.eos_token_id == 2
        assert tok.unk_token_id == 0


@pytest.mark.parametrize("s", TRICKY)
def test_exact_round_trip(text_tok, code_tok, s):
    for tok in (text_tok, code_tok):
        ids = encode(tok, s)
        assert decode(tok, ids) == s
        # plain tokenizer call adds no special tokens either
        assert tok(s, add_special_tokens=True)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]


def test_round_trip_whole_source(code_tok):
    assert decode(code_tok, encode(code_tok, CODE)) == CODE
    ids = encode(code_tok, CODE)
    assert len(ids) < len(CODE.encode()) / 2  # it actually learned merges


def test_literal_mask_is_text(text_tok):
    ids = encode(text_tok, "a <mask> b")
    assert text_tok.mask_token_id not in ids
    assert decode(text_tok, ids) == "a <mask> b"


def test_decode_keeps_special_tokens(text_tok):
    ids = encode(text_tok, "x") + [text_tok.mask_token_id] + encode(text_tok, " y")
    assert decode(text_tok, ids) == "x<mask> y"
    import torch

    assert decode(text_tok, torch.tensor(ids)) == "x<mask> y"
    assert decode(text_tok, []) == ""


def test_save_and_load_round_trip(tmp_path, code_tok):
    code_tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded is not None
    assert loaded.mask_token_id == 6 and loaded.pad_token_id == 5 and loaded.eos_token_id == 2
    for s in TRICKY:
        assert encode(loaded, s) == encode(code_tok, s)
        assert decode(loaded, encode(loaded, s)) == s


def test_load_without_files_is_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_load_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_load_corrupt_tokenizer_json(tmp_path, text_tok):
    text_tok.save_pretrained(tmp_path)
    data = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="tokenizer.json.*corrupt"):
        load_tokenizer(tmp_path)


def test_load_corrupt_tokenizer_content(tmp_path, text_tok):
    text_tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(CheckpointError, match="could not load the tokenizer"):
        load_tokenizer(tmp_path)


def test_tokenizer_with_an_empty_vocabulary_is_refused(tmp_path, text_tok):
    """It used to load and silently turn every text into no tokens (issue 30)."""
    text_tok.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["model"]["vocab"], data["model"]["merges"] = {}, []
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="turns text into no tokens"):
        load_tokenizer(tmp_path)


def test_deeply_nested_tokenizer_json_is_one_line(tmp_path, text_tok):
    text_tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_tokenizer(tmp_path)


def test_load_corrupt_spiece(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x00garbage not a sentencepiece model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlnet"}))
    with pytest.raises(CheckpointError, match="could not load the tokenizer.*spiece.model"):
        load_tokenizer(tmp_path)


def test_train_errors():
    with pytest.raises(InputError, match="kind"):
        train_tokenizer(["abc"], 300, kind="pictures")
    with pytest.raises(InputError, match="vocab_size"):
        train_tokenizer(["abc"], 100)


def test_encode_rejects_non_string(text_tok):
    with pytest.raises(InputError, match="string"):
        encode(text_tok, 123)


# --- the direct tokenizers path equals transformers' on both shipped tokenizers -----------------
SHIPPED = ROOT / "src" / "asarm" / "shipped"
SHIPPED_TOKENIZERS = sorted(p for p in SHIPPED.glob("*") if (p / "tokenizer.json").is_file())
SAMPLES = TRICKY + [PARAGRAPH, CODE, "The cat sat on the mat.", " the[[ mat]] and <mask><pad>x", "x = [1, 2]\n\tif y:\n"]


@pytest.mark.parametrize("directory", SHIPPED_TOKENIZERS, ids=lambda p: p.name)
def test_shipped_tokenizer_direct_path_equals_transformers(directory):
    fast = load_tokenizer(directory)
    old = _load_auto(directory)
    assert isinstance(fast, FastTokenizer) and not isinstance(old, FastTokenizer)
    assert len(fast) == len(old) and fast.vocab_size == old.vocab_size
    for name in ("unk", "bos", "eos", "cls", "sep", "pad", "mask"):
        assert getattr(fast, f"{name}_token_id") == getattr(old, f"{name}_token_id"), name
    assert fast.mask_token_id == 6 and fast.eos_token_id == 2
    for s in SAMPLES:
        ids = encode(fast, s)
        assert ids == encode(old, s), s
        assert decode(fast, ids) == decode(old, ids) == s
        assert fast.encode(s) == old.encode(s)  # default arguments: special tokens recognised
        assert fast(s)["input_ids"] == old(s)["input_ids"]
    specials = encode(fast, "a") + list(range(7)) + encode(fast, " b")
    assert decode(fast, specials) == decode(old, specials)
    assert fast.decode(specials, skip_special_tokens=True) == old.decode(specials, skip_special_tokens=True)
    assert fast.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == old.convert_tokens_to_ids(list(SPECIAL_TOKENS))


def test_direct_tokenizer_saves_what_both_paths_read(tmp_path):
    fast = load_tokenizer(SHIPPED_TOKENIZERS[0])
    fast.save_pretrained(tmp_path)
    again, auto = load_tokenizer(tmp_path), _load_auto(tmp_path)
    assert isinstance(again, FastTokenizer)
    for s in SAMPLES:
        assert encode(again, s) == encode(fast, s) == encode(auto, s)


def test_unusual_tokenizer_config_goes_through_transformers(tmp_path, text_tok):
    text_tok.save_pretrained(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), FastTokenizer)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["do_lower_case"] = True  # a key the direct path does not implement
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not isinstance(load_tokenizer(tmp_path), FastTokenizer)


def test_loading_the_shipped_tokenizer_does_not_import_transformers():
    code = ("import sys; from asarm.tokenization import load_tokenizer; "
            f"t = load_tokenizer({str(SHIPPED_TOKENIZERS[0])!r}); "
            "assert t.mask_token_id == 6; print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
