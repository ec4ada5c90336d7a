"""Proposers: where a row's draft blocks come from (in the spirit of HF's ``CandidateGenerator``).

A proposer answers three questions for its row:
  ``draft_queries(block)``  which query rows a *draft pass* needs before the block exists
                            (none for proposers that need no network pass);
  ``propose(block, drawn)`` the block of drafts, from that pass's draws or from elsewhere;
  ``lookahead`` / ``carry`` optional: extra queries riding along in the oracle pass and the next
                            block built from them (one-pass rounds);
and hears ``observe(positions)`` when tokens are decoded. Any proposal keeps ASSD exact (the
verify step corrects it); a good one only makes it faster. Adding a draft type is one class
here plus one line in ``PROPOSERS``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..drafts import NgramDrafter
from .target import draw


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
class Drawn:
    """Draws of a pass's query rows for one row: tokens (host) and their distributions (device)."""

    tokens: list[int]
    probs: torch.Tensor  # [n, V]


class Proposer:
    supports_lookahead = False

    def __init__(self, row):
        self.row = row

    def draft_queries(self, block: int) -> list[tuple[int, int]]:
        return []

    def propose(self, block: int, drawn: Drawn | None) -> Block:
        raise NotImplementedError

    def lookahead(self, block: int) -> int:
        return 0

    def carry(self, leftover: Block | None, checked: torch.Tensor, extra: Drawn) -> Block | None:
        """The next block from an oracle pass: ``leftover`` are the drafts after a rejection
        (None after a full accept), ``checked`` [len(leftover), V] the target distributions of
        their verification queries (which saw the rejected draft), ``extra`` the draws of the
        bonus and lookahead queries."""
        return None

    def observe(self, positions: list[int]) -> None:
        pass


class SelfDraft(Proposer):
    """The paper's draft pass: the next block's positions queried together, each seeing only the
    visible and decoded tokens. The first query's conditional is exact, so its draft is too."""

    supports_lookahead = True

    def draft_queries(self, block):
        row = self.row
        return [(row.order[row.n + i], row.n + 1) for i in range(block)]

    def propose(self, block, drawn):
        return Block(drawn.tokens[:block], drawn.probs[:block], exact_first=True)


class OnePassDraft(SelfDraft):
    """One-pass rounds: the oracle pass also queries the positions after the block (seeing every
    draft), and those draws are the next block, so rounds after the first need no draft pass.
    After a rejection the untested drafts stay proposals for their positions: keeping the
    proposal chain consistent measured better than fresher conditioning (scripts/one_pass_variants.py)."""

    def lookahead(self, block):
        return block - 1

    def carry(self, leftover, checked, extra):
        tokens = (leftover.tokens if leftover else []) + extra.tokens
        if not tokens:
            return None
        parts = ([leftover.probs] if leftover else []) + [extra.probs]
        block = min(self.row.k, self.row.m - self.row.n)
        return Block(tokens[:block], torch.cat(parts)[:block])


class NgramDraft(Proposer):
    """Bigram counts of the row's own text (no network pass); drafts are drawn on the host from
    the row's generator, left to right, each conditioned on the draft before it."""

    def __init__(self, row):
        super().__init__(row)
        self.drafter = NgramDrafter(row.vocab_size, row.target.mask_token_id)
        self.drafter.observe(row.tokens, row.known)

    def propose(self, block, drawn):
        row, target = self.row, self.row.target
        drafted: dict[int, int] = {}
        tokens, probs = [], []
        for i in range(block):
            pos = row.order[row.n + i]
            prev = int(row.tokens[pos - 1]) if pos > 0 and row.known[pos - 1] else drafted.get(pos - 1)
            p = self.drafter.distribution(prev, 1.0 if target.greedy else target.temperature)
            if target.greedy:
                p = torch.zeros_like(p).scatter_(0, p.argmax().view(1), 1.0)
            drafted[pos] = int(draw(p, torch.rand((), generator=row.generator, dtype=torch.float64)))
            tokens.append(drafted[pos])
            probs.append(p)
        return Block(tokens, torch.stack(probs).to(row.device))

    def observe(self, positions):
        self.drafter.observe(self.row.tokens, self.row.known, positions)


PROPOSERS: dict[str, type[Proposer]] = {"self": SelfDraft, "ngram": NgramDraft}


def make_proposer(row, config) -> Proposer:
    if config.one_pass:
        return OnePassDraft(row)
    return PROPOSERS[config.draft](row)


def next_k(config, k: int, all_accepted: bool) -> int:
    """Block-size policy: fixed, or adaptive (grow after a fully accepted round, shrink after a
    rejection). k only changes how many drafts are proposed, never how they are verified."""
    if not config.adaptive_k:
        return k
    return min(k + 2, config.max_k) if all_accepted else max(k - 1, 2)
