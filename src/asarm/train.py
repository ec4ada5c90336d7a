"""Training AS-ARMs with the paper's joint objective (DESIGN §3).

``asarm train --config cfg.json [--set key=value ...] [--resume] [--out DIR]``

Per sequence a hidden fraction is drawn (warm-up: from 15% to uniform in [85%, 99%] over the first
``mask_warmup_steps`` steps), that many positions are hidden uniformly at random, the order is
visible first then hidden left to right (``random_order`` for uniform orders), and the loss is the
mean cross-entropy of the query-stream predictions at the hidden positions, all factors of the
chain from one pass (``ASARM.chain_logits``); masks come from ``asarm.ranks.training_ranks``.

Determinism: every random draw of step s (masks, dropout) comes from generators seeded from
(seed, s, rank, micro-batch) and the data position is part of each checkpoint, so ``--resume``
continues with exactly the loss sequence an uninterrupted run logs (same hardware and threads).

Data parallel: run under ``torchrun --nproc_per_node N -m asarm.train ...`` (gloo on CPU, nccl on
CUDA); every rank reads a disjoint shard of the chunk stream and rank 0 logs and writes.

Output directory:
  prepared/            tokenizer + packed train/validation chunks (reused on resume)
  checkpoints/         step-XXXXXXX/ (model.safetensors, config.json, trainer_state.pt),
                       LATEST and BEST pointer files; only the last and the best are kept
  train_log.csv        step, loss, lr, grad_norm, mask_low, mask_high, tokens, tokens_per_s, elapsed_s
  valid_log.csv        step, valid_loss, valid_ppl, valid_tokens
  loss.png, tb/        plot; TensorBoard scalars when tensorboard is installed
  model/               final HF-format export (config.json, model.safetensors, tokenizer files)
  metrics.json         final figures
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import ASARMConfig
from .errors import ASARMError, CheckpointError, InputError
from .model import ASARM
from .ranks import training_ranks

CONFIG_DIR = Path(__file__).parent / "configs"


# --- configuration -----------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    # model: either a model config (ASARMConfig fields; vocab_size is taken from the tokenizer)
    # or a local HF XLNet checkpoint directory to fine-tune.
    model: dict = dataclasses.field(default_factory=dict)
    init_from: str | None = None
    # tokenizer: a directory with tokenizer files; None trains one (or uses init_from's).
    tokenizer: str | None = None
    tokenizer_kind: str = "text"  # "text" | "code"
    tokenizer_vocab_size: int = 8192
    tokenizer_max_chars: int | None = None  # train the tokenizer on at most this many characters
    # data
    data: list = dataclasses.field(default_factory=list)
    valid_data: list | None = None  # separate validation sources; else a held-out split by document
    valid_fraction: float = 0.02
    max_chars: int | None = None  # read at most this many characters of training data
    seq_len: int = 256
    # optimisation
    batch_size: int = 16  # per rank and micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.98)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # the paper's masking
    mask_warmup_steps: int = 5000
    mask_start: float = 0.15
    mask_low: float = 0.85
    mask_high: float = 0.99
    random_order: bool = False
    # validation
    eval_every: int = 200
    eval_chunks: int = 64
    eval_batch_size: int = 16
    eval_seed: int = 1234
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    max_time_minutes: float | None = None  # stop (checkpoint + export) after this much wall time
    out_dir: str = "runs/asarm"
    export_dtype: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    max_export_mb: float = 25.0
    export_dir: str | None = None  # default: <out_dir>/model
    # max_length written to the exported config.json ("seq_len": the training length, so that
    # samplers and evaluation harnesses stay within what the model saw; null: no limit)
    export_max_length: int | str | None = "seq_len"
    threads: int | None = None
    device: str | None = None
    name: str | None = None
    trace_chunks: bool = False  # each rank appends its chunk indices per step to chunks-rank<r>.txt (tests)

    def validate(self) -> None:
        problems = []
        for key in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batch_size", "log_every",
                    "save_every", "eval_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{key} must be a positive integer, got {v!r}")
        for key in ("warmup_steps", "mask_warmup_steps", "eval_chunks"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"{key} must be a non-negative integer, got {v!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            problems.append(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.tokenizer_kind not in ("text", "code"):
            problems.append(f"tokenizer_kind must be text or code, got {self.tokenizer_kind!r}")
        if self.export_dtype not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"export_dtype must be auto, fp32, bf16 or fp16, got {self.export_dtype!r}")
        if not (0 < self.mask_start <= 1 and 0 < self.mask_low <= self.mask_high <= 1):
            problems.append("mask fractions must satisfy 0 < mask_start <= 1 and 0 < mask_low <= mask_high <= 1")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr!r}")
        eml = self.export_max_length
        if not (eml is None or eml == "seq_len" or (isinstance(eml, int) and not isinstance(eml, bool) and eml > 0)):
            problems.append(f"export_max_length must be 'seq_len', null or a positive integer, got {eml!r}")
        if not self.data:
            problems.append("data: give at least one data source")
        if not self.model and not self.init_from:
            problems.append("give a model config ('model': {...}) or a checkpoint to fine-tune ('init_from')")
        if self.model:
            allowed = {f.name for f in dataclasses.fields(ASARMConfig)} - {"extra"}
            bad = sorted(set(self.model) - allowed)
            if bad:
                problems.append(f"unknown model config key(s) {bad} (known: {sorted(allowed)})")
        if problems:
            raise InputError("invalid training config: " + "; ".join(problems))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(path: str | None, overrides: list[str] | None = None, out: str | None = None) -> TrainConfig:
    """A TrainConfig from a JSON file (or a shipped config name) plus ``key=value`` overrides
    (values parsed as JSON, else taken as strings; ``model.d_model=256`` sets a model field)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file() and (CONFIG_DIR / f"{path}.json").is_file():
            p = CONFIG_DIR / f"{path}.json"
        if not p.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"config file {path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"config file {path}: expected a JSON object")
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        value = _parse_value(value)
        if key.startswith("model."):
            data.setdefault("model", {})[key[6:]] = value
        else:
            data[key] = value
    if out is not None:
        data["out_dir"] = out
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown training config key(s) {unknown}; known keys: {sorted(known)}")
    if isinstance(data.get("data"), (str, dict)):
        data["data"] = [data["data"]]
    if isinstance(data.get("valid_data"), (str, dict)):
        data["valid_data"] = [data["valid_data"]]
    if "adam_betas" in data:
        data["adam_betas"] = tuple(data["adam_betas"])
    cfg = TrainConfig(**data)
    cfg.validate()
    return cfg


# --- distributed helpers -----------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _seed_for(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return h


# --- data preparation ----------------------------------------------------------------------------
def prepare_data(cfg: TrainConfig, out_dir: Path, log=print):
    """Tokenizer + packed chunks in ``out_dir/prepared`` (built once, reused on resume)."""
    from .data import load_documents, pack, split_documents, tokenize_documents
    from .tokenization import load_tokenizer, train_tokenizer

    prep = out_dir / "prepared"
    if (prep / "chunks.pt").is_file():
        tokenizer = load_tokenizer(prep)
        data = torch.load(prep / "chunks.pt")
        return tokenizer, data["train"], data["valid"]
    t0 = time.time()
    docs = load_documents(cfg.data, kind=cfg.tokenizer_kind, max_chars=cfg.max_chars)
    if cfg.valid_data:
        train_docs = docs
        valid_docs = load_documents(cfg.valid_data, kind=cfg.tokenizer_kind)
    else:
        train_docs, valid_docs = split_documents(docs, cfg.valid_fraction, cfg.seed)
    log(f"data: {len(train_docs)} training and {len(valid_docs)} validation documents, "
        f"{sum(map(len, train_docs)):,} / {sum(map(len, valid_docs)):,} characters")
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer is None:
            raise InputError(f"tokenizer {cfg.tokenizer}: no tokenizer files there")
    elif cfg.init_from is not None and load_tokenizer(cfg.init_from) is not None:
        tokenizer = load_tokenizer(cfg.init_from)
    else:
        texts = train_docs
        if cfg.tokenizer_max_chars:
            texts, total = [], 0
            for d in train_docs:
                texts.append(d)
                total += len(d)
                if total >= cfg.tokenizer_max_chars:
                    break
        tokenizer = train_tokenizer(texts, cfg.tokenizer_vocab_size, kind=cfg.tokenizer_kind)
        log(f"tokenizer: trained {cfg.tokenizer_kind} BPE, vocabulary {len(tokenizer)}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
    train = pack(tokenize_documents(tokenizer, train_docs), cfg.seq_len, eos)
    try:
        valid = pack(tokenize_documents(tokenizer, valid_docs), cfg.seq_len, eos)
    except InputError:
        raise InputError("validation data is too small for one chunk of seq_len tokens: raise "
                         "valid_fraction or give more validation data") from None
    log(f"data: {train.numel():,} training tokens in {len(train)} chunks, {valid.numel():,} validation "
        f"tokens ({time.time() - t0:.0f}s)")
    tmp = out_dir / ".prepared.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(str(tmp))
    torch.save({"train": train, "valid": valid}, tmp / "chunks.pt")
    _fsync_dir_files(tmp)
    shutil.rmtree(prep, ignore_errors=True)
    os.replace(tmp, prep)
    return tokenizer, train, valid


# --- model ---------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, tokenizer) -> ASARM:
    if cfg.init_from is not None:
        from .checkpoint import load_model

        model = load_model(cfg.init_from, device="cpu", dtype="fp32")
        if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
            raise InputError(f"tokenizer has {len(tokenizer)} tokens but {cfg.init_from} has a vocabulary "
                             f"of {model.config.vocab_size}")
        if "dropout" in cfg.model:
            model.config.dropout = float(cfg.model["dropout"])
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = model.config.dropout
        return model
    fields = dict(cfg.model)
    if tokenizer is not None:
        fields.setdefault("vocab_size", len(tokenizer))
        for name, attr in (("pad_token_id", "pad_token_id"), ("eos_token_id", "eos_token_id"),
                           ("bos_token_id", "bos_token_id"), ("mask_token_id", "mask_token_id")):
            value = getattr(tokenizer, attr, None)
            if value is not None:
                fields.setdefault(name, int(value))
    fields.setdefault("max_length", None)
    try:
        config = ASARMConfig(**fields)
    except TypeError as exc:
        raise InputError(f"invalid model config: {exc}") from None
    torch.manual_seed(_seed_for(cfg.seed, 7))
    return ASARM(config)


# --- the objective -------------------------------------------------------------------------------
def mask_range(cfg: TrainConfig, step: int) -> tuple[float, float]:
    """Bounds of the uniform hidden fraction at ``step`` (linear warm-up from mask_start)."""
    if cfg.mask_warmup_steps <= 0 or step >= cfg.mask_warmup_steps:
        return cfg.mask_low, cfg.mask_high
    t = step / cfg.mask_warmup_steps
    return (cfg.mask_start + t * (cfg.mask_low - cfg.mask_start),
            cfg.mask_start + t * (cfg.mask_high - cfg.mask_start))


def sample_ranks(batch: int, length: int, low: float, high: float, generator: torch.Generator,
                 random_order: bool = False) -> torch.Tensor:
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
             device=None) -> dict:
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
        with _autocast(device):
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
    from .data import load_documents, pack, tokenize_documents

    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_model

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


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# --- schedule ------------------------------------------------------------------------------------
def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of cfg.lr for the update made at 0-based ``step``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    m = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return m + (1 - m) * (1 - t)
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "layer_norm" in name or name.endswith("_bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


# --- checkpoints ---------------------------------------------------------------------------------
def _fsync_dir_files(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    try:
        fd = os.open(directory, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _write_pointer(path: Path, value: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_pointer(path: Path) -> str | None:
    if not path.is_file():
        return None
    value = path.read_text().strip()
    return value or None


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "numpy" in states:
        try:
            import numpy as np

            np.random.set_state(states["numpy"])
        except ImportError:
            pass
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(ckpt_root: Path, model, state: dict, tokenizer=None, best: bool = False) -> Path:
    """Atomically write ``step-XXXXXXX`` (temp dir, fsync, rename), point LATEST (and BEST) at it,
    and delete every other step directory."""
    from safetensors.torch import save_file

    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:07d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.config.save(tmp)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
               if k != "lm_loss.weight"}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save(state, tmp / "trainer_state.pt")
    _fsync_dir_files(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_pointer(ckpt_root / "LATEST", name)
    if best:
        _write_pointer(ckpt_root / "BEST", name)
    keep = {_read_pointer(ckpt_root / "LATEST"), _read_pointer(ckpt_root / "BEST")}
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint_weights(model, directory: Path) -> None:
    from .checkpoint import load_state_dict, match_state_dict

    state = match_state_dict(model, load_state_dict(directory), str(directory))
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


# --- logging -------------------------------------------------------------------------------------
TRAIN_FIELDS = ["step", "loss", "lr", "grad_norm", "mask_low", "mask_high", "tokens", "tokens_per_s", "elapsed_s"]
VALID_FIELDS = ["step", "valid_loss", "valid_ppl", "valid_tokens"]


class CSVLog:
    """Append-only CSV; on resume rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None):
        self.path, self.fields = path, fields
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        self.rows = rows

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        self.rows.append({k: str(v) for k, v in row.items()})


def read_log(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(out_dir: Path, train_rows: list[dict], valid_rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_rows:
        ax.plot([int(r["step"]) for r in train_rows], [float(r["loss"]) for r in train_rows],
                label="train (current masking rate)", lw=0.8)
    if valid_rows:
        ax.plot([int(r["step"]) for r in valid_rows], [float(r["valid_loss"]) for r in valid_rows],
                "o-", label="validation (85-99% hidden, fixed masks)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per hidden token (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(out_dir / "tb"))


# --- export --------------------------------------------------------------------------------------
def export_model(model, tokenizer, directory: Path, dtype: str = "auto", max_mb: float = 25.0,
                 max_length: int | None = None) -> tuple[Path, str]:
    """HF-format directory; "auto" stores fp32 when it fits in ``max_mb``, else fp16 (more precise
    than bf16 for small weights) when every weight is in fp16's range, else bf16. ``max_length``
    is recorded in config.json (asarm_max_length) when given."""
    from .checkpoint import save_model

    if max_length is not None:
        model.config = dataclasses.replace(model.config, max_length=int(max_length))

    if dtype == "auto":
        n = sum(v.numel() for k, v in model.state_dict().items() if k != "lm_loss.weight")
        if n * 4 / 2**20 <= max_mb:
            dtype = "fp32"
        else:
            biggest = max(float(p.detach().abs().max()) for p in model.parameters())
            dtype = "fp16" if biggest < 6e4 else "bf16"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    save_model(model, directory, tokenizer=tokenizer, dtype=torch_dtype)
    return directory, dtype


def _export_length(cfg: TrainConfig) -> int | None:
    if cfg.export_max_length == "seq_len":
        return cfg.seq_len
    if cfg.export_max_length is None:
        return None
    if not isinstance(cfg.export_max_length, int) or cfg.export_max_length < 1:
        raise InputError(f"export_max_length must be 'seq_len', null or a positive integer, got {cfg.export_max_length!r}")
    return cfg.export_max_length


def export_run(cfg: TrainConfig, which: str = "best", export_dir: str | None = None) -> dict:
    """Export a run's BEST (or LATEST) checkpoint as an HF-format directory without training:
    for shipping the best-so-far model of a run still going or cut short."""
    from .tokenization import load_tokenizer

    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    name = _read_pointer(ckpt_root / ("BEST" if which == "best" else "LATEST")) or _read_pointer(ckpt_root / "LATEST")
    if name is None or not (ckpt_root / name).is_dir():
        raise CheckpointError(f"{ckpt_root}: no checkpoint to export")
    tokenizer = load_tokenizer(out_dir / "prepared") if (out_dir / "prepared").is_dir() else None
    model = build_model(cfg, tokenizer)
    load_checkpoint_weights(model, ckpt_root / name)
    model.eval()
    target = Path(export_dir or cfg.export_dir or out_dir / "model")
    _, dtype = export_model(model, tokenizer, target, cfg.export_dtype, cfg.max_export_mb, _export_length(cfg))
    state = torch.load(ckpt_root / name / "trainer_state.pt", weights_only=False)
    return {"exported": str(target), "export_dtype": dtype, "export_step": state["step"],
            "best_valid_loss": state.get("best_valid")}


# --- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: bool = False) -> dict:
    from .data import ChunkStream, StreamState

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out_dir)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if dist.main else (lambda *a: None)
    ckpt_root = out_dir / "checkpoints"
    latest = _read_pointer(ckpt_root / "LATEST")
    if resume and latest is None:
        raise CheckpointError(f"--resume: no checkpoint found in {ckpt_root}")
    if not resume and latest is not None:
        raise InputError(f"{out_dir} already holds a training run: pass --resume to continue it or "
                         "choose another --out")
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        tokenizer, train_chunks, valid_chunks = prepare_data(cfg, out_dir, log)
    dist.barrier()
    if not dist.main:
        tokenizer, train_chunks, valid_chunks = prepare_data(cfg, out_dir, log)

    model = build_model(cfg, tokenizer).to(device)
    model.train()
    n_params = model.num_parameters()
    log(f"model: {n_params / 1e6:.2f}M parameters ({model.config.n_layer} layers, d_model "
        f"{model.config.d_model}, vocab {model.config.vocab_size}); world {dist.world}, device {device}")
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    stream = ChunkStream(train_chunks, cfg.batch_size * cfg.grad_accum, cfg.seed, dist.rank, dist.world)
    step, best_valid, tokens_seen, elapsed_before = 0, None, 0, 0.0
    resume_step = None
    if resume:
        ck = ckpt_root / latest
        state = torch.load(ck / "trainer_state.pt", weights_only=False)
        load_checkpoint_weights(model, ck)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.state = StreamState.from_dict(state["stream"])
        step, best_valid = state["step"], state.get("best_valid")
        tokens_seen, elapsed_before = state.get("tokens", 0), state.get("elapsed_s", 0.0)
        rng = state.get("rng", {}).get(dist.rank)
        if rng is not None:
            set_rng_states(rng)
        resume_step = step
        log(f"resumed from {ck} at step {step}")
    ddp_model = _LossModule(model)  # DDP hooks run on forward(): the loss is computed there
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # XLNet's segment parameters (r_s_bias, seg_embed) take no part in the loss (one segment)
        ddp_model = DDP(ddp_model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)

    train_log = valid_log = tb = None
    if dist.main:
        train_log = CSVLog(out_dir / "train_log.csv", TRAIN_FIELDS, resume_step if resume else -1)
        valid_log = CSVLog(out_dir / "valid_log.csv", VALID_FIELDS, resume_step if resume else -1)
        tb = _tensorboard(out_dir)

    def run_validation(at_step: int) -> dict:
        res = evaluate(model, valid_chunks, seed=cfg.eval_seed, batch_size=cfg.eval_batch_size,
                       low=cfg.mask_low, high=cfg.mask_high, max_chunks=cfg.eval_chunks or None, device=device)
        if dist.main:
            valid_log.write({"step": at_step, "valid_loss": repr(res["loss"]), "valid_ppl": repr(res["ppl"]),
                             "valid_tokens": res["tokens"]})
            if tb is not None:
                tb.add_scalar("valid/loss", res["loss"], at_step)
                tb.add_scalar("valid/ppl", res["ppl"], at_step)
            log(f"step {at_step}: validation loss {res['loss']:.4f} ppl {res['ppl']:.2f}")
            plot_losses(out_dir, train_log.rows, valid_log.rows)
        return res

    def checkpoint(at_step: int, valid: dict | None) -> None:
        nonlocal best_valid
        is_best = valid is not None and (best_valid is None or valid["loss"] < best_valid)
        if is_best:
            best_valid = valid["loss"]
        # every rank's RNG state, gathered to rank 0
        mine = rng_states()
        if dist.enabled:
            gathered = [None] * dist.world
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if dist.main:
            state = {"step": at_step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "stream": stream.state.to_dict(), "best_valid": best_valid, "tokens": tokens_seen,
                     "elapsed_s": elapsed_before + time.time() - t_start,
                     "rng": dict(enumerate(gathered)), "config": dataclasses.asdict(cfg)}
            save_checkpoint(ckpt_root, model, state, best=is_best or _read_pointer(ckpt_root / "BEST") is None)
        dist.barrier()

    t_start = time.time()
    deadline = None if cfg.max_time_minutes is None else t_start + 60 * cfg.max_time_minutes
    progress = None
    if dist.main:
        try:
            from tqdm import tqdm

            progress = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        except ImportError:
            progress = None
    window_tokens, window_t = 0, time.time()
    stopped_early = False
    last_loss = float("nan")
    while step < cfg.max_steps:
        low, high = mask_range(cfg, step)
        indices = stream.next_indices()
        batch = train_chunks[indices].long()  # [batch_size * grad_accum, L] for this rank
        if cfg.trace_chunks:
            with open(out_dir / f"chunks-rank{dist.rank}.txt", "a") as f:
                f.write(f"{step + 1} " + " ".join(map(str, indices.tolist())) + "\n")
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            ids = batch[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]
            g = torch.Generator().manual_seed(_seed_for(cfg.seed, step, dist.rank, micro, 1))
            ranks = sample_ranks(len(ids), ids.shape[1], low, high, g, cfg.random_order)
            torch.manual_seed(_seed_for(cfg.seed, step, dist.rank, micro, 2))  # dropout
            sync = micro == cfg.grad_accum - 1 or not dist.enabled
            ctx = ddp_model.no_sync() if not sync else _nullcontext()
            with ctx:
                with _autocast(device):
                    loss = ddp_model(ids.to(device), ranks.to(device))
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().double().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        step_tokens = batch.numel() * dist.world
        tokens_seen += step_tokens
        window_tokens += step_tokens
        mean_loss = loss_sum / cfg.grad_accum
        if dist.enabled:
            mean_loss = mean_loss.float()
            torch.distributed.all_reduce(mean_loss)
            mean_loss = mean_loss.double() / dist.world
        last_loss = float(mean_loss)
        if not math.isfinite(last_loss):
            raise RuntimeError(f"step {step}: loss is {last_loss}; lower the learning rate")
        if dist.main:
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.time()
                tps = window_tokens / max(now - window_t, 1e-9)
                window_tokens, window_t = 0, now
                train_log.write({"step": step, "loss": repr(last_loss), "lr": repr(lr),
                                 "grad_norm": repr(float(grad_norm)), "mask_low": round(low, 4),
                                 "mask_high": round(high, 4), "tokens": tokens_seen,
                                 "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed_before + now - t_start, 1)})
                if tb is not None:
                    tb.add_scalar("train/loss", last_loss, step)
                    tb.add_scalar("train/lr", lr, step)
                    tb.add_scalar("train/tokens_per_s", tps, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", refresh=False)
            if progress is not None:
                progress.update(1)
        out_of_time = deadline is not None and time.time() > deadline
        if out_of_time and dist.enabled:
            flag = torch.tensor(1.0 if out_of_time else 0.0)
            torch.distributed.all_reduce(flag)
            out_of_time = bool(flag > 0)
        valid = None
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            valid = run_validation(step)
        if step % cfg.save_every == 0 or step == cfg.max_steps or out_of_time or valid is not None:
            checkpoint(step, valid)
        if out_of_time and step < cfg.max_steps:
            log(f"stopping at step {step}: max_time_minutes={cfg.max_time_minutes} reached")
            stopped_early = True
            break
    if progress is not None:
        progress.close()
    if tb is not None:
        tb.close()

    result = {"step": step, "train_loss": last_loss, "tokens": tokens_seen, "stopped_early": stopped_early}
    if dist.main:
        # Export the best checkpoint (by validation loss) as the final model.
        best = _read_pointer(ckpt_root / "BEST") or _read_pointer(ckpt_root / "LATEST")
        final_model = build_model(cfg, tokenizer)
        load_checkpoint_weights(final_model, ckpt_root / best)
        final_model.eval()
        export_dir = Path(cfg.export_dir) if cfg.export_dir else out_dir / "model"
        _, dtype = export_model(final_model, tokenizer, export_dir, cfg.export_dtype, cfg.max_export_mb,
                                _export_length(cfg))
        best_state = torch.load(ckpt_root / best / "trainer_state.pt", weights_only=False)
        valid_rows = valid_log.rows
        best_row = min(valid_rows, key=lambda r: float(r["valid_loss"])) if valid_rows else None
        result.update({
            "name": cfg.name,
            "exported": str(export_dir),
            "export_dtype": dtype,
            "export_step": best_state["step"],
            "best_valid_loss": float(best_row["valid_loss"]) if best_row else None,
            "best_valid_ppl": float(best_row["valid_ppl"]) if best_row else None,
            "parameters": n_params,
            "train_chunks": len(train_chunks),
            "valid_chunks": len(valid_chunks),
            "seq_len": cfg.seq_len,
            "world_size": dist.world,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "wall_time_s": round(elapsed_before + time.time() - t_start, 1),
            "model_config": final_model.config.to_dict(),
        })
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (export_dir / "training_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        log(f"exported step {best_state['step']} to {export_dir} ({dtype}); metrics in {out_dir / 'metrics.json'}")
    if dist.enabled:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


class _LossModule(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, ranks):
        return chain_loss(self.model, input_ids, ranks)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- command line --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="JSON training config (a path, or a shipped name such as "
                   "asarm-en-small, asarm-py-small, tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (JSON value; model.d_model=256 for model fields); repeatable")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    p.add_argument("--export", choices=["best", "latest"], default=None,
                   help="do not train: export the run's best (or latest) checkpoint to export_dir")


def run_train_command(args) -> int:
    cfg = load_config(args.config, args.overrides, args.out)
    if getattr(args, "export", None):
        print(json.dumps(export_run(cfg, args.export)))
        return 0
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "model_config"}))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune an AS-ARM (the paper's joint objective)",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run_train_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asarm train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train_command(args)
    except ASARMError as exc:
        print(f"asarm train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
