r"""Holes with known, bounded or unknown lengths, and how the server picks their lengths.

Markup (as ``asarm infill``, plus two hole kinds): ``[MASK:n]`` is a hole of exactly n tokens,
``[MASK:a-b]`` one of a to b tokens, ``[MASK]`` one of 1 to ``max_hole`` tokens; ``\[`` is a
literal bracket. A request's text becomes a list of *parts*: token-id lists (literal text) and
``Hole`` objects. Lengths that are not fixed come from the model's length posterior
(``asarm.lengths.length_posterior``), called in ONE place: ``length_probabilities``.
"""

from __future__ import annotations

import dataclasses
import random
import re

import torch

from ..errors import InputError
from ..tokenization import encode

_HOLE = re.compile(r"\[MASK(?::([^\]\[\n]*))?\]")
_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


@dataclasses.dataclass(frozen=True)
class Hole:
    low: int   # fewest tokens
    high: int  # most tokens (== low: a fixed length)

    @property
    def fixed(self) -> bool:
        return self.low == self.high


def parse_holes(text: str, max_hole: int) -> list[str | Hole]:
    """Literal strings and Holes of a marked-up text, in order (escapes resolved)."""
    parts: list[str | Hole] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == "\\" and i + 1 < n and text[i + 1] in "[\\":
            literal.append(text[i + 1])
            i += 2
            continue
        if text.startswith("[MASK", i) and text[i + 5:i + 6] in (":", "]", ""):
            m = _HOLE.match(text, i)
            if m is None:
                raise InputError(f"bad hole markup {text[i:i + 20]!r} at character {i}: write [MASK], "
                                 r"[MASK:n] or [MASK:a-b] (escape a literal bracket as \[)")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_hole(m, i, max_hole))
            i = m.end()
            continue
        literal.append(text[i])
        i += 1
    if literal:
        parts.append("".join(literal))
    return parts


def _hole(m: re.Match, where: int, max_hole: int) -> Hole:
    if m.group(1) is None:
        return Hole(1, max_hole)
    spec = _RANGE.fullmatch(m.group(1))
    if spec is None:
        raise InputError(f"bad hole {m.group(0)} at character {where}: the length is a whole number "
                         "of tokens n or a range a-b, e.g. [MASK:5] or [MASK:3-8]")
    low = int(spec.group(1))
    high = int(spec.group(2)) if spec.group(2) is not None else low
    if not 1 <= low <= high:
        raise InputError(f"bad hole {m.group(0)} at character {where}: lengths are at least 1 and a <= b")
    return Hole(low, high)


def encode_parts(tokenizer, parts: list[str | Hole], max_length: int) -> list[list[int] | Hole]:
    """Literal strings to token ids; checks the shortest layout fits the model (InputError)."""
    out = [p if isinstance(p, Hole) else encode(tokenizer, p) for p in parts]
    if not any(isinstance(p, Hole) for p in out):
        raise InputError("the text has no holes: mark what to fill with [MASK], [MASK:n] or [MASK:a-b]")
    shortest = sum(p.low if isinstance(p, Hole) else len(p) for p in out)
    if shortest > max_length:
        raise InputError(f"the text is at least {shortest} tokens long with its holes, more than the "
                         f"model's maximum length of {max_length}; shorten the text or the holes")
    return out


def length_probabilities(model, left_ids: list[int], right_ids: list[int], lengths: list[int]) -> list[float]:
    """The model's posterior over a hole's length given its neighbouring text: the one call into
    ``asarm.lengths`` (issue 13). Until that module is part of the build, an unknown length is a
    clear 400 error."""
    try:
        from ..lengths import length_posterior
    except ImportError:
        raise InputError("this build cannot choose hole lengths (asarm.lengths is missing): give the "
                         'length, e.g. [MASK:8], or "hole_length": 8 with a suffix') from None
    with torch.no_grad():
        probs = length_posterior(model, torch.tensor(left_ids, dtype=torch.long),
                                 torch.tensor(right_ids, dtype=torch.long), lengths=lengths)
    return [float(p) for p in probs]


@dataclasses.dataclass
class Layout:
    """One row's tokens: ids, hidden mask and where its holes are."""
    input_ids: torch.Tensor     # [L]
    masked: torch.Tensor        # [L] bool
    holes: list[dict]           # {"start", "length", "probability"} per hole, in text order


def resolve_lengths(model, parts: list[list[int] | Hole], rngs: list[random.Random], greedy: bool,
                    max_length: int) -> list[list[tuple[int, float | None]]]:
    """Per choice (one rng each), the (length, posterior probability) of every hole.

    Each hole's posterior is computed once from its neighbouring literal text (the tokens between
    it and the previous / next hole: exact for one hole, hole by hole for several) over the
    lengths that still fit the model; each choice draws its own length from it (greedy: argmax).
    """
    fixed_room = max_length - sum(len(p) if isinstance(p, list) else p.low for p in parts)
    chosen: list[list[tuple[int, float | None]]] = [[] for _ in rngs]
    for i, part in enumerate(parts):
        if not isinstance(part, Hole):
            continue
        if part.fixed:
            for c in chosen:
                c.append((part.low, None))
            continue
        lengths = list(range(part.low, min(part.high, part.low + fixed_room) + 1))
        left = parts[i - 1] if i > 0 and isinstance(parts[i - 1], list) else []
        right = parts[i + 1] if i + 1 < len(parts) and isinstance(parts[i + 1], list) else []
        probs = length_probabilities(model, left, right, lengths)
        for c, rng in zip(chosen, rngs):
            j = max(range(len(lengths)), key=probs.__getitem__) if greedy else _draw(probs, rng)
            c.append((lengths[j], probs[j]))
        fixed_room -= max(c[-1][0] for c in chosen) - part.low  # later holes get what is left
    return chosen


def _draw(probs: list[float], rng: random.Random) -> int:
    u, acc = rng.random() * sum(probs), 0.0
    for j, p in enumerate(probs):
        acc += p
        if u < acc:
            return j
    return len(probs) - 1


def build_layout(parts: list[list[int] | Hole], lengths: list[tuple[int, float | None]], mask_id: int) -> Layout:
    ids: list[int] = []
    hidden: list[bool] = []
    holes = []
    it = iter(lengths)
    for part in parts:
        if isinstance(part, Hole):
            n, prob = next(it)
            holes.append({"start": len(ids), "length": n, "probability": prob})
            ids += [mask_id] * n
            hidden += [True] * n
        else:
            ids += part
            hidden += [False] * len(part)
    return Layout(torch.tensor(ids, dtype=torch.long), torch.tensor(hidden, dtype=torch.bool), holes)
