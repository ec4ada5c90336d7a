"""Draft distributions that cost no network pass.

The n-gram drafter proposes tokens from bigram counts of the text a row already has (visible and
decoded tokens), backing off to unigram counts and finally to uniform. Any proposal keeps ASSD
exact (acceptance corrects it); a good one only makes it faster.
"""

from __future__ import annotations

import torch


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
