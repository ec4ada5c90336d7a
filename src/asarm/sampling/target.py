"""The target distribution of a chain factor, and exact drawing from distributions.

Everything here runs where the logits are (CPU or GPU), batched over any leading dimensions.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch


@dataclasses.dataclass(frozen=True)
class TargetDistribution:
    """Turns logits into the target distribution: identical for drafts and oracle, which is
    what keeps ASSD exact under temperature, truncation and greedy decoding.

    Order of operations: excluded tokens (the mask token, ``suppress``) get -inf before the
    softmax; the maximum is subtracted *before* dividing by the temperature, so any T > 0 is
    finite (a tiny T gives the uniform distribution over the tied maxima, the T -> 0 limit,
    never NaN); then top-k, then top-p. Greedy is a one-hot at the first maximum."""

    mask_token_id: int
    temperature: float = 1.0
    greedy: bool = False
    top_k: int | None = None
    top_p: float | None = None
    suppress: tuple[int, ...] = ()

    def logits(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Final (log-)weights, -inf where a token is excluded: float32, or float64 when the
        temperature is below float32's range (so even T = 1e-300 stays finite). ``allowed``
        (bool, broadcast to ``logits``): a constrained hole's mask, excluded like the rest
        before everything else (asarm.sampling.constraints)."""
        dtype = torch.float64 if self.temperature < 1e-30 else torch.float32
        # a new tensor (logits are read again by constrained rows), edited in place from here on
        x = logits.to(dtype, copy=True).index_fill_(-1, self.excluded(logits.device), -math.inf)
        if allowed is not None:
            x.masked_fill_(~allowed, -math.inf)
        if self.greedy:
            best = x.argmax(-1, keepdim=True)
            return x.fill_(-math.inf).scatter_(-1, best, 0.0)
        if self.temperature != 1.0:
            x.sub_(x.amax(-1, keepdim=True)).div_(self.temperature)
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_x, idx = torch.sort(x, dim=-1, descending=True)
            p = torch.softmax(sorted_x, -1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop_sorted = (p.cumsum(-1) - p) >= self.top_p
            x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted), -math.inf)
        return x

    def excluded(self, device: torch.device) -> torch.Tensor:
        """The excluded token ids (the mask token, ``suppress``) as an index tensor on
        ``device``, built once per distribution and device: every pass asks for it."""
        index = self._excluded.get(device)
        if index is None:
            index = self._excluded[device] = torch.tensor((self.mask_token_id, *self.suppress), device=device)
        return index

    @functools.cached_property
    def _excluded(self) -> dict:
        return {}  # (cached_property writes the instance's __dict__: allowed on a frozen dataclass)

    def probs(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities (float32; float64 for tiny temperatures). Drawing and acceptance
        convert the entries they use to float64."""
        return torch.softmax(self.logits(logits, allowed), dim=-1)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens from (unnormalised, non-negative) distributions ``probs`` [..., V] by inverse CDF
    with uniforms ``u`` [...] in [0, 1): token i is drawn iff cdf[i-1] <= u * total < cdf[i].

    A zero-probability token has cdf[i] == cdf[i-1] and can never be drawn. With u < 1,
    u * total < total in float64 (round to nearest), so the search lands on a token with mass; a
    second search, of the total itself (as if u were 1), guards that bound: it gives the token at
    which the cdf reaches its total, which has mass. (A binary search: the scan for the last
    positive entry it replaces cost more than the cumulative sum.) float64 cumulative sums keep
    the rounding far below what the statistical tests can see."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[..., -1:].contiguous()
    index = torch.searchsorted(cdf, u.to(cdf)[..., None] * total, right=True)
    return torch.minimum(index, torch.searchsorted(cdf, total)).squeeze(-1)


def residual(target: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
    """Where a rejected draft's replacement is drawn from: normalize(max(0, target - proposal))
    (``draw`` normalises). Rows without residual mass (proposal == target) fall back to the
    target; no draft is ever rejected there, so the fallback is never used for a real draw."""
    rest = (target - proposal).clamp_(min=0.0)
    empty = rest.sum(-1, keepdim=True) <= 0
    return torch.where(empty, target, rest)
