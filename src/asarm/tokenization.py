"""Tokenizers for AS-ARMs: loading, training, and an exact text <-> ids round trip.

Two kinds of tokenizer meet this package:

- Tokenizers we train (``train_tokenizer``): byte-level BPE with no normalizer and
  ``add_prefix_space=False``, so ``decode(tok, encode(tok, s)) == s`` for EVERY string ``s``:
  no lowercasing, no added or dropped spaces, tabs, newlines and runs of spaces kept as they are
  (what code needs). Special tokens use XLNet's ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (eos),
  ``<cls>`` 3, ``<sep>`` 4, ``<pad>`` 5, ``<mask>`` 6. The tokenizer has no post-processor, so
  even ``tokenizer(text)`` adds no special tokens; ``encode`` below passes
  ``add_special_tokens=False`` anyway, so any tokenizer behaves the same.
- XLNet's SentencePiece tokenizer (published checkpoints). Its round trip is exact only up to
  SentencePiece normalisation: runs of spaces may collapse, a leading space is dropped and each
  separately encoded segment starts a new word ("▁"). The published code tokenizer adds
  special tokens for newline, tab and runs of spaces, which ``decode`` keeps (it skips nothing).

``load_tokenizer`` reads a plain ``tokenizer.json`` (what ``train_tokenizer`` saves) with the
``tokenizers`` library directly (``FastTokenizer``, milliseconds) and hands anything else to
``transformers.AutoTokenizer`` (seconds: importing transformers dominates a CLI start-up).

Always use ``encode`` / ``decode`` from this module for infilling text: they add no special
tokens, treat a literal ``"<mask>"`` in the text as text (never as a hole), and decode with
``clean_up_tokenization_spaces=False`` and ``skip_special_tokens=False``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import CheckpointError, InputError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>")
# Files whose presence means "this directory has a tokenizer".
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
KINDS = ("text", "code")


def has_tokenizer_files(directory: str | Path) -> bool:
    directory = Path(directory)
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


# tokenizer_config.json keys the direct `tokenizers` path understands; any other key (a slow
# SentencePiece class, extra tokens, lower-casing flags...) goes through transformers instead.
DIRECT_CONFIG_KEYS = {
    "backend", "tokenizer_class", "clean_up_tokenization_spaces", "model_max_length", "is_local",
    "local_files_only", "padding_side", "truncation_side", "model_input_names", "added_tokens_decoder",
    "unk_token", "bos_token", "eos_token", "cls_token", "sep_token", "pad_token", "mask_token",
}
DIRECT_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_NAMES = ("unk", "bos", "eos", "cls", "sep", "pad", "mask")


class FastTokenizer:
    """A ``tokenizer.json`` read with ``tokenizers`` alone: the part of transformers' fast
    tokenizer that asarm uses (encode, decode, special-token ids, ``len``, ``save_pretrained``),
    loaded in a few milliseconds instead of importing transformers (seconds). Encoding and
    decoding are the same backend calls transformers makes, so ids and text are identical."""

    def __init__(self, backend, config: dict):
        self._tokenizer = backend  # the attribute name transformers uses (asarm.data reads it)
        self.config = dict(config)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        for name in SPECIAL_NAMES:
            value = config.get(f"{name}_token")
            if isinstance(value, dict):
                value = value.get("content")
            setattr(self, f"{name}_token", value)
            setattr(self, f"{name}_token_id", None if value is None else backend.token_to_id(value))

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    @property
    def backend_tokenizer(self):
        """The `tokenizers` object, under the name transformers' fast tokenizers give it."""
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        backend = self._tokenizer
        before = backend.encode_special_tokens
        backend.encode_special_tokens = split_special_tokens
        try:
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            backend.encode_special_tokens = before

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:  # transformers' clean-up, for configs that ask for it
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def save_pretrained(self, directory) -> tuple[str, str]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self.config.items() if k not in ("is_local", "local_files_only")}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        self._tokenizer.save(str(directory / "tokenizer.json"))
        return str(directory / "tokenizer_config.json"), str(directory / "tokenizer.json")


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in ``directory`` (local files only), or None when the directory holds
    no tokenizer files. A plain ``tokenizer.json`` is read with ``tokenizers`` directly
    (``FastTokenizer``); anything else goes through ``transformers.AutoTokenizer``. Corrupt or
    incomplete files raise CheckpointError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: tokenizer directory does not exist")
    if not has_tokenizer_files(directory):
        return None
    tok_json = directory / "tokenizer.json"
    config = _read_json(directory / "tokenizer_config.json", "corrupt tokenizer config")
    if tok_json.is_file() and _direct(directory, config):
        tokenizer = _load_direct(tok_json, config)
    else:
        if tok_json.is_file():
            _read_json(tok_json, "corrupt tokenizer file")
        tokenizer = _load_auto(directory)
    _check_encodes_text(tokenizer, directory)
    return tokenizer


def _check_encodes_text(tokenizer, directory: Path) -> None:
    """A tokenizer that turns text into no tokens at all (e.g. a ``tokenizer.json`` whose
    vocabulary was emptied) would silently empty every text it is given: refuse it at load."""
    if not encode(tokenizer, "Hello, world."):
        raise CheckpointError(f"{directory}: the tokenizer turns text into no tokens (is its vocabulary empty?)")


def _read_json(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {what}, not valid JSON ({exc})") from None
    except RecursionError:  # a JSON value nested thousands deep
        raise CheckpointError(f"{path}: {what} (JSON nested too deeply)") from None


def _direct(directory: Path, config: dict | None) -> bool:
    if config is None:
        config = {}
    if not isinstance(config, dict) or (directory / "special_tokens_map.json").is_file():
        return False
    return config.get("tokenizer_class") in DIRECT_CLASSES and set(config) <= DIRECT_CONFIG_KEYS


def _load_direct(tok_json: Path, config: dict | None) -> FastTokenizer:
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(tok_json))
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        _read_json(tok_json, "corrupt tokenizer file")  # the clearer message when it is not JSON
        raise CheckpointError(f"{tok_json.parent}: could not load the tokenizer files ({type(exc).__name__}: {exc})") from None
    return FastTokenizer(backend, config or {})


def _load_auto(directory: Path):
    tok_json = directory / "tokenizer.json"
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for bad files
        hint = ""
        if (directory / "spiece.model").is_file() and not tok_json.is_file():
            hint = (" Reading a SentencePiece spiece.model needs the sentencepiece and protobuf "
                    "packages (pip install sentencepiece protobuf); the file may also be corrupt.")
        raise CheckpointError(
            f"{directory}: could not load the tokenizer files ({type(exc).__name__}: {exc}).{hint}"
        ) from None
    if isinstance(tokenizer, bool) or tokenizer is None:
        raise CheckpointError(f"{directory}: could not load the tokenizer files")
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "text"):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts the 7 special tokens and the 256 byte symbols, so it must be at least
    263. ``kind`` is "text" or "code"; both keep every byte of the input (the round trip is exact
    for any string), "code" additionally splits digits singly and isolates runs of newlines so
    that indentation runs are learned as tokens of their own. Encoding adds no special tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise InputError(f"unknown tokenizer kind {kind!r}: use 'text' or 'code'")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(SPECIAL_TOKENS) + len(alphabet)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise InputError(f"vocab_size must be an integer >= {minimum} (7 special tokens + 256 bytes), got {vocab_size!r}")

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "code":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            # runs of newlines on their own (never merged with the next line's indentation)
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            byte_level,
        ])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    texts = (t for t in texts if t)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<cls>",
        sep_token="<sep>",
        pad_token="<pad>",
        mask_token="<mask>",
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``: no special tokens added, literal special-token strings in the text
    (e.g. "<mask>") encoded as ordinary text."""
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    if not text:
        return []
    try:
        ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    except TypeError:  # tokenizers that do not know split_special_tokens
        ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in ids]


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of ``ids``: nothing skipped, no clean-up of spaces (exact inverse of ``encode`` for
    our byte-level tokenizers)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    if not ids:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    """``decode`` for text shown to a person: with a byte-level tokenizer, a sampled byte run that
    is not valid UTF-8 (a token ending inside a multi-byte character whose continuation never
    came) is dropped instead of appearing as U+FFFD. Valid text, including a literal U+FFFD, is
    unchanged; other tokenizers decode as ``decode``."""
    return _without_invalid_bytes(tokenizer, ids, decode(tokenizer, ids))


def settled_text(tokenizer, ids: Sequence[int], complete: bool = False) -> str | None:
    """``decode_text`` of the known prefix of a sequence still being filled, or None while that
    prefix ends inside a multi-byte character (its continuation may still come; ``complete``:
    it will not, the prefix is all there is)."""
    text = decode(tokenizer, ids)
    if text.endswith("\ufffd") and not complete:
        return None
    return _without_invalid_bytes(tokenizer, ids, text)


def _without_invalid_bytes(tokenizer, ids, text: str) -> str:
    if "\ufffd" not in text:
        return text
    data = _byte_level_bytes(tokenizer, ids)
    return text if data is None else data.decode("utf-8", errors="ignore")


def _byte_level_bytes(tokenizer, ids) -> bytes | None:
    """The raw bytes behind ``ids`` for a byte-level BPE tokenizer (None for any other kind)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # rare path: imported lazily

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    added = {int(i): token.content for i, token in backend.get_added_tokens_decoder().items()}
    out = bytearray()
    for i in (int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)):
        if i in added:
            out += added[i].encode("utf-8")
            continue
        piece = backend.id_to_token(i)
        if piece is None or any(char not in byte_of for char in piece):
            return None
        out += bytes(byte_of[char] for char in piece)
    return bytes(out)


def special_text_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the special tokens that are never text (``<unk>``, padding, mask, ``<s>``, ``<cls>``,
    ``<sep>``; everything the tokenizer lists as special except end-of-text, which ``stop_at``
    may need): ``infill`` excludes them from the target so a filled hole reads as text."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = set()
    for name in ("unk_token_id", "pad_token_id", "mask_token_id", "bos_token_id", "cls_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    for value in getattr(tokenizer, "all_special_ids", None) or ():
        ids.add(int(value))
    ids.discard(eos)
    return tuple(sorted(ids))


def mask_token_id(tokenizer) -> int | None:
    """The tokenizer's mask token id, or None when it has none."""
    if tokenizer is None:
        return None
    value = getattr(tokenizer, "mask_token_id", None)
    return int(value) if value is not None else None
