"""Exact chain samplers for AS-ARMs: sequential and Any-Subset Speculative Decoding (ASSD).

Target (DESIGN §2): for hidden positions in order sigma, prod_i target(logits_i), where
``target`` drops the mask token's logit, divides by the temperature and applies the optional
top-k / top-p truncation (or argmax for greedy). Every sampler here draws exactly that joint.

How a run is organised:
- Each batch row is a ``_Row``: its tokens, its decoding order (ranks fixed for the whole run),
  its own random generator, and a small state machine that plans its next pass (which new
  content rows, which query rows) and consumes that pass's distributions.
- ``_Engine`` runs passes for all unfinished rows together: it pads the rows' plans into one
  ``model.forward_rows`` call and, with the exact cache, commits per row the accepted prefix of
  the pass's new content rows. Finished rows leave the batch.

ASSD round with the self draft (k positions t1..tk left to right in the order):
  draft pass: queries at t1..tk, all seeing only visible + decoded tokens -> p_i, d_i ~ p_i;
  oracle pass: contents d_1..d_{k-1} at ranks n+1.., queries t2..tk -> q_i = p(x_ti | D, d_<i);
  d_1 is exact (q_1 == p_1); accept d_i w.p. min(1, q_i(d_i)/p_i(d_i)); at the first rejection
  draw from normalize(max(0, q_i - p_i)) and end the round.
With the n-gram draft, proposals come from counts (no pass), the oracle pass also verifies d_1,
and the pending token of the previous round rides along in the oracle pass.

``Speculation`` adds exact refinements: a bonus query after the last draft (a free exact token
when every draft is accepted), one-pass rounds (the oracle pass also proposes the next block,
so drafts queue up without draft passes) and adaptive k. Whatever a proposal is, accepting with
min(1, q/p) and resampling from the residual yields q, so each variant draws the same joint.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable

import torch

from .cache import ContentCache
from .drafts import NgramDrafter
from .errors import InputError
from .model import NO_KEY
from .ranks import decoding_order, ranks_from_order

METHODS = ("sequential", "assd")
DRAFTS = ("self", "ngram")


@dataclasses.dataclass(frozen=True)
class TargetDistribution:
    """Turns logits into the target distribution: identical for drafts and oracle, which is
    what keeps ASSD exact under temperature, truncation and greedy decoding."""

    mask_token_id: int
    temperature: float = 1.0
    greedy: bool = False
    top_k: int | None = None
    top_p: float | None = None

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Final (log-)weights, float32, -inf where a token is excluded."""
        x = logits.to(torch.float32, copy=True)
        x[..., self.mask_token_id] = -math.inf  # dropped before the softmax, never after
        if self.greedy:
            best = x.argmax(-1, keepdim=True)
            return torch.full_like(x, -math.inf).scatter_(-1, best, 0.0)
        x = x / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_x, idx = torch.sort(x, dim=-1, descending=True)
            cum = torch.softmax(sorted_x, -1).cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop_sorted = (cum - torch.softmax(sorted_x, -1)) >= self.top_p
            x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted), -math.inf)
        return x

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(logits), dim=-1)


@dataclasses.dataclass
class SampleResult:
    """What ``sample`` returns. Per-row fields are tensors/lists of length B ([L] input: B = 1,
    and the fields are squeezed to scalars / one list)."""

    input_ids: torch.Tensor
    nfe: torch.Tensor  # network passes per row (draft passes included)
    draft_calls: torch.Tensor  # draft proposals per row: self-draft passes, or n-gram calls (not passes)
    rounds: torch.Tensor
    accepted: list  # tokens produced per round, per row
    token_logprobs: torch.Tensor | None  # with return_logprobs: target-chain log-prob per sampled token, 0 elsewhere
    elapsed: float

    @property
    def tokens_per_round(self) -> float:
        rows = self.accepted if self.accepted and isinstance(self.accepted[0], list) else [self.accepted]
        counts = [c for row in rows for c in row]
        return sum(counts) / len(counts) if counts else 0.0


@dataclasses.dataclass
class _Draft:
    token: int
    probs: torch.Tensor  # the proposal it was drawn from
    exact: bool  # drawn from the exact conditional given everything before it: accepted as is


@dataclasses.dataclass(frozen=True)
class Speculation:
    """ASSD options beyond the paper's round (each keeps the joint exact)."""

    k: int = 5
    bonus: bool = False  # all drafts accepted -> the oracle pass also yields the next token
    one_pass: bool = False  # the oracle pass also drafts the next block: one pass per round
    adaptive_k: bool = False  # grow k after fully accepted rounds, shrink it after rejections

    @property
    def max_k(self) -> int:
        return max(3 * self.k, 8) if self.adaptive_k else self.k


class _Row:
    """One sequence's sampling state (CPU tensors; the model runs wherever it lives).

    The row always knows ``n`` (tokens decoded, ranks 1..n), the content rows not yet in the
    cache (``pending``) and a queue of drafts for the next positions of its order.
    """

    def __init__(self, index, tokens, valid_len, order, generator, target, method, draft, spec, vocab_size):
        self.index = index
        self.tokens = tokens
        self.order = order.tolist()
        self.m = len(self.order)
        self.n = 0
        self.generator = generator
        self.target = target
        self.method = method
        self.draft = draft
        self.spec = spec
        self.k = spec.k
        ranks = ranks_from_order(tokens.shape[0], order, valid_len)
        self.known = ranks == 0
        self.visible = torch.nonzero(self.known).flatten().tolist()
        # content rows computed but not yet committed to the cache; at first, every visible token
        self.pending = [(p, int(tokens[p]), 0) for p in self.visible]
        self.queue: list[_Draft] = []
        self.last_plan: dict = {}
        self.nfe = self.draft_calls = self.rounds = 0
        self.accepted: list[int] = []
        self.logprobs = torch.zeros(tokens.shape[0], dtype=torch.float64)
        self.ngram = None
        if method == "assd" and draft == "ngram":
            self.ngram = NgramDrafter(vocab_size, target.mask_token_id)
            self.ngram.observe(tokens, self.known)

    @property
    def done(self) -> bool:
        return self.n >= self.m

    def known_contents(self):
        """Every known token with its rank: the content rows of a full-recompute pass."""
        visible = [(p, int(self.tokens[p]), 0) for p in self.visible]
        decoded = [(p, int(self.tokens[p]), i + 1) for i, p in enumerate(self.order[: self.n])]
        return visible + decoded

    # --- planning -------------------------------------------------------------------------------
    def plan(self, cached: bool):
        """(content rows, query rows) of this row's next pass. Content rows that may be
        committed come first: the pending ones, then the drafts in order."""
        n = self.n
        base = self.pending if cached else self.known_contents()
        if self.method == "sequential":
            self.last_plan = dict(kind="sequential")
            return base, [(self.order[n], n + 1)]
        if not self.queue and self.draft == "ngram":
            self._ngram_drafts(min(self.k, self.m - n))
        if not self.queue:  # self-draft pass: queries that see the decoded tokens, not each other
            block = min(self.k, self.m - n)
            self.last_plan = dict(kind="draft")
            return base, [(self.order[n + i], n + 1) for i in range(block)]
        # oracle pass over the queued drafts
        b = len(self.queue)
        has_next = n + b < self.m
        extended = has_next and (self.spec.bonus or self.spec.one_pass)
        n_contents = b if extended else b - 1
        contents = [(self.order[n + i], self.queue[i].token, n + 1 + i) for i in range(n_contents)]
        queries = [(self.order[n + i], n + 1 + i) for i in range(b) if not self.queue[i].exact]
        n_lookahead = 0
        if extended:  # the next position, seeing every draft: the bonus token's exact conditional
            queries.append((self.order[n + b], n + b + 1))
            if self.spec.one_pass:  # and proposals for the positions after it
                n_lookahead = min(self.k - 1, self.m - (n + b + 1))
                queries += [(self.order[n + b + 1 + j], n + b + 1) for j in range(n_lookahead)]
        self.last_plan = dict(kind="oracle", n_contents=n_contents, extended=extended, n_lookahead=n_lookahead)
        return base + contents, queries

    def _ngram_drafts(self, block: int) -> None:
        self.draft_calls += 1
        drafted: dict[int, int] = {}
        for i in range(block):
            pos = self.order[self.n + i]
            prev = None
            if pos > 0 and self.known[pos - 1]:
                prev = int(self.tokens[pos - 1])
            elif pos - 1 in drafted:
                prev = drafted[pos - 1]
            p = self.ngram.distribution(prev, 1.0 if self.target.greedy else self.target.temperature)
            if self.target.greedy:
                p = torch.zeros_like(p).scatter_(0, p.argmax().view(1), 1.0)
            drafted[pos] = _draw(p, self.generator)
            self.queue.append(_Draft(drafted[pos], p, exact=False))

    # --- consuming a pass -------------------------------------------------------------------------
    def consume(self, probs: torch.Tensor) -> tuple[int, list[int]]:
        """Take this row's query distributions [Q, V] (float64, CPU); returns (how many of the
        pass's new content rows to commit, positions decoded this pass)."""
        self.nfe += 1
        n_pending = len(self.pending)
        kind = self.last_plan["kind"]
        if kind == "sequential":
            return n_pending, self._decode([_draw(probs[0], self.generator)], [probs[0]])
        if kind == "draft":
            self.draft_calls += 1
            self.queue = [_Draft(_draw(p, self.generator), p, exact=(i == 0)) for i, p in enumerate(probs)]
            if len(self.queue) == 1:  # one position left: its draft is the exact conditional
                token = self.queue.pop().token
                return n_pending, self._decode([token], [probs[0]])
            self.pending = []
            return n_pending, []
        return self._verify(probs, n_pending)

    def _verify(self, probs: torch.Tensor, n_pending: int):
        plan = self.last_plan
        queue, self.queue = self.queue, []
        rows = iter(probs)
        tokens, token_probs, rejected_at = [], [], None
        for i, d in enumerate(queue):
            if d.exact:
                tokens.append(d.token)
                token_probs.append(d.probs)
                continue
            q = next(rows)
            token_probs.append(q)
            if torch.rand((), generator=self.generator, dtype=torch.float64) * d.probs[d.token] <= q[d.token]:
                tokens.append(d.token)
                continue
            tokens.append(_draw(residual(q, d.probs), self.generator))
            rejected_at = i
            break
        n_verify = sum(1 for d in queue if not d.exact)
        later = probs[n_verify:]  # bonus query, then lookahead queries
        n_accepted = len(tokens) if rejected_at is None else rejected_at
        if rejected_at is None and plan["extended"]:
            bonus = later[0]  # exact: every draft it sees was accepted
            tokens.append(_draw(bonus, self.generator))
            token_probs.append(bonus)
        commit = n_pending + min(n_accepted, plan["n_contents"])
        self._adapt(rejected_at is None)
        positions = self._decode(tokens, token_probs)
        if self.spec.one_pass and not self.done:
            self._queue_next(queue, rejected_at, later, plan)
        return commit, positions

    def _queue_next(self, queue, rejected_at, later, plan) -> None:
        """One-pass rounds: the next block's drafts come from this pass. After a full accept they
        are the lookahead proposals; after a rejection, the untested drafts and the proposals
        made for later positions are still valid proposals (any proposal keeps ASSD exact)."""
        proposals = []
        if rejected_at is not None:
            proposals += [(d.token, d.probs) for d in queue[rejected_at + 1 :]]
            if plan["extended"]:
                proposals.append((None, later[0]))
        proposals += [(None, p) for p in later[1 : 1 + plan["n_lookahead"]]]
        block = min(self.k, self.m - self.n)
        for token, p in proposals[:block]:
            self.queue.append(_Draft(_draw(p, self.generator) if token is None else token, p, exact=False))

    def _adapt(self, all_accepted: bool) -> None:
        if self.spec.adaptive_k:
            self.k = min(self.k + 2, self.spec.max_k) if all_accepted else max(self.k - 1, 2)

    def _decode(self, tokens: list[int], probs: list[torch.Tensor]) -> list[int]:
        """Record tokens for the next positions of the order; the last one's content is pending."""
        positions = self.order[self.n : self.n + len(tokens)]
        for pos, tok, p in zip(positions, tokens, probs):
            self.tokens[pos] = tok
            self.logprobs[pos] = math.log(float(p[tok])) if p[tok] > 0 else -math.inf
        self.n += len(tokens)
        self.pending = [(positions[-1], tokens[-1], self.n)]
        if self.ngram is not None:
            for pos in positions:
                self.known[pos] = True
            self.ngram.observe(self.tokens, self.known, positions)
        self.rounds += 1
        self.accepted.append(len(tokens))
        return positions


def residual(target: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
    """Where a rejected draft's replacement is drawn from: normalize(max(0, target - proposal)),
    which makes speculative sampling exact (``_draw`` normalises). When the proposal equals
    the target there is no residual mass, but then no draft is ever rejected."""
    rest = (target - proposal).clamp(min=0.0)
    return rest if rest.sum() > 0 else target


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from an (unnormalised) distribution by inverse CDF: ~20x faster than
    torch.multinomial on a 32k vocabulary, and never returns a zero-probability token."""
    cdf = probs.cumsum(0)
    u = torch.rand((), generator=generator, dtype=cdf.dtype) * cdf[-1]
    index = int(torch.searchsorted(cdf, u.view(1), right=True))
    if index >= len(probs):  # u rounded up to the total: take the last token with mass
        index = int(torch.nonzero(probs).max())
    return index


def _row_seed(seed: int, row: int) -> int:
    # a distinct, reproducible stream per row, independent of the batch it runs in
    return (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def check_inputs(model, input_ids, masked, attention_mask=None, *, score_hidden=False) -> None:
    """Shapes, dtypes, length limit and vocabulary range. Hidden positions' ids are ignored by
    the samplers (they get filled) but are the scored tokens for ``score_hidden``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InputError("input_ids must be an integer tensor of token ids")
    if input_ids.dim() not in (1, 2):
        raise InputError(f"input_ids must have shape [L] or [B, L], got {tuple(input_ids.shape)}")
    if not isinstance(masked, torch.Tensor) or masked.dtype != torch.bool:
        raise InputError("masked must be a bool tensor (True = hidden position)")
    if masked.shape != input_ids.shape:
        raise InputError(f"masked has shape {tuple(masked.shape)} but input_ids has {tuple(input_ids.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape):
        raise InputError("attention_mask must be a tensor with the same shape as input_ids")
    cfg = model.config
    L = input_ids.shape[-1]
    if cfg.max_length is not None and L > cfg.max_length:
        raise InputError(f"sequence of {L} tokens is longer than the model's limit of {cfg.max_length}")
    real = torch.ones_like(masked) if score_hidden else ~masked
    if attention_mask is not None:
        real = real & attention_mask.bool()
    ids = input_ids[real]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        bad = ids[(ids < 0) | (ids >= cfg.vocab_size)][0]
        raise InputError(f"token id {int(bad)} is outside the model's vocabulary of {cfg.vocab_size}")


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature!r} (for argmax decoding use greedy=True)")


def check_options(method, draft, k, temperature, top_k, top_p) -> None:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if draft not in DRAFTS:
        raise InputError(f"unknown draft {draft!r}: use one of {', '.join(DRAFTS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be an integer >= 1, got {k!r}")
    check_temperature(temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")


def _row_orders(order, B: int):
    """One order spec per row: a string for all rows, one permutation ([L] input), or a list of them."""
    if isinstance(order, str):
        return [order] * B
    seq = order.tolist() if isinstance(order, torch.Tensor) else list(order)
    if B > 1 and seq and all(isinstance(o, (list, tuple, torch.Tensor)) for o in seq):
        if len(seq) != B:
            raise InputError(f"got {len(seq)} orders for {B} rows")
        return seq
    if B > 1:
        raise InputError("for a batch, order must be 'left-to-right', 'random' or a list of per-row permutations")
    return [seq]


@torch.no_grad()
def sample(
    model,
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    *,
    method: str = "assd",
    draft: str = "self",
    k: int = 5,
    temperature: float = 1.0,
    order="left-to-right",
    cache: bool = True,
    seed: int | None = None,
    greedy: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: torch.Tensor | None = None,
    return_logprobs: bool = False,
    bonus: bool = False,
    one_pass: bool = False,
    adaptive_k: bool = False,
    callback: Callable[[int, list[int], list[int]], None] | None = None,
) -> SampleResult:
    """Fill the hidden positions of ``input_ids`` by exact chain sampling.

    input_ids: LongTensor [B, L] or [L]; masked: BoolTensor of the same shape, True = hidden.
    method: "sequential" (one pass per token) or "assd"; draft: "self" or "ngram"; k: draft
    block size (k >= 1). order: "left-to-right", "random" (per row, from its seed) or a
    permutation of the hidden positions (a list of them for a batch). cache=False recomputes
    every pass from scratch (the reference-style baseline); both give the same distribution.
    greedy / top_k / top_p: applied identically to drafts and oracle, so ASSD stays exact for
    the truncated chain. attention_mask: Bool [B, L], False for padding (rows of different
    lengths). bonus / one_pass / adaptive_k: faster exact ASSD variants (see ``Speculation``);
    one_pass needs draft="self". return_logprobs: fill ``token_logprobs`` with the target-chain log-prob of every
    sampled token. callback(row, positions, tokens) is called as each round's tokens are accepted.
    """
    check_options(method, draft, k, temperature, top_k, top_p)
    if one_pass and (method != "assd" or draft != "self"):
        raise InputError("one_pass applies to method='assd' with draft='self' (n-gram rounds already take one pass)")
    spec = Speculation(k=k, bonus=bool(bonus), one_pass=bool(one_pass), adaptive_k=bool(adaptive_k))
    check_inputs(model, input_ids, masked, attention_mask)
    start = time.perf_counter()
    squeeze = input_ids.dim() == 1
    ids = input_ids.view(1, -1) if squeeze else input_ids
    hid = masked.view(1, -1) if squeeze else masked
    B, L = ids.shape
    valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.view(B, L).bool().cpu()
    valid_len = valid.sum(1)
    if not bool((valid == (torch.arange(L)[None] < valid_len[:, None])).all()):
        raise InputError("attention_mask must mark a prefix of each row (right padding)")
    hid = hid.cpu() & valid
    if seed is None:
        seed = random.SystemRandom().randrange(2**62)
    target = TargetDistribution(model.config.mask_token_id, float(temperature), greedy, top_k, top_p)
    rows = []
    for b, row_order in enumerate(_row_orders(order, B)):
        gen = torch.Generator().manual_seed(_row_seed(seed, b))
        tokens = ids[b].detach().cpu().long().clone()
        row_order = decoding_order(hid[b], row_order, gen)
        tokens[hid[b]] = model.config.mask_token_id
        rows.append(_Row(b, tokens, int(valid_len[b]), row_order, gen, target, method, draft, spec, model.config.vocab_size))
    _Engine(model, rows, L, spec.max_k, cache, target, callback).run()

    out = torch.stack([r.tokens for r in rows]).to(input_ids.device)
    result = SampleResult(
        input_ids=out,
        nfe=torch.tensor([r.nfe for r in rows]),
        draft_calls=torch.tensor([r.draft_calls for r in rows]),
        rounds=torch.tensor([r.rounds for r in rows]),
        accepted=[r.accepted for r in rows],
        token_logprobs=torch.stack([r.logprobs for r in rows]) if return_logprobs else None,
        elapsed=time.perf_counter() - start,
    )
    if squeeze:
        result.input_ids = result.input_ids[0]
        result.nfe, result.draft_calls, result.rounds = result.nfe[0], result.draft_calls[0], result.rounds[0]
        result.accepted = result.accepted[0]
        if return_logprobs:
            result.token_logprobs = result.token_logprobs[0]
    return result


class _Engine:
    """Runs shared passes for all unfinished rows; owns the cache and the relative-position table."""

    def __init__(self, model, rows, length, max_k, use_cache, target, callback):
        self.model = model
        self.rows = [r for r in rows if not r.done]
        self.use_cache = use_cache
        self.target = target
        self.callback = callback
        self.device = model.device
        self.rel_table = model.relative_table(max(length, 1)) if self.rows else None
        self.cache = ContentCache(model, len(self.rows), length + max_k + 2) if use_cache and self.rows else None

    def run(self) -> None:
        while self.rows:
            self.step()

    def step(self) -> None:
        plans = [row.plan(self.use_cache) for row in self.rows]
        B = len(plans)
        N = max(1, max(len(c) for c, _ in plans))
        Q = max(1, max(len(q) for _, q in plans))
        content = torch.zeros(B, N, 3, dtype=torch.long)
        content[:, :, 2] = NO_KEY
        query = torch.zeros(B, Q, 2, dtype=torch.long)
        for b, (contents, queries) in enumerate(plans):
            if contents:
                content[b, : len(contents)] = torch.tensor(contents, dtype=torch.long)
            query[b, : len(queries)] = torch.tensor(queries, dtype=torch.long)
        content, query = content.to(self.device), query.to(self.device)
        logits = self.model.forward_rows(
            content[..., 1], content[..., 0], content[..., 2], query[..., 0], query[..., 1],
            cache=self.cache, rel_table=self.rel_table,
        )
        probs = self.target.probs(logits).to("cpu", torch.float64)
        kept = []
        for b, (row, (_, queries)) in enumerate(zip(self.rows, plans)):
            commit, positions = row.consume(probs[b, : len(queries)])
            kept.append(commit)
            if self.callback is not None and positions:
                self.callback(row.index, positions, [int(row.tokens[p]) for p in positions])
        if self.cache is not None:
            self.cache.commit(torch.tensor(kept))
        alive = [i for i, row in enumerate(self.rows) if not row.done]
        if len(alive) < len(self.rows):
            self.rows = [self.rows[i] for i in alive]
            if self.cache is not None and alive:
                self.cache.select_rows(torch.tensor(alive, device=self.device))
