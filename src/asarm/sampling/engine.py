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
from .verification import TreeVerdict, Verdict, verify, verify_tree


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


def host_lists(tensors: list[torch.Tensor], one_transfer: bool | None = None) -> list[list]:
    """Each tensor's values as (nested) Python lists, integers for integer tensors. Off the CPU
    (``one_transfer``, by default: any tensor off the CPU) the tensors cross in one transfer,
    flattened into one float64 buffer (token ids are exact there); on the CPU each is read in
    place (a concatenation would only add copies)."""
    if one_transfer is None:
        one_transfer = any(t.device.type != "cpu" for t in tensors)
    if not one_transfer:
        return [t.tolist() for t in tensors]
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).cpu()
    out, start = [], 0
    for t in tensors:
        part = flat[start : start + t.numel()].view(t.shape)
        out.append(part.tolist() if t.is_floating_point() else part.long().tolist())
        start += t.numel()
    return out


@dataclasses.dataclass
class Decisions:
    """A pass's decisions for the whole batch, on the model's device until ``outcomes``. Only the
    query rows whose draw is used are drawn (verification rows are read, not drawn)."""

    queries: int  # Q, the query rows per batch row of the pass
    drawn_rows: list[int]  # flat indices b * Q + q of the drawn query rows, in order
    drawn: torch.Tensor  # [len(drawn_rows)] the token drawn from each of them
    drawn_prob: torch.Tensor  # [len(drawn_rows)] its target probability
    verdict: Verdict | None  # rows that verified drafts (None when no row did)
    forced: dict[tuple[int, int], tuple[int, float]] = dataclasses.field(default_factory=dict)
    trees: dict[int, TreeVerdict] = dataclasses.field(default_factory=dict)  # multi-draft rows' verdicts

    def force(self, draws: dict[tuple[int, int], tuple[int, float]]) -> None:
        """Use these draws ({(row, query row): (token, probability)}) for those query rows:
        constrained rows draw them one after another, each inside the mask the draws before it
        set (asarm.sampling.constraints.constrain_pass), with the same uniforms."""
        self.forced.update(draws)

    def outcomes(self, plans: list[Plan], probs: torch.Tensor) -> list[Outcome]:
        """Per-row outcomes; the one device-to-host transfer of the pass."""
        Q = self.queries
        parts = [self.drawn, self.drawn_prob]
        if self.verdict is not None:
            v = self.verdict
            parts += [v.n_accepted, v.next_token, v.next_prob, v.draft_target_prob]
        host = host_lists(parts)
        drawn, drawn_prob = [-1] * (len(plans) * Q), [0.0] * (len(plans) * Q)
        for i, token, p in zip(self.drawn_rows, host[0], host[1]):
            drawn[i], drawn_prob[i] = token, p
        for (b, q), (token, p) in self.forced.items():
            drawn[b * Q + q], drawn_prob[b * Q + q] = token, p
        outcomes = []
        for b, plan in enumerate(plans):
            start, nq = b * Q, len(plan.queries)
            out = Outcome(drawn[start : start + nq], drawn_prob[start : start + nq], probs[b, :nq])
            if plan.kind == "verify":
                out.n_accepted, out.next_token, out.next_prob = host[2][b], host[3][b], host[4][b]
                out.draft_prob = host[5][b][: len(plan.target_rows)]
            elif plan.kind == "tree":
                t = self.trees[b]
                out.n_accepted, out.next_token, out.next_prob = t.n_accepted, t.next_token, t.next_prob
                out.draft_prob, out.branch = t.draft_target_prob, t.branch
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

            if config.branches > 1:
                raise InputError("constrained holes decode one chain of drafts: branches > 1 (multi-draft) is not "
                                 "supported with constraints")

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
        if self.cache is not None:  # a count of leading new rows, or (multi-draft) the rows themselves
            chosen = {b: rows for b, rows in enumerate(kept) if isinstance(rows, list)}
            self.cache.commit(torch.tensor([0 if isinstance(n, list) else n for n in kept]), chosen)
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
        N = max(1, max(len(p.contents) for p in plans))
        Q = max(len(p.queries) for p in plans)
        # the padded [B, rows] layout built from Python lists in one tensor each (no per-row copies)
        content = torch.tensor([p.contents + [(0, 0, NO_KEY, 0)] * (N - len(p.contents)) for p in plans],
                               dtype=torch.long).view(len(plans), N, 4)
        query = torch.tensor([p.queries + [(0, 0, 0)] * (Q - len(p.queries)) for p in plans],
                             dtype=torch.long).view(len(plans), Q, 3)
        content, query = content.to(self.device), query.to(self.device)
        branches = (content[..., 3], query[..., 2]) if any(p.kind == "tree" for p in plans) else None
        if self.timer is not None:
            self.timer.sync()
        start = time.perf_counter()
        logits = self.model.forward_rows(content[..., 1], content[..., 0], content[..., 2], query[..., 0],
                                         query[..., 1], cache=self.cache, rel_table=self.rel_table,
                                         return_hidden=want_hidden, branches=branches)
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
        """Draws and verification for the whole batch, on the model's device. The per-row inputs
        (uniforms, drawn rows) are gathered in Python lists and cross as one tensor each."""
        B, Q, V = probs.shape
        K = max((len(p.target_rows) for p in plans), default=0)
        u_draw, u_accept, u_next, drawn_rows = [], [], [], []
        for b, (row, plan) in enumerate(zip(rows, plans)):
            u = row.uniforms(plan).tolist()
            nq, nk = len(plan.queries), len(plan.target_rows)
            drawn_rows += range(b * Q + plan.first_drawn, b * Q + nq)
            u_draw += u[plan.first_drawn : nq]
            u_accept.append(u[nq : nq + nk] + [0.0] * (K - nk))
            u_next.append(u[-1])
        if B == 1:  # one row's drawn query rows are a range: a view
            chosen = probs[0, plans[0].first_drawn :]
        elif len(drawn_rows) < B * Q:
            chosen = probs.view(B * Q, V).index_select(0, torch.tensor(drawn_rows, dtype=torch.long, device=self.device))
        else:
            chosen = probs.view(B * Q, V)
        if drawn_rows:
            tokens = draw(chosen, torch.tensor(u_draw, dtype=torch.float64, device=self.device))
            drawn_prob = chosen.gather(-1, tokens[:, None]).squeeze(-1)
        else:  # verification rows only (plain ASSD without a bonus query): nothing to draw
            tokens, drawn_prob = chosen[:, 0].long(), chosen[:, 0]
        verdict = None
        if K:
            verdict = self._verify(rows, plans, probs, u_accept, u_next, K)
        trees = {b: self._verify_tree(row, plan, probs[b]) for b, (row, plan) in enumerate(zip(rows, plans))
                 if plan.kind == "tree"}
        return Decisions(Q, drawn_rows, tokens, drawn_prob, verdict, trees=trees)

    @staticmethod
    def _verify_tree(row: Row, plan: Plan, probs: torch.Tensor) -> TreeVerdict:
        """One multi-draft row's verdict from its query rows' target distributions ``probs``."""
        tree = row.block
        trunk = [] if tree.trunk is None else [float(p[tok]) for tok, p in zip(tree.trunk.tokens, tree.trunk.probs)]
        chains = [(branch.tokens[1:], branch.probs[1:], probs[rows.targets], probs[rows.bonus] if rows.bonus >= 0 else None)
                  for branch, rows in zip(tree.branches, plan.branches)]
        return verify_tree(trunk, [branch.tokens[0] for branch in tree.branches], tree.branches[0].probs[0],
                           probs[plan.shared_target], chains, row.uniforms(plan).tolist())

    def _verify(self, rows, plans, probs, u_accept, u_next, K) -> Verdict:
        """Pack the verifying rows' drafts and proposals for ``verify``; targets stay in place.
        The integer inputs cross as one [B, 3K + 3] tensor; one verifying row's proposals are
        used as they are (no [B, K, V] copy)."""
        B, Q, V = probs.shape
        dev = self.device
        packed, blocks = [], []
        for row, plan in zip(rows, plans):
            if plan.kind != "verify":
                packed.append([0] * (3 * K + 3))
                continue
            n, pad = len(plan.target_rows), [0] * (K - len(plan.target_rows))
            packed.append(row.block.tokens + pad + [max(t, 0) for t in plan.target_rows] + pad
                          + [int(t < 0) for t in plan.target_rows] + pad
                          + [n, max(plan.bonus_row, 0), int(plan.bonus_row >= 0)])
            blocks.append(row.block.probs)
        ints = torch.tensor(packed, dtype=torch.long, device=dev)
        if len(blocks) == B == 1:
            draft_probs = blocks[0][None]
        else:  # proposals keep the precision they were drawn with (n-gram proposals are float64)
            dtype = max((b.dtype for b in blocks), key=lambda t: torch.finfo(t).bits)
            draft_probs = torch.zeros(B, K, V, dtype=dtype, device=dev)
            for b, (row, plan) in enumerate(zip(rows, plans)):
                if plan.kind == "verify":
                    draft_probs[b, : len(plan.target_rows)] = row.block.probs
        block = [row.config.verification == "block" for row in rows]
        return verify(ints[:, :K], draft_probs, probs, ints[:, 3 * K], torch.tensor(u_accept, dtype=torch.float64,
                      device=dev), torch.tensor(u_next, dtype=torch.float64, device=dev), target_rows=ints[:, K : 2 * K],
                      exact=ints[:, 2 * K : 3 * K].bool(), bonus_rows=ints[:, 3 * K + 1], has_bonus=ints[:, 3 * K + 2].bool(),
                      block=torch.tensor(block, device=dev) if any(block) else None)

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
