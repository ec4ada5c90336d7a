"""The engine: shared passes over every active row, rows joining and leaving between passes.

One ``step`` is one network pass (docs/design.md, "One pass, in code"):
  1. plan: every row says what its pass computes (content rows to add, query rows to ask);
  2. forward: the plans are padded into one ``model.forward_rows`` call, with the exact cache;
  3. decide: on the model's device, target distributions, one draw per query row and the
     batched ``verify`` for rows checking drafts, gathered in one ``Decisions`` that crosses
     to the host once (token ids, accept counts, per-token probabilities);
  4. advance: each row takes its ``Outcome``, and the cache commits per row the accepted
     prefix of its new content rows.
Rows that finish leave; new rows may be ``add``-ed before any step (continuous batching).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from ..cache import ContentCache
from ..errors import Cancelled, InputError
from ..model import NO_KEY
from ..ranks import decoding_order
from .checks import check_row, resolve_seed, row_seed
from .config import DecodeConfig
from .drafts import HeadDrafter
from .row import Outcome, Plan, RoundEvent, Row, SampleResult
from .target import draw
from .verification import Verdict, verify


class RowHandle:
    """What ``Engine.add`` returns: the row's progress and, once done, its result."""

    def __init__(self, row: Row, input_ids: torch.Tensor, return_logprobs: bool):
        self.row, self.input_ids, self.return_logprobs = row, input_ids, return_logprobs
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.row.done

    def result(self) -> SampleResult:
        """The decoded row; ``Cancelled`` for a row dropped by ``Engine.cancel`` (its holes
        would still hold the mask id)."""
        if self.cancelled:
            raise Cancelled("this row was cancelled (Engine.cancel) before it finished: it has no result")
        end = self.finished if self.finished is not None else time.perf_counter()
        return SampleResult.of_rows([self.row], self.input_ids[None], self.return_logprobs, end - self.started,
                                    squeeze=True)


@dataclasses.dataclass
class Decisions:
    """A pass's decisions for the whole batch, on the model's device until ``outcomes``."""

    drawn: torch.Tensor  # [B, Q] the token drawn from each query row's target (-1: not drawn)
    drawn_prob: torch.Tensor  # [B, Q] its target probability
    verdict: Verdict | None  # rows that verified drafts (None when no row did)

    def force(self, draws: dict[tuple[int, int], tuple[int, float]]) -> None:
        """Use these draws ({(row, query row): (token, probability)}) for those query rows:
        constrained rows draw them one after another, each inside the mask the draws before it
        set (asarm.sampling.constraints.constrain_pass), with the same uniforms."""
        index = torch.tensor(list(draws), dtype=torch.long, device=self.drawn.device)
        values = torch.tensor(list(draws.values()), dtype=torch.float64, device=self.drawn.device)
        self.drawn[index[:, 0], index[:, 1]] = values[:, 0]
        self.drawn_prob[index[:, 0], index[:, 1]] = values[:, 1]

    def outcomes(self, plans: list[Plan], probs: torch.Tensor) -> list[Outcome]:
        """Per-row outcomes; the one device-to-host transfer of the pass."""
        B, Q = self.drawn.shape
        parts = [self.drawn.double(), self.drawn_prob]
        if self.verdict is not None:
            v = self.verdict
            parts += [v.n_accepted.double()[:, None], v.next_token.double()[:, None], v.next_prob[:, None],
                      v.draft_target_prob]
        host = torch.cat(parts, dim=1).cpu().tolist()
        outcomes = []
        for b, plan in enumerate(plans):
            vals, nq = host[b], len(plan.queries)
            out = Outcome([int(t) for t in vals[:nq]], vals[Q : Q + nq], probs[b, :nq])
            if plan.kind == "verify":
                rest = vals[2 * Q :]
                out.n_accepted, out.next_token, out.next_prob = int(rest[0]), int(rest[1]), rest[2]
                out.draft_prob = rest[3 : 3 + len(plan.target_rows)]
            outcomes.append(out)
        return outcomes


class PassTimer:
    """Host-side timing of the passes (``asarm bench``'s columns). On CUDA it synchronizes
    around every forward, which costs throughput: only a benchmark should install it."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Engine:
    """Owns the model's passes and the exact cache. Not thread-safe: one thread drives it.

    ``forward_seconds`` / ``step_seconds`` add up the host time of the passes; they are exact
    on CUDA only with a ``PassTimer`` (``timer=``), which synchronizes the device."""

    def __init__(self, model, cache: bool = True, timer: PassTimer | None = None):
        self.model, self.use_cache = model, bool(cache)
        self.device = model.device
        self.timer = timer
        self.handles: list[RowHandle] = []
        self.cache: ContentCache | None = None
        self.rel_table, self.table_span = None, 0
        self.joining, self.capacity = 0, 0  # rows added since the last pass; cache slots per row
        self.forward_seconds = self.step_seconds = 0.0
        head = getattr(model, "draft_head", None)  # draft="head" (asarm.draft_head)
        self.drafter = HeadDrafter(head, model) if head is not None else None

    @property
    def active(self) -> int:
        return len(self.handles)

    @torch.no_grad()
    def add(self, input_ids: torch.Tensor, masked: torch.Tensor, config: DecodeConfig | None = None, *,
            seed: int | None = None, row_index: int = 0, order="left-to-right",
            on_round: Callable[[RoundEvent], None] | None = None, return_logprobs: bool = False,
            constraints=None) -> RowHandle:
        """Queue one row ([L] ids and hidden mask) to be decoded from the next step on.
        ``constraints``: ``HoleConstraint``s of the row's constrained holes (each decoded left to
        right, every draw inside its mask; asarm.sampling.constraints)."""
        config = config or DecodeConfig()
        if config.cache != self.use_cache:
            raise InputError(f"this engine runs with cache={self.use_cache}; the row asks for cache={config.cache}")
        check_row(self.model, input_ids, masked)
        gen = torch.Generator().manual_seed(row_seed(resolve_seed(seed), row_index))
        hidden = masked.detach().cpu().bool()
        tokens = input_ids.detach().cpu().long().clone()
        row_order = decoding_order(hidden, order, gen)
        tokens[hidden] = self.model.config.mask_token_id
        cfg = self.model.config
        constraint = None
        if constraints:
            from .constraints import RowConstraint

            try:
                constraint = RowConstraint(constraints, tokens.shape[0], hidden)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        row = Row(tokens, row_order, config, config.target(cfg.mask_token_id), gen, self.device, cfg.vocab_size, on_round,
                  constraint, self.drafter)
        handle = RowHandle(row, input_ids, return_logprobs)
        if row.done:
            handle.finished = time.perf_counter()
            return handle
        self._make_room(tokens.shape[0], config.max_k)
        self.handles.append(handle)
        return handle

    @torch.no_grad()
    def cancel(self, handle: RowHandle) -> None:
        """Drop an active row now; its cache slots are freed."""
        if handle in self.handles:
            handle.cancelled = True
            self._retain([h for h in self.handles if h is not handle])

    def run(self) -> None:
        while self.handles:
            self.step()

    @torch.no_grad()  # sampling never needs gradients; a graph would chain every pass through the cache
    def step(self) -> list[RowHandle]:
        """One shared pass over every active row; returns the rows that finished in it."""
        if not self.handles:
            return []
        start = time.perf_counter()
        self._grow()
        rows = [h.row for h in self.handles]
        plans = [row.plan(self.use_cache) for row in rows]
        want_hidden = any(row.proposer is not None and row.proposer.needs_hidden for row in rows)
        logits, hidden = self._forward(plans, want_hidden)
        probs = self._target_probs(rows, logits)
        forced = self._constrain(rows, plans, logits, probs)
        decisions = self._decide(rows, plans, probs)
        if forced:
            decisions.force(forced)
        outcomes = decisions.outcomes(plans, probs)
        if hidden is not None:
            for b, (plan, out) in enumerate(zip(plans, outcomes)):
                out.hidden = hidden[b, : len(plan.queries)]
        kept = [row.advance(plan, out)[0] for row, plan, out in zip(rows, plans, outcomes)]
        if self.cache is not None:
            self.cache.commit(torch.tensor(kept))
        finished = [h for h in self.handles if h.row.done]
        if finished:
            now = time.perf_counter()
            for h in finished:
                h.finished = now
            self._retain([h for h in self.handles if not h.row.done])
        if self.timer is not None:
            self.timer.sync()
        self.step_seconds += time.perf_counter() - start
        return finished

    # --- the pass -------------------------------------------------------------------------------
    def _forward(self, plans: list[Plan], want_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(query logits [B, Q, V], their final states [B, Q, d] when ``want_hidden``, else None)."""
        B = len(plans)
        N = max(1, max(len(p.contents) for p in plans))
        Q = max(len(p.queries) for p in plans)
        content = torch.zeros(B, N, 3, dtype=torch.long)
        content[:, :, 2] = NO_KEY
        query = torch.zeros(B, Q, 2, dtype=torch.long)
        for b, plan in enumerate(plans):
            if plan.contents:
                content[b, : len(plan.contents)] = torch.tensor(plan.contents, dtype=torch.long)
            query[b, : len(plan.queries)] = torch.tensor(plan.queries, dtype=torch.long)
        content, query = content.to(self.device), query.to(self.device)
        if self.timer is not None:
            self.timer.sync()
        start = time.perf_counter()
        logits = self.model.forward_rows(content[..., 1], content[..., 0], content[..., 2], query[..., 0],
                                         query[..., 1], cache=self.cache, rel_table=self.rel_table,
                                         return_hidden=want_hidden)
        logits, hidden = logits if want_hidden else (logits, None)
        if self.timer is not None:
            self.timer.sync()
        self.forward_seconds += time.perf_counter() - start
        return logits, hidden

    def _target_probs(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """[B, Q, V] target probabilities; rows with different options are done in groups."""
        targets = [row.target for row in rows]
        if all(t == targets[0] for t in targets):
            return targets[0].probs(logits)
        probs = torch.empty(logits.shape, dtype=torch.float64, device=logits.device)
        for t in dict.fromkeys(targets):
            idx = torch.tensor([b for b, u in enumerate(targets) if u == t], device=logits.device)
            probs[idx] = t.probs(logits[idx]).double()
        return probs

    def _constrain(self, rows: list[Row], plans: list[Plan], logits: torch.Tensor, probs: torch.Tensor) -> dict:
        """Constrained rows' masks into ``probs`` (in place) and the draws that chain through
        them (asarm.sampling.constraints.constrain_pass); nothing for unconstrained batches."""
        if all(row.constraint is None for row in rows):
            return {}
        from .constraints import constrain_pass

        return constrain_pass(rows, plans, logits, probs)

    def _decide(self, rows: list[Row], plans: list[Plan], probs: torch.Tensor) -> Decisions:
        """Draws and verification for the whole batch, on the model's device."""
        B, Q, V = probs.shape
        K = max((len(p.target_rows) for p in plans), default=0)
        u_draw = torch.zeros(B, Q, dtype=torch.float64)
        u_accept = torch.zeros(B, max(K, 1), dtype=torch.float64)
        u_next = torch.zeros(B, dtype=torch.float64)
        need_draw = []  # flat indices of the query rows whose draw is used
        for b, (row, plan) in enumerate(zip(rows, plans)):
            u = row.uniforms(plan)
            nq = len(plan.queries)
            u_draw[b, :nq], u_accept[b, : len(plan.target_rows)], u_next[b] = u[:nq], u[nq:-1], u[-1]
            need_draw += range(b * Q + plan.first_drawn, b * Q + nq)
        flat = torch.tensor(need_draw, dtype=torch.long, device=self.device)
        all_rows = len(need_draw) == B * Q
        chosen = probs.view(B * Q, V) if all_rows else probs.view(B * Q, V).index_select(0, flat)
        tokens = draw(chosen, u_draw.view(-1).to(self.device).index_select(0, flat))
        drawn = torch.full((B * Q,), -1, dtype=torch.float64, device=self.device)
        drawn_prob = torch.zeros(B * Q, dtype=torch.float64, device=self.device)
        drawn[flat] = tokens.double()
        drawn_prob[flat] = chosen.gather(-1, tokens[:, None]).squeeze(-1).double()
        verdict = None
        if any(p.kind == "verify" for p in plans):
            verdict = self._verify(rows, plans, probs, u_accept, u_next, K)
        return Decisions(drawn.view(B, Q), drawn_prob.view(B, Q), verdict)

    def _verify(self, rows, plans, probs, u_accept, u_next, K) -> Verdict:
        """Pack the verifying rows' drafts and proposals for ``verify``; targets stay in place."""
        B, Q, V = probs.shape
        dev = self.device
        tokens = torch.zeros(B, K, dtype=torch.long)
        n_drafts = torch.zeros(B, dtype=torch.long)
        target_rows = torch.zeros(B, K, dtype=torch.long)
        exact = torch.zeros(B, K, dtype=torch.bool)
        bonus_row = torch.zeros(B, dtype=torch.long)
        has_bonus = torch.zeros(B, dtype=torch.bool)
        # proposals keep the precision they were drawn with (n-gram proposals are float64)
        dtype = max((row.block.probs.dtype for row, plan in zip(rows, plans) if plan.kind == "verify"),
                    key=lambda t: torch.finfo(t).bits)
        draft_probs = torch.zeros(B, K, V, dtype=dtype, device=dev)
        for b, (row, plan) in enumerate(zip(rows, plans)):
            if plan.kind != "verify":
                continue
            n = len(plan.target_rows)
            tokens[b, :n] = torch.tensor(row.block.tokens)
            n_drafts[b] = n
            target_rows[b, :n] = torch.tensor(plan.target_rows).clamp(min=0)
            exact[b, :n] = torch.tensor(plan.target_rows) < 0
            bonus_row[b], has_bonus[b] = max(plan.bonus_row, 0), plan.bonus_row >= 0
            draft_probs[b, :n] = row.block.probs
        bonus = probs.gather(1, bonus_row.to(dev)[:, None, None].expand(B, 1, V)).squeeze(1)
        block = [row.config.verification == "block" for row in rows]
        return verify(tokens.to(dev), draft_probs, probs, n_drafts.to(dev), u_accept.to(dev), u_next.to(dev),
                      target_rows=target_rows.to(dev), exact=exact.to(dev), bonus_probs=bonus,
                      has_bonus=has_bonus.to(dev), block=torch.tensor(block, device=dev) if any(block) else None)

    # --- membership and memory -------------------------------------------------------------------
    def _make_room(self, length: int, max_k: int) -> None:
        """Note one more row of ``length``: the relative-position table grows now, the cache at
        the next ``_grow`` (so rows added together cost one allocation, not one each)."""
        if length > self.table_span:
            self.table_span = max(length, 2 * self.table_span)
            self.rel_table = self.model.relative_table(self.table_span)
        if self.use_cache:
            self.joining += 1
            self.capacity = max(self.capacity, length + max_k + 2)

    def _grow(self) -> None:
        """Give the rows added since the last pass their cache rows."""
        if self.joining:
            if self.cache is None:
                self.cache = ContentCache(self.model, 0, self.capacity)
            self.cache.add_rows(self.joining, self.capacity)
            self.joining = 0

    def _retain(self, handles: list[RowHandle]) -> None:
        """Keep only ``handles`` (in order) as the active rows; the cache drops the others' slots."""
        self._grow()
        if self.cache is not None:
            index = [i for i, h in enumerate(self.handles) if h in handles]
            self.cache.select_rows(torch.tensor(index, dtype=torch.long, device=self.device))
        self.handles = handles
