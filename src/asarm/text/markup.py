r"""The markup of holes to fill (``[MASK…]``) and spans to score (``[[…]]``), and the one
word-boundary rule they share.

Holes
-----
- ``[MASK:n]`` is a hole of exactly ``n`` tokens (``n`` >= 1, decimal digits; spaces around the
  number are allowed: ``[MASK: 3]`` is ``[MASK:3]``). The model fills it with ``n`` tokens of
  its own tokenizer.
- ``[MASK]`` is a hole of unknown length: 1 to ``max_hole`` tokens (default 32, capped by the
  model's length limit). ``[MASK:a-b]`` is a length between ``a`` and ``b`` inclusive. The
  length is drawn from its exact posterior given the context (``asarm.lengths``; the argmax
  with greedy decoding), then the hole is filled given that length.
- ``\[`` is a literal ``[`` (so ``\[MASK:3]`` is plain text) and ``\\`` a literal backslash;
  any other backslash is literal. Any ``[`` not followed by ``MASK:`` or ``MASK]`` is literal
  too, so code such as ``xs[0]`` needs no escaping.
- Holes are written in capitals. ``[mask]`` (any other case) is literal text, as code such as
  ``xs[mask]`` needs; since a person may have meant a hole, it is reported once per process
  with a ``LiteralMaskWarning`` (the CLI prints one ``warning:`` line). ``\[mask]`` is literal
  without the warning.
- Prefix continuation is a hole at the end (``"Once upon a time[MASK:20]"``); a text that is
  only ``"[MASK:30]"`` asks for unconditional generation. Holes may be adjacent, at the start,
  anywhere.

Code that has the pieces already (the server: a prompt, a hole, a suffix) passes them as a
list of parts (literal strings, lengths, ``Hole``s) instead of composing a markup string.

Spans to score: ``[[...]]`` marks the tokens ``asarm score`` scores given the rest.

Word boundaries: with tokenizers that attach a word's leading space to the word (our byte-level
BPE tokenizers, SentencePiece), one space right before a hole or a span belongs to it
(``space_moves``), so ``"the [MASK:3] sat"`` asks for three tokens of which the first normally
starts with a space (" cat"), as the tokenizer would have encoded the text.

Literal segments are encoded separately (``asarm.tokenization.encode``: no special tokens,
literal ``"<mask>"`` stays text). For our byte-level tokenizers every character of the literal
text comes back unchanged; with XLNet's SentencePiece tokenizer the round trip holds up to
SentencePiece normalisation (each segment starts a new "▁" word, runs of spaces may collapse).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch

from ..errors import InputError, LiteralMaskWarning
from ..tokenization import encode

MAX_MARKUP_LENGTH = 1_000_000  # no model has this many positions; keeps huge numbers a clear error
_HOLE = re.compile(r"\[MASK(?::([^\]\[\n]*))?\]")
_OTHER_CASE_HOLE = re.compile(r"\[mask(?::[^\]\[\n]*)?\]", re.IGNORECASE)
_warned_other_case = False  # LiteralMaskWarning is given once per process (a server would repeat it)
_LENGTH = re.compile(r"\s*(\d+)\s*")
_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


@dataclasses.dataclass(frozen=True)
class Hole:
    """A hole of unknown length: ``low`` to ``high`` tokens (``high`` None: up to ``max_hole``)."""

    low: int = 1
    high: int | None = None

    def candidates(self, max_hole: int) -> list[int]:
        return list(range(self.low, (self.high if self.high is not None else max(max_hole, self.low)) + 1))


def hole(low: int, high: int | None) -> int | Hole:
    """The hole of ``low`` to ``high`` tokens: a given length when they are equal."""
    return low if low == high else Hole(low, high)


def _count(text: str, markup: str, where: str) -> int:
    if len(text) > 7 or int(text) > MAX_MARKUP_LENGTH:
        raise InputError(f"hole {markup} {where}: {text} tokens is far beyond any model's length limit")
    value = int(text)
    if value < 1:
        raise InputError(f"hole {markup} {where}: the length must be at least 1")
    return value


def _hole(m: re.Match, where: str) -> int | Hole:
    spec, markup = m.group(1), m.group(0)
    if spec is None:
        return Hole()
    if (length := _LENGTH.fullmatch(spec)) is not None:
        return _count(length.group(1).lstrip("0") or "0", markup, where)
    if (span := _RANGE.fullmatch(spec)) is not None:
        low, high = (_count(g.lstrip("0") or "0", markup, where) for g in span.groups())
        if low > high:
            raise InputError(f"hole {markup} {where}: the range must run from the shorter length to the longer")
        return hole(low, high)
    if re.fullmatch(r"\s*-\s*\d+\s*", spec):
        raise InputError(f"hole {markup} {where}: the length must be at least 1")
    raise InputError(
        f"bad hole markup {markup} {where}: the length must be a whole number of tokens or a range: "
        "[MASK] (unknown length), [MASK:n] (n tokens) or [MASK:a-b] (between a and b tokens)"
    )


def parse_markup(text: str) -> list[str | int | Hole]:
    """Split ``text`` into literal strings, hole lengths (ints) and ``Hole``s of unknown length,
    in order; escapes resolved. Empty literal strings are dropped, so ``"[MASK:2][MASK:3]"``
    gives ``[2, 3]``.
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    parts: list[str | int | Hole] = []
    literal: list[str] = []
    other_case = None  # where a [mask] in another case than [MASK] was seen first
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
                raise InputError(
                    f"bad hole markup {text[i:i + 20]!r} {where}: write [MASK], [MASK:n] or [MASK:a-b] with a "
                    r"closing bracket (escape a literal bracket as \[)"
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_hole(m, where))
            i = m.end()
            continue
        if ch == "[" and other_case is None and text[i + 1:i + 5].lower() == "mask":
            m = _OTHER_CASE_HOLE.match(text, i)
            other_case = (i, m.group(0)) if m is not None else None
        literal.append(ch)
        i += 1
    if literal:
        parts.append("".join(literal))
    global _warned_other_case
    if other_case is not None and not _warned_other_case:
        _warned_other_case = True
        warnings.warn(f"{other_case[1]} at character {other_case[0]} is literal text, not a hole: holes are written "
                      f"in capitals, [MASK] (write \\{other_case[1]} to keep it as text without this warning)",
                      LiteralMaskWarning, stacklevel=2)
    return parts


def escape_markup(text: str) -> str:
    """Literal text as markup: its ``[`` and backslashes escaped (``"[MASK]"`` stays text)."""
    return text.replace("\\", "\\\\").replace("[", "\\[")


def space_joins_next_word(tokenizer) -> bool:
    """Whether the tokenizer encodes a word's leading space with the word (" cat" as one piece):
    read from its pre-tokenizer, so it does not depend on the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None) if backend is not None else None
    if pre is None:
        return False
    pieces = pre.pre_tokenize_str("a b")
    return len(pieces) >= 2 and pieces[-1][1][0] == 1


def space_moves(joins: bool, before: str) -> bool:
    """The one word-boundary rule: the space that ends the text ``before`` a hole or a span moves
    into it when the tokenizer attaches spaces to the next word (``joins``)."""
    return joins and before.endswith(" ")


def split_markup(tokenizer, text, return_shifted: bool = False):
    """(K+1 token-id segments, K holes) of a marked-up text, or of its parts (a list of literal
    strings, lengths and ``Hole``s): the literal text between the holes encoded separately, a
    space before a hole moved into it (``space_moves``). ``return_shifted`` adds, per hole,
    whether a space moved into it."""
    parts = parse_markup(text) if isinstance(text, str) else [p for p in text if p != ""]
    joins = any(isinstance(p, str) and p.endswith(" ") for p in parts) and space_joins_next_word(tokenizer)
    segments: list[list[int]] = [[]]
    holes: list[int | Hole] = []
    shifted: list[bool] = []
    moved = False
    for j, part in enumerate(parts):
        if isinstance(part, str):
            moved = space_moves(joins, part) and j + 1 < len(parts) and not isinstance(parts[j + 1], str)
            segments[-1] += encode(tokenizer, part[:-1] if moved else part)
        else:
            holes.append(part)
            shifted.append(moved)
            moved = False
            segments.append([])
    return (segments, holes, shifted) if return_shifted else (segments, holes)


# No token of a tokenizer we ship covers more than 69 characters (a run of indentation), so a
# text longer than this many characters per token of the model's limit cannot fit: it is refused
# before tokenizing, which for 10 MB took 12.7 s and 2.1 GB only to say "too long".
MAX_CHARS_PER_TOKEN = 256


def check_text_size(text, max_length: int | None) -> None:
    """An InputError when ``text`` (markup, or a list of parts) has so many characters that it
    cannot fit ``max_length`` tokens whatever the tokenizer: a cheap check before encoding."""
    if max_length is None:
        return
    chars = len(text) if isinstance(text, str) else sum(len(p) for p in text if isinstance(p, str))
    if chars > MAX_CHARS_PER_TOKEN * max_length:
        raise InputError(f"the text is {chars:,} characters long, far more than the model's maximum length of "
                         f"{max_length} tokens can hold; shorten it")


def find_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every ``[[...]]`` span, in one pass (a regex that retries from every
    ``[[`` was quadratic: 50,000 unclosed ``[[`` took 70 s)."""
    spans, position = [], 0
    while (start := text.find("[[", position)) >= 0:
        end = text.find("]]", start + 2)
        if end < 0:
            raise InputError(f"unclosed [[ at character {start}: close the scored span with ]] "
                             "(spans are written [[like this]])")
        if text.find("[[", start + 2, end) >= 0:
            raise InputError(f"unclosed or nested [[ at character {start}: spans are written [[like this]], "
                             "one at a time")
        spans.append((start, end + 2))
        position = end + 2
    return spans


def parse_scored_text(tokenizer, text: str, max_length: int | None = None):
    """Split text into tokens and a mask of the spans to score (``[[...]]``). Without any span
    the whole text is scored (nothing visible: its unconditional chain likelihood). A text far
    too long for ``max_length`` tokens is refused before tokenizing (``check_text_size``).

    One space right before a span belongs to the span (``space_moves``), so ``the [[mat]]`` and
    ``the[[ mat]]`` both score " mat". An ``[[`` without its closing ``]]`` is an error."""
    check_text_size(text, max_length)
    spans = find_spans(text)
    if not spans:
        ids = encode(tokenizer, text)
        return torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.bool)
    joins = space_joins_next_word(tokenizer)
    ids, hidden = [], []
    last = 0
    for start, end in spans:
        before, inside = text[last:start], text[start + 2:end - 2]
        if space_moves(joins, before) and inside[:1] not in ("", " "):
            before, inside = before[:-1], " " + inside
        before_ids, inside_ids = encode(tokenizer, before), encode(tokenizer, inside)
        if not inside_ids:
            raise InputError("an empty [[ ]] span has nothing to score")
        ids += before_ids + inside_ids
        hidden += [False] * len(before_ids) + [True] * len(inside_ids)
        last = end
    tail = encode(tokenizer, text[last:])
    ids += tail
    hidden += [False] * len(tail)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(hidden, dtype=torch.bool)
