"""Exact chain samplers for AS-ARMs: sequential and Any-Subset Speculative Decoding (ASSD).

The target (docs/design.md, "Target distribution"): for the hidden positions in order sigma,
prod_i target(logits_i), where ``target`` drops excluded tokens, applies the temperature and the
optional top-k / top-p truncation (or argmax for greedy). Every sampler here draws that joint.

Files, in the order data flows (docs/design.md, "One pass, in code"):
  config.py     ``DecodeConfig`` and the proposer registry: the decoding schema (no torch)
  target.py     ``TargetDistribution``, exact inverse-CDF ``draw``, the ``residual``
  verification.py  the pure batched speculative ``verify`` step
  drafts.py     ``NgramDrafter``: bigram/unigram proposals that cost no pass
  proposers.py  where drafts come from (self-draft pass, one-pass lookahead, n-gram); adaptive k
  row.py        one sequence's state, the plan of its next pass, ``SampleResult``
  engine.py     ``Engine``: shared passes, the exact cache, rows joining and leaving
  api.py        ``sample()``

Names load on first use (PEP 562), so ``asarm.sampling.config`` imports without torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "sample": "api", "row_orders": "api", "SampleResult": "row", "RoundEvent": "row",
    "DecodeConfig": "config", "speedup_configs": "config", "config_label": "config", "check_temperature": "config",
    "METHODS": "config", "PROPOSERS": "config", "ProposerInfo": "config",
    "Engine": "engine", "RowHandle": "engine", "row_seed": "checks",
    "TargetDistribution": "target", "draw": "target", "residual": "target",
    "verify": "verification", "Verdict": "verification", "Proposer": "proposers", "Block": "proposers", "RowView": "proposers",
    "check_inputs": "checks", "resolve_seed": "checks",
}

__all__ = [*_LAZY, "DRAFTS"]


def __getattr__(name):
    if name == "DRAFTS":
        from .config import draft_names

        return draft_names()
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'asarm.sampling' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
