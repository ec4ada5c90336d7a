r"""Holes of unknown length: an exact length posterior from the model's any-subset marginals.

For a hole between a left context A and a right context C, an AS-ARM gives the exact chain
likelihood of C placed n positions after A with the n hole positions *absent* (rank -1 in
``model.chain_logits``: never a key, never queried). So

    p(n | A, C) ∝ prior(n) · p(C | A, n)                          ("right-given-left")

and, since a segment seen alone has an n-free likelihood (the model only sees relative
positions), the second exact factorization p(A, C | n) = p(C) · p(A | C, n) gives

    p(n | A, C) ∝ prior(n) · p(A | C, n)                          ("left-given-right")

where A is scored left to right with C visible and the hole after it — the order a
left-to-right-trained AS-ARM saw in training. Every candidate length is one row of a batched
``chain_logits`` call. Several holes: the segments between them are scored the same way (the
first segment visible and the rest scored left to right, or the last segment visible and the
rest scored), one row per cell of the grid of lengths. Tokens are scored with
``asarm.sampling.TargetDistribution`` (mask token excluded, temperature applied) exactly as the
samplers draw them.

Drawing n from this posterior and then the hole's tokens with ``asarm.sample`` given n draws the
pair exactly from prior x model. A hole at the very start or end of the text has no context on
one side; the likelihood then does not depend on n, and the posterior is the prior.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
import time
from collections.abc import Sequence

import torch

from .errors import InputError

FACTORIZATIONS = ("right-given-left", "left-given-right")
DEFAULT_MAX_HOLE = 32
MAX_EXACT_CELLS = 4096  # beyond this many cells of the length grid: the hole-by-hole approximation
ROWS_PER_PASS = 64
MAX_HOLE_LIMIT = 4096  # longest hole length anyone may ask for (--max-hole): memory stays bounded


@dataclasses.dataclass
class PlanningBudget:
    """Bounds on one request's hole-length work (a server sets them; see ``planning_budget``):
    at most ``max_cells`` exact cells (beyond: hole by hole), stopped at ``deadline``
    (``time.monotonic()``), and each posterior computed once however many choices use it."""
    max_cells: int = MAX_EXACT_CELLS
    deadline: float | None = None
    memo: dict = dataclasses.field(default_factory=dict)


_BUDGET: contextvars.ContextVar[PlanningBudget | None] = contextvars.ContextVar("asarm_planning_budget", default=None)


class PlanningTimeout(InputError):
    """The hole-length posterior was still being computed at the request's deadline."""


@contextlib.contextmanager
def planning_budget(max_cells: int = MAX_EXACT_CELLS, deadline: float | None = None):
    token = _BUDGET.set(PlanningBudget(max_cells, deadline))
    try:
        yield _BUDGET.get()
    finally:
        _BUDGET.reset(token)


def _check_deadline() -> None:
    budget = _BUDGET.get()
    if budget is not None and budget.deadline is not None and time.monotonic() > budget.deadline:
        raise PlanningTimeout("choosing the hole lengths took longer than the request's time limit: "
                              "allow shorter holes (max_hole) or fewer holes")


@dataclasses.dataclass
class LengthChoice:
    """How the length of one hole was chosen (``infill(..., return_result=True).lengths``)."""

    length: int
    probability: float  # posterior probability of ``length`` (joint cell's for "exact-joint")
    candidates: list[int]
    posterior: list[float]  # this hole's marginal posterior over ``candidates``
    method: str  # "given", "exact", "exact-joint", "hole-by-hole (approximate)" or "prior (no context)"


def check_factorization(factorization: str) -> None:
    if factorization not in FACTORIZATIONS:
        raise InputError(f"factorization must be one of {', '.join(FACTORIZATIONS)}, got {factorization!r}")


def normalize_prior(prior, lengths: Sequence[int]) -> torch.Tensor:
    """Prior weights over ``lengths`` as float64 (uniform for None). ``prior`` is a sequence
    aligned with ``lengths``, a dict {length: weight} or a callable length -> weight."""
    if prior is None:
        w = torch.ones(len(lengths), dtype=torch.float64)
    elif callable(prior):
        w = torch.tensor([float(prior(n)) for n in lengths], dtype=torch.float64)
    elif isinstance(prior, dict):
        w = torch.tensor([float(prior.get(n, 0.0)) for n in lengths], dtype=torch.float64)
    else:
        w = torch.as_tensor(prior, dtype=torch.float64).flatten()
        if w.numel() != len(lengths):
            raise InputError(f"the prior has {w.numel()} weights for {len(lengths)} candidate lengths")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InputError("prior weights must be finite and >= 0")
    if float(w.sum()) <= 0:
        raise InputError("the prior gives no weight to any candidate length")
    return w / w.sum()


def _check_lengths(lengths) -> list[int]:
    out = [int(n) for n in lengths]
    if not out:
        raise InputError("no candidate lengths")
    if any(n < 1 for n in out) or len(set(out)) != len(out):
        raise InputError("candidate lengths must be distinct integers >= 1")
    return out


def _row(segments, cell, factorization):
    """(ids, ranks) of one scoring row: segments joined by holes of the cell's lengths."""
    ids, ranks = [], []
    visible = 0 if factorization == "right-given-left" else len(segments) - 1
    next_rank = 1
    for i, seg in enumerate(segments):
        if i:
            ids += [0] * cell[i - 1]
            ranks += [-1] * cell[i - 1]
        ids += list(seg)
        if i == visible:
            ranks += [0] * len(seg)
        else:
            ranks += list(range(next_rank, next_rank + len(seg)))
            next_rank += len(seg)
    return ids, ranks


@torch.no_grad()
def evidence_log_likelihoods(model, segments: Sequence[Sequence[int]], cells: Sequence[Sequence[int]], *,
                             temperature: float = 1.0, factorization: str = "right-given-left",
                             rows_per_pass: int = ROWS_PER_PASS) -> torch.Tensor:
    """log p(scored segments | visible segment, hole lengths = cell) for every cell, float64 [C].

    ``segments``: the K+1 token-id lists around K holes; ``cells``: tuples of K lengths.
    Each cell is one row; rows go through ``model.chain_logits`` ``rows_per_pass`` at a time.
    """
    from .sampling import TargetDistribution, check_temperature
    from .scoring import chain_log_probs

    check_factorization(factorization)
    check_temperature(temperature)
    target = TargetDistribution(model.config.mask_token_id, float(temperature))
    out = torch.zeros(len(cells), dtype=torch.float64)
    visible = 0 if factorization == "right-given-left" else len(segments) - 1
    if sum(len(s) for i, s in enumerate(segments) if i != visible) == 0:
        return out  # nothing scored: the evidence does not depend on the lengths
    for start in range(0, len(cells), rows_per_pass):
        _check_deadline()  # a request's budget: between passes, never inside one
        rows = [_row(segments, c, factorization) for c in cells[start:start + rows_per_pass]]
        L = max(len(r[0]) for r in rows)
        ids = torch.tensor([r[0] + [0] * (L - len(r[0])) for r in rows], device=model.device)
        ranks = torch.tensor([r[1] + [-1] * (L - len(r[1])) for r in rows], device=model.device)
        picked, _ = chain_log_probs(model, ids, ranks, target)
        out[start:start + len(rows)] = picked.sum(1).cpu()
    return out


def _fits(model, segments, cell) -> bool:
    limit = getattr(model.config, "max_length", None)
    return limit is None or sum(len(s) for s in segments) + sum(cell) <= limit


def length_posterior(model, left_ids, right_ids, lengths=range(1, DEFAULT_MAX_HOLE + 1), prior=None,
                     temperature: float = 1.0, factorization: str = "right-given-left") -> torch.Tensor:
    """Posterior probabilities (float64, aligned with ``lengths``) of the length of one hole
    between ``left_ids`` and ``right_ids`` (token id sequences): prior(n) · p(context | n).

    Lengths that would make the sequence longer than the model's limit get probability 0
    (an InputError if none remains). ``prior``: None (uniform), weights aligned with
    ``lengths``, a dict or a callable. ``factorization``: "right-given-left" scores the right
    context given the left one, "left-given-right" the left given the right (see the module
    docstring); both are exact for the model.
    """
    lengths = _check_lengths(lengths)
    segments = [_as_list(left_ids), _as_list(right_ids)]
    return joint_posterior(model, segments, [lengths], prior=[prior], temperature=temperature,
                           factorization=factorization)[1].view(-1)


def _as_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise InputError(f"context ids must be one sequence [L], got shape {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]


def joint_posterior(model, segments, candidates, *, prior=None, temperature=1.0,
                    factorization="right-given-left") -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Exact joint posterior over the grid of the holes' candidate lengths: (cells, probs).

    ``candidates``: one list of lengths per hole; ``prior``: None or one prior per hole
    (independent across holes). Cells longer than the model's limit get probability 0.
    """
    priors = [normalize_prior(p, c) for p, c in zip(prior or [None] * len(candidates), candidates)]
    budget = _BUDGET.get()
    key = None
    if budget is not None:  # the same posterior for every choice of a request: computed once
        key = (tuple(map(tuple, segments)), tuple(map(tuple, candidates)), tuple(tuple(p.tolist()) for p in priors),
               float(temperature), factorization)
        if key in budget.memo:
            return budget.memo[key]
    cells = list(itertools.product(*candidates))
    log_prior = torch.zeros(len(cells), dtype=torch.float64)
    for cell_index, idx in enumerate(itertools.product(*[range(len(c)) for c in candidates])):
        log_prior[cell_index] = sum(math.log(float(p[i])) if p[i] > 0 else -math.inf for p, i in zip(priors, idx))
    keep = [i for i, c in enumerate(cells) if _fits(model, segments, c) and log_prior[i] > -math.inf]
    if not keep:
        raise InputError("no candidate hole length fits the model's length limit (or has prior weight): "
                         "shorten the text or allow shorter holes")
    evidence = torch.zeros(len(cells), dtype=torch.float64)
    evidence[keep] = evidence_log_likelihoods(model, segments, [cells[i] for i in keep], temperature=temperature,
                                              factorization=factorization)
    allowed = torch.zeros(len(cells), dtype=torch.bool)
    allowed[keep] = True
    result = cells, posterior_from_evidence(evidence, log_prior, allowed)
    if key is not None:
        budget.memo[key] = result
    return result


def posterior_from_evidence(log_evidence: torch.Tensor, log_prior: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """p(cell | context) ∝ prior(cell) · p(context | cell) over the ``allowed`` cells, 0 elsewhere
    (float64 [C]; log-evidence and log-prior per cell, the prior need not be normalised)."""
    scores = torch.where(allowed, log_prior + log_evidence, torch.full_like(log_evidence, -math.inf))
    return torch.softmax(scores, 0)


def _marginal(cells, probs, hole: int, candidates: list[int]) -> list[float]:
    m = {n: 0.0 for n in candidates}
    for cell, p in zip(cells, probs.tolist()):
        m[cell[hole]] += p
    return [m[n] for n in candidates]


def _pick(probs: torch.Tensor, greedy: bool, generator: torch.Generator) -> int:
    """The index of a cell drawn from ``probs`` (float64) with one uniform of ``generator``
    (``asarm.sampling.draw``), or the most probable one when ``greedy``."""
    from .sampling import draw

    if greedy:
        return int(torch.argmax(probs))
    return int(draw(probs, torch.rand((), generator=generator, dtype=torch.float64)))


def choose_lengths(model, segments, holes, *, prior=None, temperature=1.0, greedy=False,
                   factorization="right-given-left", generator: torch.Generator | None = None,
                   max_cells: int | None = None) -> list[LengthChoice]:
    """One ``LengthChoice`` per hole. ``holes``: per hole a list of candidate lengths (one
    candidate = a given length). The exact joint posterior when the grid has at most
    ``max_cells`` cells, else hole by hole (approximate). Sampled (seeded ``generator``) or,
    with ``greedy``, the most probable cell."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if max_cells is None:
        budget = _BUDGET.get()
        max_cells = budget.max_cells if budget is not None else MAX_EXACT_CELLS
    priors = [p if len(c) > 1 else None for p, c in zip(prior or [None] * len(holes), holes)]
    unknown = [i for i, c in enumerate(holes) if len(c) > 1]
    if not unknown:
        return [LengthChoice(c[0], 1.0, list(c), [1.0], "given") for c in holes]
    if math.prod(len(c) for c in holes) <= max_cells:
        cells, probs = joint_posterior(model, segments, holes, prior=priors, temperature=temperature,
                                       factorization=factorization)
        cell = cells[_pick(probs, greedy, generator)]
        p_cell = float(probs[cells.index(cell)])
        method = "exact" if len(unknown) == 1 else "exact-joint"
        if not _has_context(segments, unknown, factorization):
            method = "prior (no context)"
        return [LengthChoice(cell[i], 1.0 if len(c) == 1 else (p_cell if method == "exact-joint"
                             else _marginal(cells, probs, i, c)[c.index(cell[i])]),
                             list(c), _marginal(cells, probs, i, c), "given" if len(c) == 1 else method)
                for i, c in enumerate(holes)]
    return _hole_by_hole(model, segments, holes, priors, temperature, greedy, factorization, generator)


def _has_context(segments, unknown, factorization) -> bool:
    """Whether the evidence can depend on any unknown hole's length at all."""
    scored = [i for i in range(len(segments)) if i != (0 if factorization == "right-given-left" else len(segments) - 1)]
    return any(len(segments[i]) for i in scored) and any(
        any(len(s) for s in segments[:h + 1]) and any(len(s) for s in segments[h + 1:]) for h in unknown)


def _hole_by_hole(model, segments, holes, priors, temperature, greedy, factorization, generator):
    """The approximation for big grids: holes left to right, each from its posterior given the
    earlier holes' chosen lengths and the later holes at their prior's median candidate."""
    current = [c[len(c) // 2] if p is None else c[_prior_median(p, c)] for c, p in zip(holes, priors)]
    choices = []
    for i, c in enumerate(holes):
        if len(c) == 1:
            choices.append(LengthChoice(c[0], 1.0, list(c), [1.0], "given"))
            continue
        if not any(_fits(model, segments, current[:i] + [n] + current[i + 1:]) for n in c):
            # the later holes parked at their medians leave this one no room (ten holes in a
            # short text): park them at their shortest candidates instead
            current[i + 1:] = [min(h) for h in holes[i + 1:]]
        grid = [current[:i] + [n] + current[i + 1:] for n in c]
        cells, probs = joint_posterior(model, segments, [[n] for n in current[:i]] + [c] + [[n] for n in current[i + 1:]],
                                       prior=[None] * i + [priors[i]] + [None] * (len(holes) - i - 1),
                                       temperature=temperature, factorization=factorization)
        assert [list(x) for x in cells] == grid
        j = _pick(probs, greedy, generator)
        current[i] = c[j]
        choices.append(LengthChoice(c[j], float(probs[j]), list(c), probs.tolist(), "hole-by-hole (approximate)"))
    return choices


def _prior_median(prior, candidates) -> int:
    w = normalize_prior(prior, candidates).cumsum(0)
    return int(torch.searchsorted(w, torch.tensor([0.5], dtype=torch.float64)))


# --- a length prior measured on text like the user's -----------------------------------------------
UNITS = ("line", "sentence", "paragraph")
_SENTENCE_END = r"(?<=[.!?])[\"')\]]*\s+"


def text_units(text: str, unit: str) -> list[str]:
    """The pieces of ``text`` a hole of that kind would hold, written as a hole holds them:
    "line": every non-blank line with its newline (a code line with its indentation);
    "sentence": every sentence with a leading space (the space before a hole goes into it);
    "paragraph": every block between blank lines, with a leading space."""
    import re

    if unit == "line":
        return [line + "\n" for line in text.split("\n") if line.strip()]
    if unit == "sentence":
        return [" " + s.strip() for block in re.split(r"\n\s*\n", text)
                for s in re.split(_SENTENCE_END, " ".join(block.split())) if s.strip()]
    if unit == "paragraph":
        return [" " + " ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]
    raise InputError(f"unknown unit {unit!r}: use one of {', '.join(UNITS)}")


def length_counts(tokenizer, pieces: Sequence[str], max_length: int) -> tuple[list[int], int]:
    """(counts of token lengths 1..max_length, how many pieces were longer) with ``tokenizer``."""
    from .tokenization import encode

    if max_length < 1:
        raise InputError(f"max_length must be >= 1, got {max_length}")
    counts, longer = [0] * max_length, 0
    for piece in pieces:
        n = len(encode(tokenizer, piece))
        if n > max_length:
            longer += 1
        elif n >= 1:
            counts[n - 1] += 1
    return counts, longer


def length_prior_from_text(model_or_tokenizer, texts: Sequence[str], unit: str = "sentence",
                           max_length: int = DEFAULT_MAX_HOLE, smoothing: float = 1.0) -> list[float]:
    """A prior over hole lengths 1..max_length (``infill(length_prior=...)``, ``--length-prior``):
    the token-length histogram of ``texts``' units, plus ``smoothing`` per length, normalised.
    With our small models this prior carries nearly all the information about a hole's length
    (results/hole-length), so measure it on text like the text being filled.
    ``model_or_tokenizer``: the model (like the rest of the API; its tokenizer is used) or a tokenizer."""
    tokenizer = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(max_length, int) or not 1 <= max_length <= MAX_HOLE_LIMIT:
        raise InputError(f"max_length must be an integer from 1 to {MAX_HOLE_LIMIT}, got {max_length!r}")
    counts, _ = length_counts(tokenizer, [p for t in texts for p in text_units(t, unit)], max_length)
    return prior_from_counts(counts, smoothing, what=f"{unit} of 1 to {max_length} tokens")


def prior_from_counts(counts: Sequence[int], smoothing: float = 1.0, what: str = "length") -> list[float]:
    """Counts of lengths 1..len(counts) -> prior weights: (count + smoothing), normalised."""
    if not (math.isfinite(smoothing) and smoothing >= 0):
        raise InputError(f"smoothing must be a finite number >= 0, got {smoothing}")
    total = sum(counts) + smoothing * len(counts)
    if total <= 0:
        raise InputError(f"no {what} in the text, and no smoothing")
    return [(c + smoothing) / total for c in counts]
