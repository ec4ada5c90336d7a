r"""The text interface: infilling with a hole markup that states each hole's length.

Markup
------
- ``[MASK:n]`` is a hole of exactly ``n`` tokens (``n`` >= 1, decimal digits). The model fills
  it with ``n`` tokens of its own tokenizer.
- ``[MASK]`` without a length is an error: AS-ARMs fill a fixed number of positions, so say how
  many (``[MASK:5]``).
- ``\[`` is a literal ``[`` (so ``\[MASK:3]`` is plain text) and ``\\`` a literal backslash;
  any other backslash is literal. Any ``[`` not followed by ``MASK:`` or ``MASK]`` is literal
  too, so code such as ``xs[0]`` needs no escaping.
- Prefix continuation is a hole at the end (``"Once upon a time[MASK:20]"``); a text that is
  only ``"[MASK:30]"`` asks for unconditional generation. Holes may be adjacent, at the start,
  anywhere.

Literal segments are encoded separately (``asarm.tokenization.encode``: no special tokens,
literal ``"<mask>"`` stays text) and joined with ``n`` mask-token ids per hole. The filled
sequence is decoded as a whole with the exact decoder, so for our byte-level tokenizers every
character of the literal text comes back unchanged. With XLNet's SentencePiece tokenizer the
round trip holds up to SentencePiece normalisation (each segment starts a new "▁" word, runs of
spaces may collapse).
"""

from __future__ import annotations

import re

import torch

from .errors import InputError
from .tokenization import decode, encode

DEFAULT_MASK_TOKEN_ID = 6
_HOLE = re.compile(r"\[MASK(?::([^\]\[\n]*))?\]")
_LENGTH = re.compile(r"\s*(\d+)\s*")


def parse_markup(text: str) -> list[str | int]:
    """Split ``text`` into literal strings and hole lengths (ints), in order; escapes resolved.

    Empty literal strings are dropped, so ``"[MASK:2][MASK:3]"`` gives ``[2, 3]``.
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    parts: list[str | int] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "[\\":
            literal.append(text[i + 1])
            i += 2
            continue
        if ch == "[" and text.startswith("[MASK", i) and text[i + 5:i + 6] in (":", "]", ""):
            m = _HOLE.match(text, i)
            where = f"at character {i}"
            if m is None:
                snippet = text[i:i + 20]
                raise InputError(
                    f"bad hole markup {snippet!r} {where}: write [MASK:n] with a closing bracket "
                    r"(escape a literal bracket as \[)"
                )
            if m.group(1) is None:
                raise InputError(
                    f"hole [MASK] {where} has no length: give the number of tokens to fill, "
                    "e.g. [MASK:5]"
                )
            length = _LENGTH.fullmatch(m.group(1))
            if length is None:
                if re.fullmatch(r"\s*-\s*\d+\s*", m.group(1)):
                    raise InputError(f"hole {m.group(0)} {where}: the length must be at least 1")
                raise InputError(
                    f"bad hole markup {m.group(0)} {where}: the length must be a whole number of "
                    "tokens, e.g. [MASK:5]"
                )
            count = int(length.group(1))
            if count < 1:
                raise InputError(f"hole {m.group(0)} {where}: the length must be at least 1")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(count)
            i = m.end()
            continue
        literal.append(ch)
        i += 1
    if literal:
        parts.append("".join(literal))
    return parts


def _mask_id(tokenizer, mask_token_id: int | None) -> int:
    if mask_token_id is not None:
        return int(mask_token_id)
    value = getattr(tokenizer, "mask_token_id", None)
    return int(value) if value is not None else DEFAULT_MASK_TOKEN_ID


def parse_infill(tokenizer, text: str, *, mask_token_id: int | None = None,
                 max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids LongTensor [L], masked BoolTensor [L]) for a marked-up ``text``.

    Hidden positions hold ``mask_token_id`` (default: the tokenizer's mask token, else 6).
    ``max_length``, when given, is enforced with an InputError.
    """
    mask_id = _mask_id(tokenizer, mask_token_id)
    ids: list[int] = []
    hidden: list[bool] = []
    for part in parse_markup(text):
        if isinstance(part, int):
            ids.extend([mask_id] * part)
            hidden.extend([True] * part)
        else:
            seg = encode(tokenizer, part)
            ids.extend(seg)
            hidden.extend([False] * len(seg))
    if max_length is not None and len(ids) > max_length:
        raise InputError(
            f"the text is {len(ids)} tokens long with its holes, more than the model's maximum "
            f"length of {max_length}; shorten the text or the holes"
        )
    return torch.tensor(ids, dtype=torch.long), torch.tensor(hidden, dtype=torch.bool)


def fill_text(tokenizer, input_ids) -> str:
    """Decode a whole (filled) sequence, [L] or [1, L], with the exact decoder."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise InputError(f"fill_text decodes one sequence, got a batch of {input_ids.shape[0]}")
            input_ids = input_ids[0]
        input_ids = input_ids.tolist()
    return decode(tokenizer, input_ids)


def infill(model, text: str, tokenizer=None, return_result: bool = False, **sample_options):
    """Fill every ``[MASK:n]`` hole of ``text`` with the model; returns the whole filled text.

    ``tokenizer`` defaults to ``model.tokenizer`` (attached by ``asarm.load_model``).
    ``sample_options`` go to ``asarm.sampling.sample`` (method, draft, k, temperature, order,
    cache, seed, ...). With ``return_result=True`` returns ``(text, result)``, where ``result``
    has ``.input_ids``, ``.nfe``, ``.rounds``, ``.accepted``.
    """
    from . import sampling

    tokenizer, input_ids, masked = _prepare(model, text, tokenizer)
    result = sampling.sample(model, input_ids, masked, **sample_options)
    filled = fill_text(tokenizer, result.input_ids)
    return (filled, result) if return_result else filled


def _prepare(model, text: str, tokenizer):
    """Tokenizer (the model's by default), token ids and hidden mask of a marked-up text."""
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError(
            "no tokenizer: the model has none attached (its checkpoint has no tokenizer files); "
            "pass tokenizer=..."
        )
    config = model.config
    input_ids, masked = parse_infill(tokenizer, text, mask_token_id=config.mask_token_id,
                                     max_length=getattr(config, "max_length", None))
    if not bool(masked.any()):
        raise InputError("the text has no holes: mark what to fill with [MASK:n], e.g. 'A [MASK:3] day'")
    visible = input_ids[~masked]
    if visible.numel() and int(visible.max()) >= config.vocab_size:
        raise InputError(
            f"the tokenizer produced token id {int(visible.max())}, outside the model's vocabulary of "
            f"{config.vocab_size}: the tokenizer does not belong to this model"
        )
    return tokenizer, input_ids, masked


def stream_infill(model, text: str, on_text, tokenizer=None, progress: bool = False, **sample_options):
    """Like ``infill``, but calls ``on_text(piece)`` as the text fills in: each piece extends
    the part of the text that is final, left to right (tokens decoded out of order appear once
    everything before them is known). Returns ``(text, result)``.

    With ``progress`` a progress bar over the hidden tokens goes to stderr.
    """
    from . import sampling

    tokenizer, input_ids, masked = _prepare(model, text, tokenizer)
    known = (~masked).tolist()
    ids = input_ids.tolist()
    state = {"frontier": 0, "emitted": 0}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(masked.sum()), unit="tok", leave=False)

    def advance():
        f = state["frontier"]
        while f < len(ids) and known[f]:
            f += 1
        if f > state["frontier"]:
            state["frontier"] = f
            prefix = decode(tokenizer, ids[:f])
            # a prefix may end inside a multi-byte character: wait until it decodes cleanly
            if not prefix.endswith("\ufffd") and len(prefix) > state["emitted"]:
                on_text(prefix[state["emitted"] :])
                state["emitted"] = len(prefix)

    def on_tokens(row, positions, tokens):
        for pos, tok in zip(positions, tokens):
            known[pos] = True
            ids[pos] = tok
        if bar is not None:
            bar.update(len(positions))
        advance()

    advance()
    try:
        result = sampling.sample(model, input_ids, masked, callback=on_tokens, **sample_options)
    finally:
        if bar is not None:
            bar.close()
    filled = fill_text(tokenizer, result.input_ids)
    if len(filled) > state["emitted"]:
        on_text(filled[state["emitted"] :])
    return filled, result
