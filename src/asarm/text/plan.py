"""From a marked-up text to rows for the sampler: encode and check it, choose every hole's length,
lay the row out.

    read_markup  the work that needs no network pass: parse, encode, check the vocabulary and
                 the length limit, the candidate lengths of every hole;
    plan_rows    one row per seed: the holes' lengths drawn from their posterior
                 (``asarm.lengths``), the tokens laid out with the holes hidden.

``asarm.infill``, ``asarm infill`` and the server all turn a request into rows through these two
functions; ``text_only`` is the one policy that keeps special tokens out of the holes.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import DEFAULT_MASK_TOKEN_ID
from ..errors import InputError
from ..seeds import length_seed, resolve_seed
from ..tokenization import special_text_ids
from .markup import Hole, check_text_size, split_markup


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
    spans: list = dataclasses.field(default_factory=list)  # (start, end) token positions of every hole
    space_moved: bool = False  # the first hole holds the space that ended the text before it


def read_markup(model, text, tokenizer=None, *, max_hole=None, stop_at=None, max_length=None) -> Markup:
    """Everything of an infill request that needs no network pass: parse ``text`` (markup, or a
    list of parts: ``asarm.text.markup.split_markup``), encode, check the vocabulary, the length
    limit (the model's, or ``max_length`` when given) and ``stop_at``; the candidate lengths of
    every hole."""
    from ..lengths import DEFAULT_MAX_HOLE

    tokenizer = _tokenizer(model, tokenizer)
    limit = max_length if max_length is not None else getattr(model.config, "max_length", None)
    check_text_size(text, limit)
    segments, holes, shifted = split_markup(tokenizer, text, return_shifted=True)
    if not holes:
        raise InputError("the text has no holes: mark what to fill with [MASK] or [MASK:n], e.g. 'A [MASK:3] day'")
    _check_vocabulary(segments, model.config.vocab_size)
    candidates = _candidates(segments, holes, DEFAULT_MAX_HOLE if max_hole is None else max_hole, limit)
    stop_start = 0
    if stop_at is not None:
        candidates, stop_start = _stop_candidates(segments, holes, candidates, stop_at)
    return Markup(tokenizer, segments, candidates, stop_at, stop_start, shifted, limit)


def plan_rows(model, markup: Markup, seeds: list, *, length_prior=None, factorization=None, temperature=1.0,
              greedy=False) -> list[InfillPlan]:
    """One row per seed (None: a fresh seed): every hole's length chosen from its posterior
    (``asarm.lengths.choose_lengths``, from a stream derived from the seed; the argmax when
    ``greedy``) and the row laid out. ``length_prior``: None (uniform), a dict {length: weight},
    weights of lengths 1, 2, ... or a callable."""
    from ..lengths import choose_lengths

    prior = _prior_weights(length_prior)
    factorization = factorization or default_factorization(model)
    plans = []
    for seed in seeds:
        seed = resolve_seed(seed)
        choices = choose_lengths(model, markup.segments, markup.candidates, prior=[prior] * len(markup.candidates),
                                 temperature=temperature, greedy=greedy, factorization=factorization,
                                 generator=torch.Generator().manual_seed(length_seed(seed)))
        lengths = [c.length for c in choices]
        input_ids, masked = assemble(markup.segments, lengths, model.config.mask_token_id, markup.limit)
        plans.append(InfillPlan(markup.tokenizer, input_ids, masked, choices, markup.stop_at, markup.stop_start,
                                seed, _spans(markup.segments, lengths), bool(markup.shifted and markup.shifted[0])))
    return plans


def choose_plan(model, markup: Markup, *, length_prior=None, factorization=None, temperature=1.0,
                greedy=False, seed=None) -> InfillPlan:
    """``plan_rows`` for one seed."""
    return plan_rows(model, markup, [seed], length_prior=length_prior, factorization=factorization,
                     temperature=temperature, greedy=greedy)[0]


def parse_infill(tokenizer, text: str, *, mask_token_id: int | None = None,
                 max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids LongTensor [L], masked BoolTensor [L]) for a marked-up ``text`` whose holes
    all state their length (``[MASK:n]``; holes of unknown length need ``infill``).

    Hidden positions hold ``mask_token_id`` (default: the tokenizer's mask token, else
    ``DEFAULT_MASK_TOKEN_ID``). ``max_length``, when given, is enforced with an InputError.
    """
    segments, holes = split_markup(tokenizer, text)
    if any(isinstance(h, Hole) for h in holes):
        raise InputError("the text has holes of unknown length ([MASK] or [MASK:a-b]): use infill(), which "
                         "chooses their lengths, or give each hole its length as [MASK:n]")
    if mask_token_id is None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    return assemble(segments, holes, DEFAULT_MASK_TOKEN_ID if mask_token_id is None else int(mask_token_id),
                    max_length)


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


def _spans(segments, lengths) -> list[tuple[int, int]]:
    """(start, end) token positions of every hole of a laid-out row."""
    spans, position = [], len(segments[0])
    for n, segment in zip(lengths, segments[1:]):
        spans.append((position, position + n))
        position += n + len(segment)
    return spans


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
    """``text_only`` for ``sample``'s keywords: ``non_text_ids`` added to the ``suppress`` of
    ``sample_options`` (a keyword, or the given ``config``'s)."""
    config = sample_options.get("config")
    current = set(sample_options.get("suppress", config.suppress if config is not None else ()))
    sample_options["suppress"] = tuple(sorted(current | non_text_ids(tokenizer, keep_end_of_text)))


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
        wanted = h.candidates(max_hole)
        fitting = [n for n in wanted if room is None or n <= room] or [low]
        if len(wanted) > 1 and len(fitting) == 1:  # the limit, not the context, would fix its length
            raise InputError(f"a hole of unknown length has room for only {fitting[0]} token(s) within the model's "
                             f"maximum length of {limit}: shorten the text, or give the hole its length "
                             f"([MASK:{fitting[0]}])")
        out.append(fitting)
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
