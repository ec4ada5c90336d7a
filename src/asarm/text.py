r"""The text interface: infilling with a hole markup, hole lengths given or unknown.

Markup
------
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
- Prefix continuation is a hole at the end (``"Once upon a time[MASK:20]"``); a text that is
  only ``"[MASK:30]"`` asks for unconditional generation. Holes may be adjacent, at the start,
  anywhere. A hole of unknown length at the very start or end has context on one side only, and
  its length posterior is the prior; ``stop_at`` (e.g. ``"\n"`` or ``"</s>"``) fills such an end
  hole up to its longest length and cuts the text at the first stop string.

Word boundaries: with tokenizers that attach a word's leading space to the word (our byte-level
BPE tokenizers, SentencePiece), one space right before a hole moves into the hole, so
``"the [MASK:3] sat"`` asks for three tokens of which the first normally starts with a space
(" cat"), as the tokenizer would have encoded the text; the model writes that space.

Literal segments are encoded separately (``asarm.tokenization.encode``: no special tokens,
literal ``"<mask>"`` stays text) and joined with ``n`` mask-token ids per hole. The filled
sequence is decoded as a whole with the exact decoder, so for our byte-level tokenizers every
character of the literal text comes back unchanged. With XLNet's SentencePiece tokenizer the
round trip holds up to SentencePiece normalisation (each segment starts a new "▁" word, runs of
spaces may collapse).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from .errors import InputError
from .tokenization import decode_text, encode, settled_text, special_text_ids

DEFAULT_MASK_TOKEN_ID = 6
MAX_MARKUP_LENGTH = 1_000_000  # no model has this many positions; keeps huge numbers a clear error
_HOLE = re.compile(r"\[MASK(?::([^\]\[\n]*))?\]")
_LENGTH = re.compile(r"\s*(\d+)\s*")
_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


@dataclasses.dataclass(frozen=True)
class Hole:
    """A hole of unknown length: ``low`` to ``high`` tokens (``high`` None: up to ``max_hole``)."""

    low: int = 1
    high: int | None = None

    def candidates(self, max_hole: int) -> list[int]:
        return list(range(self.low, (self.high if self.high is not None else max(max_hole, self.low)) + 1))


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
        return low if low == high else Hole(low, high)
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
        literal.append(ch)
        i += 1
    if literal:
        parts.append("".join(literal))
    return parts


def space_joins_next_word(tokenizer) -> bool:
    """Whether the tokenizer encodes a word's leading space with the word (" cat" as one piece):
    read from its pre-tokenizer, so it does not depend on the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None) if backend is not None else None
    if pre is None:
        return False
    pieces = pre.pre_tokenize_str("a b")
    return len(pieces) >= 2 and pieces[-1][1][0] == 1


def split_markup(tokenizer, text: str, return_shifted: bool = False):
    """(K+1 token-id segments, K holes) of a marked-up text: the literal text between the holes
    encoded separately, one space before a hole moved into the hole when the tokenizer attaches
    spaces to the following word (see the module docstring). ``return_shifted`` adds, per hole,
    whether a space moved into it."""
    parts = parse_markup(text)
    shift = any(isinstance(p, str) and p.endswith(" ") for p in parts) and space_joins_next_word(tokenizer)
    segments: list[list[int]] = [[]]
    holes: list[int | Hole] = []
    shifted: list[bool] = []
    moved = False
    for j, part in enumerate(parts):
        if isinstance(part, str):
            moved = shift and part.endswith(" ") and j + 1 < len(parts) and not isinstance(parts[j + 1], str)
            segments[-1] += encode(tokenizer, part[:-1] if moved else part)
        else:
            holes.append(part)
            shifted.append(moved)
            moved = False
            segments.append([])
    return (segments, holes, shifted) if return_shifted else (segments, holes)


def _mask_id(tokenizer, mask_token_id: int | None) -> int:
    if mask_token_id is not None:
        return int(mask_token_id)
    value = getattr(tokenizer, "mask_token_id", None)
    return int(value) if value is not None else DEFAULT_MASK_TOKEN_ID


def parse_infill(tokenizer, text: str, *, mask_token_id: int | None = None,
                 max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids LongTensor [L], masked BoolTensor [L]) for a marked-up ``text`` whose holes
    all state their length (``[MASK:n]``; holes of unknown length need ``infill``).

    Hidden positions hold ``mask_token_id`` (default: the tokenizer's mask token, else 6).
    ``max_length``, when given, is enforced with an InputError.
    """
    segments, holes = split_markup(tokenizer, text)
    if any(isinstance(h, Hole) for h in holes):
        raise InputError("the text has holes of unknown length ([MASK] or [MASK:a-b]): use infill(), which "
                         "chooses their lengths, or give each hole its length as [MASK:n]")
    return assemble(segments, holes, _mask_id(tokenizer, mask_token_id), max_length)


def assemble(segments, lengths, mask_id: int, max_length: int | None = None):
    """(input_ids, masked) of the segments joined by holes of the given lengths."""
    total = sum(len(s) for s in segments) + sum(lengths)
    if max_length is not None and total > max_length:
        raise InputError(
            f"the text is {total} tokens long with its holes, more than the model's maximum "
            f"length of {max_length}; shorten the text or the holes"
        )
    ids, hidden = list(segments[0]), [False] * len(segments[0])
    for n, seg in zip(lengths, segments[1:]):
        ids += [mask_id] * n + list(seg)
        hidden += [True] * n + [False] * len(seg)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(hidden, dtype=torch.bool)


def fill_text(tokenizer, input_ids) -> str:
    """Decode a whole (filled) sequence, [L] or [1, L], with the exact decoder (invalid UTF-8 byte
    runs dropped: ``asarm.tokenization.decode_text``)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise InputError(f"fill_text decodes one sequence, got a batch of {input_ids.shape[0]}")
            input_ids = input_ids[0]
        input_ids = input_ids.tolist()
    return decode_text(tokenizer, input_ids)


@dataclasses.dataclass
class InfillPlan:
    """A marked-up text made ready for the sampler: every hole's length chosen."""

    tokenizer: object
    input_ids: torch.Tensor
    masked: torch.Tensor
    lengths: list  # one asarm.lengths.LengthChoice per hole
    stop_at: str | None = None  # cut the last hole's text at this string
    stop_start: int = 0  # token index where that hole starts
    seed: int = 0  # the sampler's seed (the lengths were drawn from a stream derived from it)


def infill(model, text: str, tokenizer=None, return_result: bool = False, *, max_hole: int | None = None,
           length_prior=None, factorization: str | None = None, stop_at: str | None = None,
           allow_special: bool = False, **sample_options):
    """Fill every hole of ``text`` with the model; returns the whole filled text.

    ``tokenizer`` defaults to ``model.tokenizer`` (attached by ``asarm.load_model``).
    ``sample_options`` go to ``asarm.sampling.sample`` (method, draft, k, temperature, order,
    cache, seed, ...). Holes of unknown length (``[MASK]``, ``[MASK:a-b]``): ``max_hole`` caps
    ``[MASK]`` (default 32), ``length_prior`` weights the lengths (None: uniform; a dict
    {length: weight}, a sequence of weights for lengths 1, 2, ... or a callable),
    ``factorization`` picks the length evidence (``asarm.lengths``; default: the model's
    config ``asarm_length_factorization``, else "left-given-right"), ``stop_at`` cuts a
    final hole at a string. Special tokens that are not text (``<unk>``, padding, ``<s>``, ...;
    ``asarm.tokenization.special_text_ids``) and end-of-text (unless ``stop_at`` is given) are
    excluded inside the target distribution, so the sampler stays exact for the model restricted
    to text; ``allow_special=True`` keeps them.
    Invalid UTF-8 byte runs a byte-level model may sample are dropped from the returned text
    (``asarm.tokenization.decode_text``). With ``return_result=True`` returns ``(text, result)``, where
    ``result`` has ``.input_ids``, ``.nfe``, ``.rounds``, ``.accepted`` and ``.lengths`` (how
    each hole's length was chosen, with its posterior probability).
    """
    from . import sampling

    plan = plan_infill(model, text, tokenizer, max_hole=max_hole, length_prior=length_prior,
                       factorization=factorization, stop_at=stop_at, **sample_options)
    sample_options["seed"] = plan.seed
    if not allow_special:
        exclude_special_tokens(plan.tokenizer, sample_options, keep_end_of_text=stop_at is not None)
    result = sampling.sample(model, plan.input_ids, plan.masked, **sample_options)
    result.lengths = plan.lengths
    filled = finish_text(plan, result.input_ids)
    return (filled, result) if return_result else filled


def non_text_ids(tokenizer, keep_end_of_text: bool = False) -> set[int]:
    """The token ids a hole must not hold: the tokenizer's special tokens that are not text
    (``<unk>``, ``<s>``, padding, ...), and its end-of-text unless ``keep_end_of_text``
    (``stop_at`` may cut at it)."""
    ids = set(special_text_ids(tokenizer))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not keep_end_of_text:
        ids.add(int(eos))
    return ids


def text_only(tokenizer, config, keep_end_of_text: bool = False):
    """``config`` (a DecodeConfig) with ``non_text_ids`` excluded inside its target distribution."""
    return config.replace(suppress=tuple(sorted(set(config.suppress) | non_text_ids(tokenizer, keep_end_of_text))))


def exclude_special_tokens(tokenizer, sample_options: dict, keep_end_of_text: bool = False) -> None:
    """Add ``non_text_ids`` to the ``suppress`` of ``sample_options`` (a keyword, or the given
    ``config``'s)."""
    config = sample_options.get("config")
    current = set(sample_options.get("suppress", config.suppress if config is not None else ()))
    sample_options["suppress"] = tuple(sorted(current | non_text_ids(tokenizer, keep_end_of_text)))


def finish_text(plan: InfillPlan, filled_ids) -> str:
    ids = filled_ids.view(-1).tolist()
    if plan.stop_at is None:
        return fill_text(plan.tokenizer, ids)
    hole = decode_text(plan.tokenizer, ids[plan.stop_start:])
    cut = hole.find(plan.stop_at)
    return decode_text(plan.tokenizer, ids[:plan.stop_start]) + (hole if cut < 0 else hole[:cut])


def plan_infill(model, text: str, tokenizer=None, *, max_hole=None, length_prior=None, factorization=None,
                stop_at=None, temperature=1.0, greedy=False, seed=None, config=None, **_ignored) -> InfillPlan:
    """Parse ``text``, check it against the model and choose every hole's length. The length
    evidence uses the decoding's temperature and greedy flag (from ``config``, a DecodeConfig,
    when given)."""
    if config is not None:
        temperature, greedy = config.temperature, config.greedy
    markup = read_markup(model, text, tokenizer, max_hole=max_hole, stop_at=stop_at)
    return choose_plan(model, markup, length_prior=length_prior, factorization=factorization,
                       temperature=temperature, greedy=greedy, seed=seed)


@dataclasses.dataclass
class Markup:
    """A marked-up text encoded and checked against a model; its holes' lengths not yet chosen."""

    tokenizer: object
    segments: list  # K + 1 token-id lists around the K holes
    candidates: list  # per hole, the lengths it may have (one: a given length)
    stop_at: str | None = None
    stop_start: int = 0
    shifted: list = dataclasses.field(default_factory=list)  # per hole: a space moved into it
    limit: int | None = None  # the longest row allowed (the model's max_length unless capped)


def read_markup(model, text: str, tokenizer=None, *, max_hole=None, stop_at=None, max_length=None) -> Markup:
    """Everything of an infill request that needs no network pass: parse, encode, check the
    vocabulary, the length limit (the model's, or ``max_length`` when given) and ``stop_at``;
    the candidate lengths of every hole."""
    from .lengths import DEFAULT_MAX_HOLE

    tokenizer = _tokenizer(model, tokenizer)
    segments, holes, shifted = split_markup(tokenizer, text, return_shifted=True)
    if not holes:
        raise InputError("the text has no holes: mark what to fill with [MASK] or [MASK:n], e.g. 'A [MASK:3] day'")
    _check_vocabulary(segments, model.config.vocab_size)
    limit = max_length if max_length is not None else getattr(model.config, "max_length", None)
    candidates = _candidates(segments, holes, DEFAULT_MAX_HOLE if max_hole is None else max_hole, limit)
    stop_start = 0
    if stop_at is not None:
        candidates, stop_start = _stop_candidates(segments, holes, candidates, stop_at)
    return Markup(tokenizer, segments, candidates, stop_at, stop_start, shifted, limit)


def choose_plan(model, markup: Markup, *, length_prior=None, factorization=None, temperature=1.0,
                greedy=False, seed=None) -> InfillPlan:
    """Choose every hole's length (``asarm.lengths.choose_lengths``; seeded) and lay the row out."""
    import random

    from .lengths import choose_lengths

    if seed is None:
        seed = random.SystemRandom().randrange(2**62)
    generator = torch.Generator().manual_seed((int(seed) * 2_862_933_555_777_941_757 + 3_037_000_493) % (2**63))
    prior = _prior_weights(length_prior)
    choices = choose_lengths(model, markup.segments, markup.candidates, prior=[prior] * len(markup.candidates),
                             temperature=temperature, greedy=greedy,
                             factorization=factorization or default_factorization(model), generator=generator)
    input_ids, masked = assemble(markup.segments, [c.length for c in choices], model.config.mask_token_id,
                                 markup.limit)
    return InfillPlan(markup.tokenizer, input_ids, masked, choices, markup.stop_at, markup.stop_start, int(seed))


def hole_spans(plan: InfillPlan, markup: Markup) -> list[tuple[int, int]]:
    """(start, end) token positions of every hole of a planned row."""
    spans, position = [], len(markup.segments[0])
    for choice, segment in zip(plan.lengths, markup.segments[1:]):
        spans.append((position, position + choice.length))
        position += choice.length + len(segment)
    return spans


def escape_markup(text: str) -> str:
    """Literal text as markup: its ``[`` and backslashes escaped (``"[MASK]"`` stays text)."""
    return text.replace("\\", "\\\\").replace("[", "\\[")


def default_factorization(model) -> str:
    return model.config.extra.get("asarm_length_factorization", "left-given-right") \
        if hasattr(model.config, "extra") else "left-given-right"


def _tokenizer(model, tokenizer):
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError(
            "no tokenizer: the model has none attached (its checkpoint has no tokenizer files); "
            "pass tokenizer=..."
        )
    return tokenizer


def _check_vocabulary(segments, vocab_size: int) -> None:
    top = max((max(s) for s in segments if s), default=-1)
    if top >= vocab_size:
        raise InputError(
            f"the tokenizer produced token id {top}, outside the model's vocabulary of "
            f"{vocab_size}: the tokenizer does not belong to this model"
        )


def _candidates(segments, holes, max_hole, limit) -> list[list[int]]:
    """Candidate lengths per hole: given lengths as they are, unknown ones capped so that the
    text fits the model's limit with every other hole at its shortest."""
    if isinstance(max_hole, bool) or not isinstance(max_hole, int) or max_hole < 1:
        raise InputError(f"max_hole must be an integer >= 1, got {max_hole!r}")
    shortest = [h if isinstance(h, int) else h.low for h in holes]
    base = sum(len(s) for s in segments) + sum(shortest)
    if limit is not None and base > limit:
        raise InputError(f"the text is {base} tokens long with its holes at their shortest, more than the model's "
                         f"maximum length of {limit}; shorten the text or the holes")
    out = []
    for h, low in zip(holes, shortest):
        if isinstance(h, int):
            out.append([h])
            continue
        room = None if limit is None else limit - base + low
        out.append([n for n in h.candidates(max_hole) if room is None or n <= room] or [low])
    return out


def _stop_candidates(segments, holes, candidates, stop_at):
    if not isinstance(stop_at, str) or not stop_at:
        raise InputError("stop_at must be a non-empty string, e.g. '\\n' or '</s>'")
    if segments[-1] or not isinstance(holes[-1], Hole):
        raise InputError("stop_at applies to a hole of unknown length at the end of the text ('...[MASK]')")
    start = sum(len(s) for s in segments[:-1]) + sum(c[0] for c in candidates[:-1])
    if any(len(c) > 1 for c in candidates[:-1]):
        raise InputError("stop_at: give the other holes their lengths ([MASK:n]); only the final hole may be open")
    return candidates[:-1] + [[max(candidates[-1])]], start


def _prior_weights(length_prior):
    if length_prior is None or isinstance(length_prior, dict) or callable(length_prior):
        return length_prior
    weights = [float(w) for w in (length_prior.tolist() if hasattr(length_prior, "tolist") else length_prior)]
    return {i + 1: w for i, w in enumerate(weights)}


def stream_infill(model, text: str, on_text, tokenizer=None, progress: bool = False, allow_special: bool = False,
                  **sample_options):
    """Like ``infill``, but calls ``on_text(piece)`` as the text fills in: each piece extends
    the part of the text that is final, left to right (tokens decoded out of order appear once
    everything before them is known). Returns ``(text, result)``.

    With ``progress`` a progress bar over the hidden tokens goes to stderr.
    """
    from . import sampling

    if sample_options.get("stop_at") is not None:
        raise InputError("stop_at does not combine with streaming")
    plan = plan_infill(model, text, tokenizer, **sample_options)
    tokenizer, input_ids, masked = plan.tokenizer, plan.input_ids, plan.masked
    for name in ("max_hole", "length_prior", "factorization", "stop_at"):
        sample_options.pop(name, None)
    sample_options["seed"] = plan.seed
    if not allow_special:
        exclude_special_tokens(tokenizer, sample_options)
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
            prefix = settled_text(tokenizer, ids[:f])  # None: it ends inside a character, wait
            if prefix is not None and len(prefix) > state["emitted"]:
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
        result.lengths = plan.lengths
    finally:
        if bar is not None:
            bar.close()
    filled = fill_text(tokenizer, result.input_ids)
    if len(filled) > state["emitted"]:
        on_text(filled[state["emitted"] :])
    return filled, result
