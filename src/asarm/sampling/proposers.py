"""Proposers: where a row's draft blocks come from (in the spirit of HF's ``CandidateGenerator``).

A proposer sees its row only through a ``RowView`` (read-only, passed to every call) and answers:
  ``draft_queries(view, block)``  the query rows of a *draft pass* (when its registry entry
                                  says it needs one);
  ``propose(view, block, drawn)`` the block of drafts, from that pass's draws or from elsewhere;
  ``oracle_extras(view, block)``  which queries ride along in the oracle pass after the block:
                                  the bonus query, and lookahead queries (one-pass rounds);
  ``carry(view, ...)``            the next block built from those lookahead draws;
and hears ``observe(view, positions)`` when tokens are decoded. Any proposal keeps ASSD exact
(the verify step corrects it); a good one only makes it faster. Adding a draft type is one class
here plus one line in ``asarm.sampling.config.PROPOSERS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..errors import InputError
from .config import PROPOSERS, DecodeConfig
from .drafts import HeadDrafter, NgramDrafter
from .target import TargetDistribution, draw


@dataclasses.dataclass(frozen=True)
class RowView:
    """What a proposer may read of its row. The tensors are the row's own: read, never write."""

    order: Sequence[int]  # the hidden positions in decoding order
    n_decoded: int  # how many of them are decoded
    block_size: int  # drafts wanted in the next block (adaptive k changes it)
    tokens: torch.Tensor  # [L] CPU long; hidden positions hold the mask token until decoded
    known: torch.Tensor  # [L] bool: visible or decoded
    target: TargetDistribution
    generator: torch.Generator  # the row's own random stream
    device: torch.device  # where the model (and the target probabilities) live
    vocab_size: int
    drafter: HeadDrafter | None = None  # the model's draft head, bound to it (draft="head")

    @property
    def n_left(self) -> int:
        return len(self.order) - self.n_decoded


@dataclasses.dataclass
class Block:
    """Drafts for the next positions of a row's order."""

    tokens: list[int]
    probs: torch.Tensor  # [b, V] the proposal each draft was drawn from (float64, model's device)
    exact_first: bool = False  # the first draft was drawn from its exact conditional: accept as is

    def __len__(self) -> int:
        return len(self.tokens)

    def tail(self, start: int) -> Block | None:
        return Block(self.tokens[start:], self.probs[start:]) if start < len(self.tokens) else None


@dataclasses.dataclass
class Tree:
    """Multi-draft: several continuations of a shared ``trunk`` (a two-pass round's exact first
    draft, or nothing in one-pass rounds), each drawn independently given it, so their first
    drafts are independent draws from one proposal (what recursive rejection at that position
    needs, sampling/verification.py ``verify_tree``)."""

    trunk: Block | None  # exact drafts every continuation follows (None: they branch at once)
    branches: list[Block]  # the continuations, one length, for the positions after the trunk

    @property
    def n_trunk(self) -> int:
        return 0 if self.trunk is None else len(self.trunk)

    def __len__(self) -> int:
        return self.n_trunk + len(self.branches[0])


@dataclasses.dataclass
class Drawn:
    """Draws of a pass's query rows for one row: tokens (host) and their distributions (device)."""

    tokens: list[int]
    probs: torch.Tensor  # [n, V]
    hidden: torch.Tensor | None = None  # [n, d] the query rows' final states, for proposers that ask


class Proposer:
    needs_hidden = False  # the engine passes the query rows' final states (Drawn.hidden)

    def __init__(self, view: RowView, config: DecodeConfig):
        self.bonus = config.bonus
        # a block verdict looks at every draft, so drafts past the first rejection are no longer
        # draws from their proposals (sampling/verification.py): carry must draw them again
        self.redraw_leftover = config.verification == "block"

    def draft_queries(self, view: RowView, block: int) -> list[tuple[int, int]]:
        """(position, rank) of each query row of the draft pass."""
        return []

    def propose(self, view: RowView, block: int, drawn: Drawn | None) -> Block:
        raise NotImplementedError

    def propose_tree(self, view: RowView, block: int, drawn: Drawn, n_branches: int) -> Tree:
        """``n_branches`` continuations of the draft pass's exact first draft (``branches`` > 1);
        only proposers whose registry entry says ``branching``."""
        raise NotImplementedError

    def carry_tree(self, view: RowView, leftover: Block | None, checked: Drawn, extra: Drawn,
                   n_branches: int) -> Tree | None:
        """``carry`` for multi-draft one-pass rounds: ``n_branches`` independent continuations
        of the next block, from the chosen continuation's rows of the oracle pass."""
        return None

    def oracle_extras(self, view: RowView, block: int) -> tuple[bool, int]:
        """(query the position after the block, how many lookahead queries after that one)."""
        return self.bonus, 0

    def carry(self, view: RowView, leftover: Block | None, checked: Drawn, extra: Drawn) -> Block | None:
        """The next block from an oracle pass: ``leftover`` are the drafts after a rejection
        (None after a full accept), ``checked`` the verification queries of their positions
        (which saw the rejected draft; ``probs`` their target distributions), ``extra`` the
        draws of the bonus and lookahead queries."""
        return None

    def observe(self, view: RowView, positions: list[int]) -> None:
        pass


class SelfDraft(Proposer):
    """The paper's draft pass: the next block's positions queried together, each seeing only the
    visible and decoded tokens. The first query's conditional is exact, so its draft is too."""

    def draft_queries(self, view, block):
        n = view.n_decoded
        return [(view.order[n + i], n + 1) for i in range(block)]

    def propose(self, view, block, drawn):
        return Block(drawn.tokens[:block], drawn.probs[:block], exact_first=True)

    def propose_tree(self, view, block, drawn, n_branches):
        """The pass's own draws are the first continuation; each other one draws every position
        again from the same marginals (the row's generator), so all are independent."""
        probs = drawn.probs[1:block]
        branches = [Block(drawn.tokens[1:block], probs)]
        branches += [self._draws(view, probs) for _ in range(n_branches - 1)]
        return Tree(Block(drawn.tokens[:1], drawn.probs[:1], exact_first=True), branches)

    @staticmethod
    def _draws(view, probs: torch.Tensor) -> Block:
        u = torch.rand(probs.shape[0], generator=view.generator, dtype=torch.float64)
        return Block(draw(probs, u.to(probs.device)).tolist(), probs)


class OnePassDraft(SelfDraft):
    """One-pass rounds: the oracle pass also queries the positions after the block (seeing every
    draft), and those draws are the next block, so rounds after the first need no draft pass.
    After a rejection the untested drafts stay proposals for their positions: keeping the
    proposal chain consistent measured better than fresher conditioning (scripts/one_pass_variants.py).
    Under block verification the drafts after the rejection were not untested (the verdict is a
    maximum over the whole block), so they are drawn again from the same proposals. That keeps
    the chain exact but costs: the bonus and lookahead draws were conditioned on the old drafts,
    so they fit the redrawn ones less well (results/block-verification: one-pass rounds keep
    fewer tokens with block verification than token by token)."""

    def oracle_extras(self, view, block):
        return True, view.block_size - 1

    def carry(self, view, leftover, checked, extra):
        if leftover is not None and self.redraw_leftover:
            u = torch.rand(len(leftover), generator=view.generator, dtype=torch.float64)
            leftover = Block(draw(leftover.probs, u.to(leftover.probs.device)).tolist(), leftover.probs)
        tokens = (leftover.tokens if leftover else []) + extra.tokens
        if not tokens:
            return None
        parts = ([leftover.probs] if leftover else []) + [extra.probs]
        block = min(view.block_size, view.n_left)
        return Block(tokens[:block], torch.cat(parts)[:block])

    def carry_tree(self, view, leftover, checked, extra, n_branches):
        """The same proposals as ``carry``: the chosen continuation's untested ones, then the
        lookahead rows'. The first continuation keeps its untested drafts, as ``carry`` does (the
        lookahead rows saw them: redrawn, they would fit those proposals less well; measured,
        results/multi-draft) and draws the lookahead positions; the others draw every position
        afresh. An untested draft is still a draw from its proposal, independent of the
        others, so the continuations' first drafts stay independent draws from one proposal."""
        parts = ([leftover.probs] if leftover else []) + [extra.probs]
        probs = torch.cat(parts)[: min(view.block_size, view.n_left)]
        if probs.shape[0] == 0:
            return None
        kept = leftover.tokens[: probs.shape[0]] if leftover else []
        first = Block(kept + self._draws(view, probs[len(kept):]).tokens, probs)
        return Tree(None, [first] + [self._draws(view, probs) for _ in range(n_branches - 1)])


class HeadDraft(SelfDraft):
    """A learned draft head (asarm.draft_head) over the draft pass's query states: the first draft
    is the pass's exact conditional, each later one is drawn from the head given the drafts
    before it. Proposals are the row's target distributions of the head's logits."""

    needs_hidden = True

    def __init__(self, view, config):
        super().__init__(view, config)
        if view.drafter is None:
            raise InputError("draft='head' needs a draft head and this model has none: train one with "
                             "`asarm train-draft MODEL` (saved beside the model, where load_model finds it)")

    @staticmethod
    def _previous(view) -> tuple[int, int | None]:
        """The token the block follows in the order (mask id and None before any decoding)."""
        if view.n_decoded == 0:
            return view.target.mask_token_id, None
        pos = view.order[view.n_decoded - 1]
        return int(view.tokens[pos]), pos

    def _draft(self, view, hidden, n, first=None) -> Block:
        positions = list(view.order[view.n_decoded : view.n_decoded + n])
        tokens, probs = view.drafter.draft(hidden[:n], positions, *self._previous(view), view.target,
                                           view.generator, first)
        return Block(tokens, probs, exact_first=first is not None)

    def _draft_tree(self, view, hidden, n, n_branches, first=None) -> Tree:
        """``n_branches`` continuations, drafted together (``HeadDrafter.draft``'s ``n_chains``):
        after the trunk (the exact ``first`` draft, if any) they branch at once."""
        positions = list(view.order[view.n_decoded : view.n_decoded + n])
        tokens, probs = view.drafter.draft(hidden[:n], positions, *self._previous(view), view.target,
                                           view.generator, first, n_chains=n_branches)
        t = 0 if first is None else 1
        trunk = Block(tokens[0][:t], probs[0, :t], exact_first=True) if t else None
        return Tree(trunk, [Block(chain[t:], probs[c, t:]) for c, chain in enumerate(tokens)])

    def propose(self, view, block, drawn):
        return self._draft(view, drawn.hidden, block, (drawn.tokens[0], drawn.probs[0]))

    def propose_tree(self, view, block, drawn, n_branches):
        return self._draft_tree(view, drawn.hidden, block, n_branches, (drawn.tokens[0], drawn.probs[0]))

    def _hidden_after(self, view, leftover, checked, extra) -> torch.Tensor:
        parts = ([checked.hidden] if leftover is not None else []) + [extra.hidden]
        return torch.cat(parts)


class OnePassHeadDraft(HeadDraft):
    """One-pass rounds with the head: the oracle pass's lookahead queries (and, after a
    rejection, the verification queries of the untested positions) give the query states of
    the next block, and the head drafts all of it, starting from the token just decoded."""

    def oracle_extras(self, view, block):
        return True, view.block_size - 1

    def carry(self, view, leftover, checked, extra):
        hidden = self._hidden_after(view, leftover, checked, extra)
        n = min(view.block_size, view.n_left, hidden.shape[0])
        return self._draft(view, hidden, n) if n > 0 else None

    def carry_tree(self, view, leftover, checked, extra, n_branches):
        hidden = self._hidden_after(view, leftover, checked, extra)
        n = min(view.block_size, view.n_left, hidden.shape[0])
        return self._draft_tree(view, hidden, n, n_branches) if n > 0 else None


class NgramDraft(Proposer):
    """Bigram counts of the row's own text (no network pass); drafts are drawn on the host from
    the row's generator, left to right, each conditioned on the draft before it."""

    def __init__(self, view, config):
        super().__init__(view, config)
        self.drafter = NgramDrafter(view.vocab_size, view.target.mask_token_id)
        self.drafter.observe(view.tokens, view.known)

    def propose(self, view, block, drawn):
        target, known = view.target, view.known
        drafted: dict[int, int] = {}
        tokens, probs = [], []
        for i in range(block):
            pos = view.order[view.n_decoded + i]
            prev = int(view.tokens[pos - 1]) if pos > 0 and known[pos - 1] else drafted.get(pos - 1)
            p = self.drafter.distribution(prev, 1.0 if target.greedy else target.temperature)
            if target.greedy:
                p = torch.zeros_like(p).scatter_(0, p.argmax().view(1), 1.0)
            drafted[pos] = int(draw(p, torch.rand((), generator=view.generator, dtype=torch.float64)))
            tokens.append(drafted[pos])
            probs.append(p)
        return Block(tokens, torch.stack(probs).to(view.device))

    def observe(self, view, positions):
        self.drafter.observe(view.tokens, view.known, positions)


def make_proposer(view: RowView, config: DecodeConfig) -> Proposer:
    return PROPOSERS[config.proposer].load()(view, config)


def next_k(config: DecodeConfig, k: int, all_accepted: bool) -> int:
    """Block-size policy: fixed, or adaptive (grow after a fully accepted round, shrink after a
    rejection). k only changes how many drafts are proposed, never how they are verified."""
    if not config.adaptive_k:
        return k
    return min(k + 2, config.max_k) if all_accepted else max(k - 1, 2)
