"""Draft distributions besides the model's own draft pass.

The n-gram drafter proposes tokens from bigram counts of the text a row already has (visible and
decoded tokens), backing off to unigram counts and finally to uniform; it costs no network pass.
The head drafter runs a learned draft head (``asarm.draft_head``) over a pass's query states.
Any proposal keeps ASSD exact (acceptance corrects it); a good one only makes it faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..draft_head import MAX_GAP, head_readout
from ..fastpass import PackedLinear, choose_kernel
from .target import draw


class NgramDrafter:
    """Bigram/unigram counts over one row's known tokens, updated as tokens are decoded."""

    def __init__(self, vocab_size: int, mask_token_id: int, smoothing: float = 0.1):
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.smoothing = smoothing
        self.unigram = torch.zeros(vocab_size, dtype=torch.float64)
        self.bigram: dict[int, torch.Tensor] = {}

    def observe(self, tokens: torch.Tensor, known: torch.Tensor, positions=None) -> None:
        """Count unigrams at ``positions`` (all known positions if None) and the bigrams that
        end or start there, among known tokens."""
        L = tokens.shape[0]
        if positions is None:
            positions = torch.nonzero(known).flatten().tolist()
        positions = set(positions)
        for p in sorted(positions):
            self.unigram[tokens[p]] += 1
            if p > 0 and known[p - 1]:
                self._add_bigram(int(tokens[p - 1]), int(tokens[p]))
            if p + 1 < L and known[p + 1] and (p + 1) not in positions:
                self._add_bigram(int(tokens[p]), int(tokens[p + 1]))

    def _add_bigram(self, prev: int, nxt: int) -> None:
        row = self.bigram.get(prev)
        if row is None:
            row = self.bigram[prev] = torch.zeros(self.vocab_size, dtype=torch.float64)
        row[nxt] += 1

    def distribution(self, previous_token: int | None, temperature: float) -> torch.Tensor:
        """Proposal for a position whose left neighbour is ``previous_token`` (None if unknown)."""
        counts = self.bigram.get(previous_token) if previous_token is not None else None
        if counts is None or counts.sum() == 0:
            counts = self.unigram
        weights = counts + self.smoothing
        weights[self.mask_token_id] = 0.0
        if temperature != 1.0:
            weights = weights.pow(1.0 / temperature)
        return weights / weights.sum()


class HeadDrafter:
    """A head bound to its model's frozen embedding and LM head: drafts one row's block. Every
    draft's proposal is the row's own target distribution of the head's logits, so the row's
    verification sees exactly what each draft was drawn from."""

    def __init__(self, head, model):
        self.head = head.to(model.device, torch.float32).eval()
        # Reading out one row reads the whole LM head: bound by memory, so a bf16 model reads its
        # bf16 weights (half the bytes, ~3x faster on this project's CPU); the head's own small
        # matrices stay float32 (small bf16 matmuls measured slower there).
        self.bf16_readout = model.dtype == torch.bfloat16
        if self.bf16_readout:
            self.readout_weight = model.transformer.word_embedding.weight.detach()
            self.readout_bias = model.lm_loss.bias.detach().to(torch.bfloat16)
            # On CPUs with native bf16, linear runs oneDNN and repacks the weight on every call:
            # packed once, as the fast pass packs its own LM head, one row reads out faster with
            # the same logits at the shipped models' shapes, so the same draws (checked against
            # the code before, docs/performance.md; scripts/host_work_bench.py times it).
            # Elsewhere linear stays (another kernel could round differently: other draws).
            packed = choose_kernel(model.device, torch.bfloat16) == "onednn"
            self.packed_readout = PackedLinear(self.readout_weight, self.readout_bias, "onednn") if packed else None
        self.embedding, self.bias = head_readout(model)
        self.mask_token_id = model.config.mask_token_id

    def _readout(self, out: torch.Tensor) -> torch.Tensor:
        if self.bf16_readout:
            if self.packed_readout is not None:
                return self.packed_readout(out.to(torch.bfloat16))
            return torch.nn.functional.linear(out.to(torch.bfloat16), self.readout_weight, self.readout_bias)
        return out @ self.embedding.T + self.bias

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, positions: list[int], prev_token: int, prev_pos: int | None, target,
              generator: torch.Generator, first: tuple[int, torch.Tensor] | None = None, n_chains: int = 0):
        """Drafts for ``positions`` (in order) from their query states ``hidden`` [b, d]: each step
        feeds the token before it (``prev_token`` at ``prev_pos`` for the first; None: nothing
        decoded yet), draws with one uniform from ``generator``. ``first``: (token, proposal) of
        an exact first draft, kept as it is (the head still reads it). Returns (tokens, [b, V]).

        ``n_chains`` >= 1: that many continuations for a multi-draft round, returned as
        (tokens [n_chains][b], probs [n_chains, b, V]). They share every step up to the first
        drawn one, which is computed once and drawn ``n_chains`` times (independent draws from
        one proposal, as recursive rejection needs); the later steps run the chains as the rows
        of one batch, so a step reads the head's and the LM head's weights once for all of them.

        The same arithmetic as ``DraftHead.step`` per position, bit for bit (same kernels on
        the same values) while one row is drafted, with the per-step overhead taken out:
        everything that does not depend on the drafts (step and gap embeddings, the query
        states' half of the input linear's operand) is gathered once per block, and the
        operands of the two concatenating linears live in buffers filled in place
        (tests/test_draft_head.py compares against ``step``)."""
        head, d, dh = self.head, self.embedding.shape[1], self.head.config.d_hidden
        b, chains = len(positions), max(n_chains, 1)
        steps = [min(i, head.config.max_steps - 1) for i in range(b)]
        gaps = [0 if p is None else min(max(pos - p, 0), MAX_GAP - 1)
                for pos, p in zip(positions, [prev_pos, *positions[:-1]])]
        step_rows, gap_rows = head.step_emb.weight[steps], head.gap_emb.weight[gaps]  # [b, dh]: exact copies
        hidden = hidden.float().contiguous()  # rows of stride d, as the readout's kernel always saw them
        operand = torch.empty(b, 2 * d, device=hidden.device)  # [h_i, embedding of the token before]
        operand[:, :d] = hidden
        joined = torch.empty(1, 2 * dh, device=hidden.device)  # [u, state] for the output linear
        inp, mid, out_linear, cell = head.inp, head.mid, head.out, head.cell
        state = torch.zeros(1, dh, device=hidden.device)  # what nn.GRUCell starts from given None
        previous = [prev_token]  # the token before the next step, per row of the batch (one row until it branches)
        tokens, probs = [], []  # per step: a token per chain, the proposal [rows, V]
        for i in range(b):
            rows = len(previous)
            if rows == 1:
                row = operand[i : i + 1]
                row[0, d:] = self.embedding[previous[0]]
            else:
                row = torch.cat([hidden[i].expand(rows, d), self.embedding[previous]], dim=1)
                if joined.shape[0] != rows:
                    joined = torch.empty(rows, 2 * dh, device=hidden.device)
            u = F.gelu(F.linear(row, inp.weight, inp.bias) + step_rows[i : i + 1] + gap_rows[i : i + 1],
                       approximate="tanh")
            state = torch.gru_cell(u, state, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
            if i == 0 and first is not None:
                token, p = first
                drawn, p = [token], p[None]
            else:
                joined[:, :dh] = u
                joined[:, dh:] = state
                mixed = F.gelu(F.linear(joined, mid.weight, mid.bias), approximate="tanh")
                corrected = hidden[i : i + 1] + F.linear(mixed, out_linear.weight, out_linear.bias)
                p = target.probs(self._readout(corrected))
                if rows == 1 and n_chains < 1:  # one chain (one uniform, as the step-by-step head draws)
                    drawn = [int(draw(p[0], torch.rand((), generator=generator, dtype=torch.float64).to(p.device)))]
                else:  # the branch point draws every chain from its one proposal, later steps a token per chain
                    u_rows = torch.rand(chains, generator=generator, dtype=torch.float64).to(p.device)
                    drawn = draw(p.expand(chains, -1), u_rows).tolist()
                    if rows == 1 and chains > 1:
                        state = state.expand(chains, dh).contiguous()
            tokens.append(drawn if len(drawn) == chains else drawn * chains)
            probs.append(p.expand(chains, -1))
            previous = drawn
        if n_chains < 1:
            return [t[0] for t in tokens], torch.stack(probs)[:, 0]
        return [[t[c] for t in tokens] for c in range(chains)], torch.stack(probs, dim=1)
