"""Exact chain samplers for AS-ARMs: sequential and Any-Subset Speculative Decoding (ASSD).

The target (docs/design.md, "Target distribution"): for the hidden positions in order sigma,
prod_i target(logits_i), where ``target`` drops excluded tokens, applies the temperature and the
optional top-k / top-p truncation (or argmax for greedy). Every sampler here draws that joint.

Files, in the order data flows:
  config.py     ``DecodeConfig``: every decoding option, validated; ``speedup_configs``
  target.py     ``TargetDistribution``, exact inverse-CDF ``draw``, the ``residual``
  verify.py     the pure batched speculative ``verify`` step
  proposers.py  where drafts come from: self-draft pass, one-pass lookahead, n-gram; adaptive k
  row.py        one sequence's state and the plan of its next pass
  engine.py     ``Engine``: shared passes, the exact cache, rows joining and leaving
  api.py        ``sample()``
"""

from .api import SampleResult, row_orders, sample
from .checks import check_inputs, resolve_seed
from .config import METHODS, DecodeConfig, check_temperature, config_label, speedup_configs
from .engine import Engine, RowHandle, row_seed
from .proposers import PROPOSERS, Block, Proposer
from .row import RoundEvent
from .target import TargetDistribution, draw, residual
from .verify import Verdict, verify

DRAFTS = tuple(PROPOSERS)

__all__ = ["sample", "SampleResult", "DecodeConfig", "speedup_configs", "config_label", "Engine", "RowHandle", "RoundEvent",
           "TargetDistribution", "draw", "residual", "verify", "Verdict", "Proposer", "Block", "PROPOSERS",
           "check_inputs", "check_temperature", "row_seed", "row_orders", "resolve_seed", "METHODS", "DRAFTS"]
