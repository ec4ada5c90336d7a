"""The training objective (docs/design.md, "Training objective"): the hidden-fraction schedule,
the masks (``asarm.ranks.training_ranks``), the chain loss of one pass, and the fixed-mask
validation loss used for every reported perplexity."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..ranks import training_ranks
from .config import TrainConfig


def mask_range(cfg: TrainConfig, step: int) -> tuple[float, float]:
    """Bounds of the uniform hidden fraction at ``step`` (linear warm-up from mask_start)."""
    if cfg.mask_warmup_steps <= 0 or step >= cfg.mask_warmup_steps:
        return cfg.mask_low, cfg.mask_high
    t = step / cfg.mask_warmup_steps
    return (cfg.mask_start + t * (cfg.mask_low - cfg.mask_start),
            cfg.mask_start + t * (cfg.mask_high - cfg.mask_start))


def sample_ranks(batch: int, length: int, low: float, high: float, generator: torch.Generator,
                 random_order: bool | float = False) -> torch.Tensor:
    fraction = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
    return training_ranks(batch, length, fraction, generator, random_order=random_order)


def chain_loss(model, input_ids: torch.Tensor, ranks: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of the query-stream predictions at the hidden positions (targets: the real
    tokens there). ``reduction="sum"`` returns (sum, count)."""
    logits, query_pos, query_valid = model.chain_logits(input_ids, ranks)
    targets = input_ids.gather(1, query_pos)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    valid = query_valid.flatten().to(losses.dtype)
    total = (losses * valid).sum()
    count = valid.sum()
    if reduction == "sum":
        return total, count
    return total / count.clamp(min=1)


@torch.no_grad()
def evaluate(model, chunks: torch.Tensor, seed: int = 1234, batch_size: int = 16, low: float = 0.85,
             high: float = 0.99, max_chunks: int | None = None, random_order: bool = False,
             device=None, mixed_precision: bool = True) -> dict:
    """Loss/perplexity under the paper's order on ``chunks`` with masks from a fixed seed (so
    numbers are comparable between runs and checkpoints): mean CE per hidden token."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    if max_chunks:
        chunks = chunks[:max_chunks]
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0.0
    for start in range(0, len(chunks), batch_size):
        ids = chunks[start:start + batch_size].long()
        ranks = sample_ranks(len(ids), ids.shape[1], low, high, g, random_order)
        with autocast(device, mixed_precision):
            s, c = chain_loss(model, ids.to(device), ranks.to(device), reduction="sum")
        total += float(s)
        count += float(c)
    if was_training:
        model.train()
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(count)}


def evaluate_sources(model, sources, kind: str = "text", seq_len: int = 256, max_chunks: int | None = 512,
                     seed: int = 1234, low: float = 0.85, high: float = 0.99, batch_size: int = 16,
                     max_chars: int | None = None) -> dict:
    """Held-out loss/perplexity of ``model`` (an ASARM with ``.tokenizer``, or anything
    ``load_model`` reads) on data sources (``asarm.data`` syntax), under the paper's order with
    fixed masks from ``seed``: hidden fraction uniform in [low, high] (low == high for a fixed rate).
    Documents are packed into ``seq_len`` chunks separated by eos; the first ``max_chunks`` count."""
    from ..data import load_documents, pack, tokenize_documents

    if isinstance(model, (str, os.PathLike)):
        from ..checkpoint import load_model

        model = load_model(model, device="cpu")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("the model has no tokenizer files: cannot tokenize held-out text")
    docs = load_documents(sources, kind=kind, max_chars=max_chars)
    chunks = pack(tokenize_documents(tokenizer, docs), seq_len, model.config.eos_token_id)
    result = evaluate(model, chunks, seed=seed, batch_size=batch_size, low=low, high=high, max_chunks=max_chunks)
    result.update({"chunks": min(len(chunks), max_chunks or len(chunks)), "seq_len": seq_len,
                   "hidden_fraction": [low, high], "seed": seed})
    return result


def autocast(device: torch.device, mixed_precision: bool = True):
    """bf16 autocast on CUDA (unless ``mixed_precision`` is off); plain fp32 on CPU (exact and
    fast there)."""
    if device.type == "cuda" and mixed_precision:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from (seed, step, rank, micro-batch, purpose): every random draw of a
    step has its own generator, so a resumed run draws exactly what an uninterrupted one would."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return h


class LossModule(torch.nn.Module):
    """The model with ``chain_loss`` as its forward: DistributedDataParallel's hooks run on
    forward(), so the loss must be computed there."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, ranks):
        return chain_loss(self.model, input_ids, ranks)
