"""One sequence's sampling state, the plan of its next pass, and ``SampleResult``.

A row knows its tokens, its decoding order (ranks fixed for the whole run: decoded token i has
rank i, visible tokens rank 0), ``n_decoded`` tokens decoded so far, the content rows not yet in
the cache (``pending``), its drafts (``block``) and its own random generator. ``plan`` says what
the next shared pass must compute for it; ``advance`` takes that pass's outcome. The invariants
(docs/design.md, "Row invariants"): ``order[:n_decoded]`` are exactly the decoded positions,
``known`` marks the visible and decoded ones, and every known token's content row is either in
the cache or in ``pending``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from .config import PROPOSERS
from .proposers import Block, Drawn, RowView, Tree, make_proposer, next_k


class Content(NamedTuple):
    pos: int
    token: int
    rank: int
    branch: int = 0  # multi-draft passes: the continuation it belongs to (0: seen by every row)


class Query(NamedTuple):
    pos: int
    rank: int
    branch: int = 0  # multi-draft passes: sees the contents of this continuation (and branch 0)


class BranchRows(NamedTuple):
    """Where one continuation of a multi-draft pass sits in its plan."""

    contents: list[int]  # indices of its drafts' content rows among the plan's contents
    targets: list[int]  # query rows with the targets of its drafts after the first
    bonus: int  # the query row after its last draft (-1: none)
    lookahead: int = 0  # one-pass rounds: proposal queries after the bonus query


@dataclasses.dataclass
class Plan:
    """What one pass computes for one row, and how to read its outcome."""

    kind: str  # "sequential" | "draft" | "verify" | "tree" (multi-draft verify)
    contents: list[Content]
    queries: list[Query]
    n_pending: int = 0  # leading contents committed to the cache whatever happens
    n_draft_contents: int = 0  # drafts written as contents: committed up to the accepted count
    target_rows: list[int] = dataclasses.field(default_factory=list)  # verify: query row of each draft (-1: exact)
    bonus_row: int = -1  # verify: the query after the block, seeing every draft
    n_lookahead: int = 0  # verify: proposal queries after the bonus query
    uniforms: torch.Tensor | None = None  # the row's uniforms for this pass, drawn once (Row.uniforms)
    shared_target: int = -1  # tree: the query row of the target after the first draft
    branches: list[BranchRows] = dataclasses.field(default_factory=list)  # tree: one per continuation

    @property
    def first_drawn(self) -> int:
        """The first query row whose draw is used (verification rows are read, not drawn; a
        tree's draws all happen in its verdict)."""
        if self.kind == "tree":
            return len(self.queries)
        if self.kind != "verify":
            return 0
        return self.bonus_row if self.bonus_row >= 0 else len(self.queries)

    @property
    def n_uniforms(self) -> int:
        if self.kind == "tree":  # one per continuation (recursive rejection), per later draft, the next draw
            return len(self.branches) + len(self.branches[0].targets) + 1
        return len(self.queries) + len(self.target_rows) + 1


@dataclasses.dataclass
class RoundEvent:
    """What a row's ``on_round`` callback receives after each of its rounds."""

    positions: list[int]  # filled this round, in decoding order
    tokens: list[int]
    round: int  # 1-based
    nfe: int  # passes this row has used so far
    resampled: int | None  # position whose draft was rejected and redrawn from the residual


@dataclasses.dataclass
class Outcome:
    """One row's share of a pass's decisions (host values, plus device views of its queries)."""

    drawn: list[int]  # a draw from each query row's target distribution (-1 where unused: verification rows)
    drawn_prob: list[float]
    probs: torch.Tensor  # [Q_row, V] the query rows' target distributions (device)
    n_accepted: int = 0
    next_token: int = -1  # replacement at the first rejection, or the bonus token, or -1
    next_prob: float = 0.0
    draft_prob: list[float] = dataclasses.field(default_factory=list)  # target prob of each draft
    branch: int = 0  # tree: the continuation whose drafts were kept (-1: none)
    hidden: torch.Tensor | None = None  # [Q_row, d] the query rows' final states (proposers that ask)


@dataclasses.dataclass
class SampleResult:
    """What ``sample`` returns. Per-row fields are tensors/lists of length B; for one sequence
    ([L] input, or one engine row) they are squeezed to scalars / one list."""

    input_ids: torch.Tensor
    nfe: torch.Tensor  # network passes per row (draft passes included)
    draft_calls: torch.Tensor  # draft proposals per row: self-draft passes, or n-gram calls (not passes)
    rounds: torch.Tensor
    accepted: list  # tokens produced per round, per row
    token_logprobs: torch.Tensor | None  # with return_logprobs: target-chain log-prob per sampled token, 0 elsewhere
    elapsed: float

    @classmethod
    def of_rows(cls, rows: list[Row], input_ids: torch.Tensor, return_logprobs: bool, elapsed: float,
                squeeze: bool) -> SampleResult:
        """The result of ``rows`` sampled from ``input_ids`` [B, L] (rows may be shorter: padding
        keeps its ids): the one place a SampleResult is built."""
        out = input_ids.detach().clone()
        logprobs = torch.zeros(out.shape, dtype=torch.float64)
        for b, row in enumerate(rows):
            n = row.tokens.shape[0]
            out[b, :n] = row.tokens.to(out.device)
            logprobs[b, :n] = row.logprobs
        result = cls(out, torch.tensor([r.nfe for r in rows]), torch.tensor([r.draft_calls for r in rows]),
                     torch.tensor([r.rounds for r in rows]), [list(r.accepted) for r in rows],
                     logprobs if return_logprobs else None, elapsed)
        return result.squeezed() if squeeze else result

    def squeezed(self) -> SampleResult:
        """The one-row result with its batch dimension dropped."""
        return SampleResult(self.input_ids[0], self.nfe[0], self.draft_calls[0], self.rounds[0], self.accepted[0],
                            None if self.token_logprobs is None else self.token_logprobs[0], self.elapsed)

    @property
    def tokens_per_round(self) -> float:
        rows = self.accepted if self.accepted and isinstance(self.accepted[0], list) else [self.accepted]
        counts = [c for row in rows for c in row]
        return sum(counts) / len(counts) if counts else 0.0


class Row:
    def __init__(self, tokens, order, config, target, generator, device, vocab_size, on_round=None,
                 constraint=None, drafter=None):
        self.tokens = tokens  # [L] CPU long; hidden positions hold the mask token until decoded
        self.constraint = constraint  # a RowConstraint (asarm.sampling.constraints), or None
        self.order = order.tolist() if constraint is None else constraint.reorder(order.tolist())
        self.n_hidden, self.n_decoded = len(self.order), 0
        self.config, self.target, self.generator = config, target, generator
        self.device, self.vocab_size = device, vocab_size
        self.drafter = drafter  # the model's draft head (sampling.drafts.HeadDrafter), or None
        self.on_round = on_round
        self.known = torch.ones(tokens.shape[0], dtype=torch.bool)
        self.known[order] = False
        self.visible = torch.nonzero(self.known).flatten().tolist()
        self.pending = [Content(p, int(tokens[p]), 0) for p in self.visible]
        self.block_size = config.k
        self.block: Block | None = None
        self.nfe = self.draft_calls = self.rounds = 0
        self.accepted: list[int] = []
        self.logprobs = torch.zeros(tokens.shape[0], dtype=torch.float64)
        self.proposer = make_proposer(self.view(), config) if config.method == "assd" else None
        self.draft_pass = config.method == "assd" and PROPOSERS[config.proposer].needs_pass

    @property
    def done(self) -> bool:
        return self.n_decoded >= self.n_hidden

    def view(self) -> RowView:
        return RowView(self.order, self.n_decoded, self.block_size, self.tokens, self.known, self.target,
                       self.generator, self.device, self.vocab_size, self.drafter)

    def known_contents(self) -> list[Content]:
        """Every known token with its rank: the content rows of a full-recompute pass."""
        decoded = [Content(p, int(self.tokens[p]), i + 1) for i, p in enumerate(self.order[: self.n_decoded])]
        return [Content(p, int(self.tokens[p]), 0) for p in self.visible] + decoded

    # --- planning -----------------------------------------------------------------------------
    def plan(self, cached: bool) -> Plan:
        base = self.pending if cached else self.known_contents()
        n, block = self.n_decoded, min(self.block_size, self.n_hidden - self.n_decoded)
        if self.proposer is None:
            return Plan("sequential", base, [Query(self.order[n], n + 1)], len(base))
        if self.block is None:
            if self.draft_pass:
                queries = [Query(*q) for q in self.proposer.draft_queries(self.view(), block)]
                return Plan("draft", base, queries, len(base))
            self.block = self._fit(self.proposer.propose(self.view(), block, None))
            self.draft_calls += 1
        return self._tree_plan(base) if isinstance(self.block, Tree) else self._verify_plan(base)

    def _tree_plan(self, base: list[Content]) -> Plan:
        """A multi-draft pass: the trunk's contents (branch 0), the shared query of the position
        after it (sees the trunk only), then per continuation j its drafts' contents and the
        queries of its later targets, bonus and lookahead, all of branch j."""
        n, tree, order = self.n_decoded, self.block, self.order
        b, t = len(tree), tree.n_trunk
        bonus, n_lookahead = self.proposer.oracle_extras(self.view(), b)
        extended = bonus and n + b < self.n_hidden
        n_lookahead = min(n_lookahead, self.n_hidden - (n + b + 1)) if extended else 0
        m = b - t  # drafts per continuation
        n_contents = m if extended else m - 1  # those a later query reads
        contents = base + [Content(order[n + i], tree.trunk.tokens[i], n + 1 + i) for i in range(t)]
        queries = [Query(order[n + t], n + t + 1)]
        layout = []
        for j, branch in enumerate(tree.branches, start=1):
            rows = list(range(len(contents), len(contents) + n_contents))
            contents += [Content(order[n + t + i], branch.tokens[i], n + t + 1 + i, j) for i in range(n_contents)]
            targets = list(range(len(queries), len(queries) + m - 1))
            queries += [Query(order[n + t + 1 + i], n + t + 2 + i, j) for i in range(m - 1)]
            bonus_row = -1
            if extended:
                bonus_row = len(queries)
                queries += [Query(order[n + b + i], n + b + 1, j) for i in range(1 + n_lookahead)]
            layout.append(BranchRows(rows, targets, bonus_row, n_lookahead))
        return Plan("tree", contents, queries, len(base), shared_target=0, branches=layout)

    def _verify_plan(self, base: list[Content]) -> Plan:
        """Contents: the drafts (all of them when a query follows the block, else all but the
        last); queries: one per draft that needs checking, then the bonus and lookahead queries."""
        n, block = self.n_decoded, self.block
        b = len(block)
        bonus, n_lookahead = self.proposer.oracle_extras(self.view(), b)
        extended = bonus and n + b < self.n_hidden
        n_contents = b if extended else b - 1
        contents = [Content(self.order[n + i], block.tokens[i], n + 1 + i) for i in range(n_contents)]
        queries, target_rows = [], []
        for i in range(b):
            exact = i == 0 and block.exact_first
            target_rows.append(-1 if exact else len(queries))
            if not exact:
                queries.append(Query(self.order[n + i], n + 1 + i))
        plan = Plan("verify", base + contents, queries, len(base), n_contents, target_rows)
        if extended:
            plan.bonus_row = len(queries)
            queries.append(Query(self.order[n + b], n + b + 1))
            plan.n_lookahead = min(n_lookahead, self.n_hidden - (n + b + 1))
            queries += [Query(self.order[n + b + 1 + j], n + b + 1) for j in range(plan.n_lookahead)]
        return plan

    def uniforms(self, plan: Plan) -> torch.Tensor:
        """This row's uniforms for a pass: one per query row, one per verified draft, one for
        the replacement/bonus draw. Drawn from the row's own generator, so a row's tokens do
        not depend on the batch it runs in."""
        if plan.uniforms is None:  # drawn once: constrained rows read them before the pass's decisions
            plan.uniforms = torch.rand(plan.n_uniforms, generator=self.generator, dtype=torch.float64)
        return plan.uniforms

    # --- the pass's outcome --------------------------------------------------------------------
    def advance(self, plan: Plan, out: Outcome) -> tuple[int, list[int]]:
        """Returns (how many of the pass's new content rows to commit, positions decoded)."""
        self.nfe += 1
        if plan.kind == "sequential":
            return plan.n_pending, self._decode([out.drawn[0]], [out.drawn_prob[0]])
        if plan.kind == "draft":
            self.draft_calls += 1
            drawn, n = Drawn(out.drawn, out.probs, out.hidden), len(plan.queries)
            if self.config.branches > 1 and n > 1:
                self.block = self.proposer.propose_tree(self.view(), n, drawn, self.config.branches)
            else:
                self.block = self._fit(self.proposer.propose(self.view(), n, drawn))
            self.pending = []
            if len(self.block) == 1:  # one position left: its draft is the exact conditional
                self.block = None
                return plan.n_pending, self._decode([out.drawn[0]], [out.drawn_prob[0]])
            return plan.n_pending, []
        if plan.kind == "tree":
            return self._after_tree(plan, out)
        return self._after_verify(plan, out)

    def _after_tree(self, plan: Plan, out: Outcome) -> tuple[list[int], list[int]]:
        """Decode the trunk, the kept drafts of the chosen continuation and the next token; the
        cache keeps the pending rows, the trunk's and the kept drafts' rows. One-pass rounds
        draft the next tree from the chosen continuation's rows (the first one's when none was
        kept)."""
        tree, self.block = self.block, None
        t, n_kept = tree.n_trunk, out.n_accepted
        w = max(out.branch, 0)
        branch, rows = tree.branches[w], plan.branches[w]
        kept_drafts = n_kept - t if out.branch >= 0 else 0
        tokens = (tree.trunk.tokens if t else []) + branch.tokens[:kept_drafts]
        kept = list(range(plan.n_pending + t)) + rows.contents[:kept_drafts]
        rejected = n_kept < len(tree)
        probs = out.draft_prob[:n_kept]
        if out.next_token >= 0:
            tokens, probs = tokens + [out.next_token], probs + [out.next_prob]
        self.block_size = next_k(self.config, self.block_size, not rejected)
        positions = self._decode(tokens, probs, self.order[self.n_decoded + n_kept] if rejected else None)
        if not self.done:  # one-pass rounds: this pass also proposed the next block
            hidden = out.hidden
            lookahead = slice(rows.bonus + (0 if rejected else 1), rows.bonus + 1 + rows.lookahead) \
                if rows.bonus >= 0 else slice(0, 0)
            extra = Drawn([], out.probs[lookahead], None if hidden is None else hidden[lookahead])
            after = rows.targets[kept_drafts:] if rejected else []  # the targets of the drafts after the rejected one
            checked = Drawn([], out.probs[after], None if hidden is None else hidden[after])
            self.block = self.proposer.carry_tree(self.view(), branch.tail(kept_drafts + 1) if rejected else None,
                                                  checked, extra, self.config.branches)
        return kept, positions

    def _after_verify(self, plan: Plan, out: Outcome) -> tuple[int, list[int]]:
        block, self.block = self.block, None
        j = out.n_accepted
        tokens, probs = block.tokens[:j], out.draft_prob[:j]
        rejected = j < len(block)
        if out.next_token >= 0:
            tokens, probs = tokens + [out.next_token], probs + [out.next_prob]
        commit = plan.n_pending + min(j, plan.n_draft_contents)
        self.block_size = next_k(self.config, self.block_size, not rejected)
        positions = self._decode(tokens, probs, self.order[self.n_decoded + j] if rejected else None)
        if not self.done:  # one-pass rounds: this pass also proposed the next block
            start = len(plan.queries) if plan.bonus_row < 0 else plan.bonus_row + (0 if rejected else 1)
            hidden = out.hidden
            extra = Drawn(out.drawn[start:], out.probs[start:], None if hidden is None else hidden[start:])
            # the verification rows of the drafts after the rejection: consecutive query rows (one
            # per draft; only a first draft can go without), so views, not indexed copies
            after = plan.target_rows[j + 1 :] if rejected else []
            rows = slice(after[0], after[-1] + 1) if after else slice(0, 0)
            checked = Drawn([], out.probs[rows], None if hidden is None else hidden[rows])
            self.block = self._fit(self.proposer.carry(self.view(), block.tail(j + 1) if rejected else None, checked,
                                                       extra))
        return commit, positions

    def _fit(self, block: Block | None) -> Block | None:
        """A constrained row's block with every draft inside its mask (RowConstraint.fit_block)."""
        if self.constraint is None or block is None:
            return block
        return self.constraint.fit_block(block, self.order, self.n_decoded, self.generator)

    def _decode(self, tokens: list[int], probs: list[float], resampled: int | None = None) -> list[int]:
        """Record tokens for the next positions of the order; the last one's content is pending."""
        positions = self.order[self.n_decoded : self.n_decoded + len(tokens)]
        for pos, tok, p in zip(positions, tokens, probs):
            self.tokens[pos] = tok
            self.logprobs[pos] = math.log(p) if p > 0 else -math.inf
            self.known[pos] = True
        self.n_decoded += len(tokens)
        if self.constraint is not None:
            self.constraint.observe(positions, tokens)
        self.pending = [Content(positions[-1], tokens[-1], self.n_decoded)]
        if self.proposer is not None:
            self.proposer.observe(self.view(), positions)
        self.rounds += 1
        self.accepted.append(len(tokens))
        if self.on_round is not None:
            self.on_round(RoundEvent(positions, list(tokens), self.rounds, self.nfe, resampled))
        return positions
