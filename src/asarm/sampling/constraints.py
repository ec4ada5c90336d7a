"""Constrained holes: token automata with the length in the loop, and their masks in a pass.

A constraint on a hole of exactly n tokens is a deterministic automaton over token ids
(``TokenAutomaton``; compiled from a regex, a list of choices or a JSON schema by
``asarm.text.constraints``). The constrained target is the model's chain with each factor
renormalized over the tokens that keep the hole *completable*: token t is allowed at a hole
position with r tokens after it iff t leads from the current state to a state from which some r
tokens reach acceptance. So every sampled hole matches, whatever the model prefers.

Exactness under ASSD (docs/constraints.md): a position's mask depends on the automaton state
after the hole's tokens before it, so hidden positions inside a constrained hole are decoded
left to right within the hole (``RowConstraint.reorder``), and each query row of a pass gets the
mask of the state along the tokens its query conditions on:

- the sequential query and the draft pass's queries: the state after the decoded tokens and,
  for draft i, after drafts 1..i-1 (drawn one after another in ``constrain_pass``, so the first
  draft is the exact constrained conditional and no draft is ever outside its mask);
- the verify pass: the query of draft i sees drafts 1..i-1, so its mask is the state along them;
  the bonus query sees every draft; lookahead queries (one-pass rounds) chain on from the bonus
  query's own draw;
- blocks that come from elsewhere (n-gram drafts, drafts left over after a rejection) are made
  to fit the masks along the tokens actually decoded (``RowConstraint.fit_block``): a draft
  outside its mask is redrawn from its proposal restricted to the mask, which leaves each draft
  distributed as that restricted proposal. Any proposal keeps the speculative step exact, and
  the residual at a rejection is taken from the masked target.

The masks enter ``TargetDistribution`` as -inf logits before the softmax, so temperature,
top-k/top-p and greedy apply to the allowed tokens, identically for drafts and oracle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .target import draw

MAX_CACHED_MASKS = 4096  # per automaton: 32 MiB with a 8,192-token vocabulary
DEAD = -1  # no state: the tokens so far leave the automaton (never on an accepted path)


class TokenAutomaton:
    """A deterministic automaton over token ids, with completability by exact length.

    ``transitions[state][token] = next_state``; ``finals`` are accepting. ``lengths(state)``
    is a bitmask: bit r is set iff some r tokens lead from ``state`` to acceptance. The masks
    (``allowed(state, remaining)``) are cached per (state, remaining) and per device."""

    def __init__(self, initial: int, transitions: dict[int, dict[int, int]], finals, vocab_size: int,
                 description: str = ""):
        self.initial, self.vocab_size, self.description = int(initial), int(vocab_size), description
        self.transitions = {int(s): {int(t): int(n) for t, n in moves.items()} for s, moves in transitions.items()}
        self.finals = frozenset(int(s) for s in finals)
        # tokens grouped by the state they lead to: masks are built per successor, not per token
        self._by_successor: dict[int, dict[int, list[int]]] = {}
        for s, moves in self.transitions.items():
            groups: dict[int, list[int]] = {}
            for t, n in moves.items():
                groups.setdefault(n, []).append(t)
            self._by_successor[s] = groups
        self._cap = -1  # nothing computed yet
        self._live: dict[int, int] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    # --- completability ---------------------------------------------------------------------
    def _ensure(self, max_length: int) -> None:
        """``_live[s]``: bit r set iff acceptance is reachable from s in exactly r tokens, for
        r <= cap. A fixed point over successor sets (each state's mask only grows)."""
        if max_length <= self._cap:
            return
        cap = max(64, 1 << int(max_length).bit_length())
        keep = (1 << (cap + 1)) - 1
        states = set(self.transitions) | self.finals | {n for g in self._by_successor.values() for n in g}
        live = {s: (1 if s in self.finals else 0) for s in states}
        preds: dict[int, set[int]] = {s: set() for s in states}
        for s, groups in self._by_successor.items():
            for n in groups:
                preds[n].add(s)
        work = [s for s in states if live[s]]
        while work:
            n = work.pop()
            shifted = (live[n] << 1) & keep
            for s in preds[n]:
                new = live[s] | shifted
                if new != live[s]:
                    live[s] = new
                    work.append(s)
        self._live, self._cap = live, cap

    def lengths(self, state: int, max_length: int) -> int:
        """Bitmask of the token counts r <= max_length with which ``state`` reaches acceptance."""
        self._ensure(max_length)
        return self._live.get(state, 0) & ((1 << (max_length + 1)) - 1) if state != DEAD else 0

    def admits(self, n: int) -> bool:
        """Whether some text of exactly ``n`` tokens matches."""
        return bool(self.lengths(self.initial, n) >> n & 1)

    def step(self, state: int, token: int) -> int:
        if state == DEAD:
            return DEAD
        return self.transitions.get(state, {}).get(int(token), DEAD)

    def run(self, tokens: Sequence[int], state: int | None = None) -> int:
        state = self.initial if state is None else state
        for t in tokens:
            state = self.step(state, t)
        return state

    def accepts(self, tokens: Sequence[int]) -> bool:
        return self.run(tokens) in self.finals

    def allowed(self, state: int, remaining: int, device=None) -> torch.Tensor | None:
        """Bool [V]: the tokens that lead from ``state`` to a state completable in exactly
        ``remaining`` more tokens. None for a dead state (a query whose prefix already left the
        automaton: its draft before was rejected, its distribution is never used)."""
        if state == DEAD:
            return None
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (state, remaining, str(device))
        mask = self._masks.get(key)
        if mask is None:
            self._ensure(remaining)
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            ids = [t for n, tokens in self._by_successor.get(state, {}).items() if self._live.get(n, 0) >> remaining & 1
                   for t in tokens]
            if not ids:
                return None
            mask[torch.tensor(ids)] = True
            mask = mask.to(device)
            if len(self._masks) >= MAX_CACHED_MASKS:  # a bounded cache: a long-running server keeps its memory
                self._masks.clear()
            self._masks[key] = mask
        return mask


@dataclasses.dataclass(frozen=True)
class HoleConstraint:
    """A constrained hole of a row: token positions [start, end) and its automaton."""

    start: int
    end: int
    automaton: TokenAutomaton

    def __post_init__(self):
        if not 0 <= self.start < self.end:
            raise ValueError(f"a constrained hole needs start < end, got [{self.start}, {self.end})")


class RowConstraint:
    """One row's constrained holes: the automaton state after each hole's decoded tokens, and
    the masks of hypothetical continuations (drafts) along them."""

    def __init__(self, holes: Sequence[HoleConstraint], length: int, masked: torch.Tensor):
        self.holes = sorted(holes, key=lambda h: h.start)
        self.hole_at: dict[int, int] = {}
        for i, h in enumerate(self.holes):
            if h.end > length:
                raise ValueError(f"constrained hole [{h.start}, {h.end}) is past the row's end ({length})")
            if not bool(masked[h.start:h.end].all()):
                raise ValueError(f"constrained hole [{h.start}, {h.end}) has visible positions")
            for p in range(h.start, h.end):
                if p in self.hole_at:
                    raise ValueError("constrained holes overlap")
                self.hole_at[p] = i
        self.state = [h.automaton.initial for h in self.holes]
        self.frontier = [h.start for h in self.holes]  # the next position to decode in each hole

    def reorder(self, order: list[int]) -> list[int]:
        """``order`` with each constrained hole's positions put left to right into the slots
        they occupy (every other position keeps its place)."""
        order = list(order)
        for i, h in enumerate(self.holes):
            slots = [j for j, p in enumerate(order) if self.hole_at.get(p) == i]
            for j, p in zip(slots, sorted(order[j] for j in slots)):
                order[j] = p
        return order

    def observe(self, positions: Sequence[int], tokens: Sequence[int]) -> None:
        """Decoded tokens (in decoding order) move their holes' states."""
        for p, t in zip(positions, tokens):
            i = self.hole_at.get(p)
            if i is None:
                continue
            assert p == self.frontier[i], "a constrained hole must be decoded left to right"
            self.state[i] = self.holes[i].automaton.step(self.state[i], t)
            self.frontier[i] = p + 1

    def mask(self, pos: int, assumed: Sequence[tuple[int, int]] = (), device=None) -> torch.Tensor | None:
        """The allowed tokens at ``pos`` given the decoded tokens and ``assumed`` (position,
        token) pairs decoded after them (drafts, in decoding order). None: no constraint here."""
        i = self.hole_at.get(pos)
        if i is None:
            return None
        h = self.holes[i]
        state, frontier = self.state[i], self.frontier[i]
        for p, t in assumed:
            if self.hole_at.get(p) == i:
                if p != frontier:
                    return None
                state, frontier = h.automaton.step(state, t), p + 1
        if pos != frontier:
            return None
        return h.automaton.allowed(state, h.end - pos - 1, device)

    def fit_block(self, block, order: Sequence[int], n_decoded: int, generator: torch.Generator):
        """``block`` (drafts for ``order[n_decoded:]``) with every draft inside its mask along the
        drafts before it: a draft outside is redrawn from its proposal restricted to the mask
        (uniform over the mask if the proposal has no mass there), and each constrained draft's
        proposal becomes that restricted one. A draft kept when inside and redrawn otherwise is
        distributed exactly as the restricted proposal, so the verify step stays exact."""
        if block is None:
            return None
        tokens, probs = list(block.tokens), block.probs.clone()
        assumed: list[tuple[int, int]] = []
        for i in range(len(tokens)):
            pos = order[n_decoded + i]
            allowed = self.mask(pos, assumed, probs.device)
            if allowed is not None:
                p = probs[i].double() * allowed
                total = float(p.sum())
                p = p / total if total > 0 else allowed.double() / float(allowed.sum())
                probs[i] = p.to(probs.dtype)
                if not bool(allowed[tokens[i]]):
                    u = torch.rand((), generator=generator, dtype=torch.float64)
                    tokens[i] = int(draw(p, u.to(p.device)))
            assumed.append((pos, tokens[i]))
        return dataclasses.replace(block, tokens=tokens, probs=probs)


def constrain_pass(rows, plans, logits: torch.Tensor, probs: torch.Tensor) -> dict[tuple[int, int], tuple[int, float]]:
    """Put the constrained rows' masks into a pass's target distributions ``probs`` [B, Q, V]
    (in place; computed from ``logits`` with each row's ``TargetDistribution``), and draw the
    query rows whose masks depend on draws of the same pass (the draft pass; the bonus and
    lookahead queries of one-pass rounds) one after another with the row's own uniforms.
    Returns those draws, {(b, q): (token, probability)}, which the pass's decisions must use."""
    forced: dict[tuple[int, int], tuple[int, float]] = {}
    for b, (row, plan) in enumerate(zip(rows, plans)):
        constraint = getattr(row, "constraint", None)
        if constraint is None or not plan.queries:
            continue
        dev = logits.device
        n = row.n_decoded
        if plan.kind == "verify":
            drafts = [(row.order[n + i], t) for i, t in enumerate(row.block.tokens)]
            fixed = [(q, drafts[:i]) for i, q in enumerate(plan.target_rows) if q >= 0]
            chain = list(range(plan.bonus_row, len(plan.queries))) if plan.bonus_row >= 0 else []
            assumed = list(drafts)
        else:  # sequential, draft: every query is drawn, each after the draws before it
            fixed, chain, assumed = [], list(range(len(plan.queries))), []
        rows_q, masks = [], []
        for q, prefix in fixed:
            m = constraint.mask(plan.queries[q].pos, prefix, dev)
            if m is not None:
                rows_q.append(q)
                masks.append(m)
        if rows_q:
            index = torch.tensor(rows_q, device=dev)
            probs[b, index] = row.target.probs(logits[b, index], allowed=torch.stack(masks)).to(probs.dtype)
        if chain:
            u = row.uniforms(plan)
            for q in chain:
                pos = plan.queries[q].pos
                m = constraint.mask(pos, assumed, dev)
                if m is None:  # a free position (or a dead prefix): the pass draws it as usual
                    p = probs[b, q]
                else:
                    p = row.target.probs(logits[b, q], allowed=m)
                    probs[b, q] = p.to(probs.dtype)
                token = int(draw(p, u[q].to(dev)))
                forced[(b, q)] = (token, float(p[token]))
                assumed.append((pos, token))
    return forced
