"""The training loop: ``Trainer`` runs steps on a ``TrainState`` and checkpoints it.

Determinism: every random draw of step s (masks, dropout) comes from generators seeded from
(seed, s, rank, micro-batch) and the data position is part of each checkpoint, so ``--resume``
continues with exactly the loss sequence an uninterrupted run logs (same hardware and threads).

Data parallel: under ``torchrun --nproc_per_node N -m asarm.train ...`` (gloo on CPU, nccl on
CUDA) every rank reads a disjoint shard of the chunk stream; rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..data import ChunkStream, StreamState
from ..devices import resolve_device
from ..errors import CheckpointError, InputError
from .checkpoints import (candidates, load_checkpoint_weights, load_newest, read_pointer, read_trainer_state,
                          rng_states, save_checkpoint, set_rng_states, step_dirs, write_text_atomic, writing)
from .config import TrainConfig
from .export import export_checkpoint, write_metrics
from .logs import RunLogs
from .objective import LossModule, autocast, evaluate, mask_range, sample_ranks, seed_for
from .prepare import build_model, prepare_data


# --- distributed ---------------------------------------------------------------------------------
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
    """The process group torchrun describes in the environment (none for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# --- optimisation --------------------------------------------------------------------------------
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
    """AdamW without weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "layer_norm" in name or name.endswith("_bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


# --- state ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint restores besides the weights: the step, the optimizer and the
    schedule, the data position, counters, and (per rank) the global RNG states."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: ChunkStream
    step: int = 0
    tokens: int = 0
    best_valid: float | None = None
    elapsed_before: float = 0.0  # wall time of the sessions before this one
    started: float = dataclasses.field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def state_dict(self, rng_by_rank: dict[int, dict], cfg: TrainConfig) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "stream": self.stream.state.to_dict(), "best_valid": self.best_valid, "tokens": self.tokens,
                "elapsed_s": self.elapsed(), "rng": rng_by_rank, "config": dataclasses.asdict(cfg)}

    def load_state_dict(self, state: dict, rank: int) -> None:
        """Restore from a checkpoint's state; any mismatch is a CheckpointError."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.stream.state = StreamState.from_dict(state["stream"])
            self.step, self.best_valid = int(state["step"]), state.get("best_valid")
            self.tokens, self.elapsed_before = state.get("tokens", 0), state.get("elapsed_s", 0.0)
            rng = (state.get("rng") or {}).get(rank)
            if rng is not None:
                set_rng_states(rng)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"trainer state does not fit this run ({type(exc).__name__}: {exc})") from None


@dataclasses.dataclass
class StepStats:
    loss: float
    lr: float
    grad_norm: float
    low: float
    high: float
    tokens: int  # all ranks together


# --- the loop ------------------------------------------------------------------------------------
class Trainer:
    """One training run: ``Trainer(cfg, resume).run()`` trains to ``cfg.max_steps`` (or the time
    limit), checkpointing and validating on schedule, then exports the best checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        if cfg.threads:
            from ..threads import mark_chosen

            torch.set_num_threads(int(cfg.threads))
            mark_chosen()  # load_model (init_from) keeps the config's threads
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self._check_run_folder(resume)
        self._prepare()
        self.model = build_model(cfg, self.tokenizer).to(self.device)
        self.model.train()
        c = self.model.config
        self.log(f"model: {self.model.num_parameters() / 1e6:.2f}M parameters ({c.n_layer} layers, d_model "
                 f"{c.d_model}, vocab {c.vocab_size}); world {self.dist.world}, device {self.device}")
        optimizer = make_optimizer(cfg, self.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
        stream = ChunkStream(self.train_chunks, cfg.batch_size * cfg.grad_accum, cfg.seed, self.dist.rank,
                             self.dist.world)
        self.state = TrainState(optimizer, scheduler, stream)
        resume_step = self._resume() if resume else None
        self.loss_module = self._wrap_ddp()
        self.logs = RunLogs(self.out_dir, resume_step, cfg.max_steps) if self.dist.main else None

    def log(self, *parts) -> None:
        if self.dist.main:
            print(*parts, file=sys.stderr, flush=True)

    def _check_run_folder(self, resume: bool) -> None:
        exists = read_pointer(self.ckpt_root / "LATEST") is not None or bool(step_dirs(self.ckpt_root))
        if resume and not exists:
            raise CheckpointError(f"--resume: no checkpoint found in {self.ckpt_root}")
        if not resume and exists:
            raise InputError(f"{self.out_dir} already holds a training run: pass --resume to continue it or "
                             "choose another --out")

    def _prepare(self) -> None:
        """Rank 0 writes the config and prepares the data first; the others then read it."""
        if self.dist.main:
            with writing(f"the run folder {self.out_dir}"):
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.out_dir / "train_config.json",
                                  json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")
            self.tokenizer, self.train_chunks, self.valid_chunks = prepare_data(self.cfg, self.out_dir, self.log)
        self.dist.barrier()
        if not self.dist.main:
            self.tokenizer, self.train_chunks, self.valid_chunks = prepare_data(self.cfg, self.out_dir, self.log)

    def _resume(self) -> int:
        """Restore the newest readable checkpoint (LATEST first); returns its step."""
        def load(directory: Path) -> dict:
            state = read_trainer_state(directory)
            load_checkpoint_weights(self.model, directory)
            self.state.load_state_dict(state, self.dist.rank)
            return state

        try:
            directory, _ = load_newest(candidates(self.ckpt_root, "LATEST"), load, self.log)
        except CheckpointError as exc:
            raise CheckpointError(f"--resume: {self.ckpt_root}: {exc}") from None
        self.log(f"resumed from {directory} at step {self.state.step}")
        return self.state.step

    def _wrap_ddp(self) -> torch.nn.Module:
        module = LossModule(self.model)
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        # XLNet's segment parameters (r_s_bias, seg_embed) take no part in the loss (one segment)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=device_ids, find_unused_parameters=True)

    # --- one step ------------------------------------------------------------------------------
    def _micro_step(self, ids: torch.Tensor, micro: int, low: float, high: float, sync: bool) -> torch.Tensor:
        cfg, step, rank = self.cfg, self.state.step, self.dist.rank
        g = torch.Generator().manual_seed(seed_for(cfg.seed, step, rank, micro, 1))
        ranks = sample_ranks(len(ids), ids.shape[1], low, high, g, cfg.random_order)
        torch.manual_seed(seed_for(cfg.seed, step, rank, micro, 2))  # dropout
        # DDP all-reduces gradients on the last micro-batch only
        with contextlib.nullcontext() if sync else self.loss_module.no_sync():
            with autocast(self.device, self.cfg.mixed_precision):
                loss = self.loss_module(ids.to(self.device), ranks.to(self.device))
            (loss / cfg.grad_accum).backward()
        return loss.detach().double().cpu()

    def _mean_loss(self, loss_sum: torch.Tensor) -> float:
        mean = loss_sum / self.cfg.grad_accum
        if self.dist.enabled:
            mean = mean.float()
            torch.distributed.all_reduce(mean)
            mean = mean.double() / self.dist.world
        return float(mean)

    def train_step(self) -> StepStats:
        """One optimizer update on the next global batch (this rank's shard of it)."""
        cfg, state = self.cfg, self.state
        low, high = mask_range(cfg, state.step)
        indices = state.stream.next_indices()
        batch = self.train_chunks[indices].long()  # [batch_size * grad_accum, L] for this rank
        if cfg.trace_chunks:
            with writing("the chunk trace"), open(self.out_dir / f"chunks-rank{self.dist.rank}.txt", "a") as f:
                f.write(f"{state.step + 1} " + " ".join(map(str, indices.tolist())) + "\n")
        state.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            ids = batch[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]
            sync = micro == cfg.grad_accum - 1 or not self.dist.enabled
            loss_sum += self._micro_step(ids, micro, low, high, sync)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        lr = state.optimizer.param_groups[0]["lr"]
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        step_tokens = batch.numel() * self.dist.world
        state.tokens += step_tokens
        loss = self._mean_loss(loss_sum)
        if not math.isfinite(loss):
            raise RuntimeError(f"step {state.step}: loss is {loss}; lower the learning rate")
        return StepStats(loss, lr, float(grad_norm), low, high, step_tokens)

    def _log_step(self, stats: StepStats) -> None:
        if not self.dist.main:
            return
        step, cfg = self.state.step, self.cfg
        row = None
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            row = {"step": step, "loss": repr(stats.loss), "lr": repr(stats.lr), "grad_norm": repr(stats.grad_norm),
                   "mask_low": round(stats.low, 4), "mask_high": round(stats.high, 4), "tokens": self.state.tokens,
                   "elapsed_s": round(self.state.elapsed(), 1)}
        self.logs.step(step, stats.tokens, row)

    # --- validation and checkpoints ----------------------------------------------------------
    def validate(self) -> dict:
        cfg = self.cfg
        res = evaluate(self.model, self.valid_chunks, seed=cfg.eval_seed, batch_size=cfg.eval_batch_size,
                       low=cfg.mask_low, high=cfg.mask_high, max_chunks=cfg.eval_chunks or None, device=self.device,
                       mixed_precision=cfg.mixed_precision)
        if self.dist.main:
            self.logs.validation(self.state.step, res)
            self.log(f"step {self.state.step}: validation loss {res['loss']:.4f} ppl {res['ppl']:.2f}")
        return res

    def save(self, valid: dict | None) -> None:
        """Checkpoint the current state (rank 0 writes; every rank's RNG states go in)."""
        state = self.state
        is_best = valid is not None and (state.best_valid is None or valid["loss"] < state.best_valid)
        if is_best:
            state.best_valid = valid["loss"]
        mine = rng_states()
        gathered = [mine]
        if self.dist.enabled:
            gathered = [None] * self.dist.world
            torch.distributed.all_gather_object(gathered, mine)
        if self.dist.main:
            best = is_best or read_pointer(self.ckpt_root / "BEST") is None
            save_checkpoint(self.ckpt_root, self.model, state.state_dict(dict(enumerate(gathered)), self.cfg), best=best)
        self.dist.barrier()

    def _out_of_time(self, deadline: float | None) -> bool:
        if deadline is None:
            return False
        flag = torch.tensor(1.0 if time.time() > deadline else 0.0)
        if self.dist.enabled:  # every rank stops at the same step
            torch.distributed.all_reduce(flag)
        return bool(flag > 0)

    # --- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            steps, loss, stopped_early = self._loop()
        finally:  # the progress bar and TensorBoard are closed before any error is printed
            if self.logs is not None:
                self.logs.close()
        result = {"step": steps, "train_loss": loss, "tokens": self.state.tokens, "stopped_early": stopped_early}
        if self.dist.main:
            self._finish(result)
        if self.dist.enabled:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return result

    def _loop(self) -> tuple[int, float, bool]:
        """Steps until max_steps or the time limit; returns (step, last loss, stopped early)."""
        cfg, state = self.cfg, self.state
        state.started = time.time()
        deadline = None if cfg.max_time_minutes is None else state.started + 60 * cfg.max_time_minutes
        loss = float("nan")
        while state.step < cfg.max_steps:
            stats = self.train_step()
            loss = stats.loss
            self._log_step(stats)
            out_of_time = self._out_of_time(deadline)
            step = state.step
            valid = None
            if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
                valid = self.validate()
            if step % cfg.save_every == 0 or step == cfg.max_steps or out_of_time or valid is not None:
                self.save(valid)
            if out_of_time and step < cfg.max_steps:
                self.log(f"stopping at step {step}: max_time_minutes={cfg.max_time_minutes} reached")
                return step, loss, True
        return state.step, loss, False

    def _finish(self, result: dict) -> None:
        """Export the best checkpoint (by validation loss) as the final model; add the run's
        figures to ``result`` and write them to metrics.json (and beside the export)."""
        cfg = self.cfg
        export_dir = Path(cfg.export_dir) if cfg.export_dir else self.out_dir / "model"
        exported = export_checkpoint(cfg, self.tokenizer, "BEST", export_dir, self.log)
        best_row = self.logs.best_validation()
        result.update({
            "name": cfg.name,
            "exported": str(export_dir),
            "export_dtype": exported["export_dtype"],
            "export_step": exported["export_step"],
            "best_valid_loss": float(best_row["valid_loss"]) if best_row else None,
            "best_valid_ppl": float(best_row["valid_ppl"]) if best_row else None,
            "parameters": self.model.num_parameters(),
            "train_chunks": len(self.train_chunks),
            "valid_chunks": len(self.valid_chunks),
            "seq_len": cfg.seq_len,
            "world_size": self.dist.world,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "wall_time_s": round(self.state.elapsed(), 1),
            "model_config": exported["model"].config.to_dict(),
            "train_config": dataclasses.asdict(cfg),  # the exported model says how it was trained (orders, masks, ...)
        })
        write_metrics(self.out_dir / "metrics.json", result)
        write_metrics(export_dir / "training_metrics.json", result)
        self.log(f"exported step {exported['export_step']} to {export_dir} ({exported['export_dtype']}); "
                 f"metrics in {self.out_dir / 'metrics.json'}")


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or, with ``resume``, continue) the run ``cfg`` describes; returns its metrics."""
    cfg.validate()
    return Trainer(cfg, resume).run()
