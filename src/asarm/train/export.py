"""HF-format export of a run's checkpoint (what ``load_model`` and ``transformers`` read).

``asarm.checkpoint.save_model`` writes the files; here they are written into a staging folder
beside the target, fsynced (files and folder), and only then renamed into the target one by one
(weights first, config last) and the target folder fsynced, so a power cut leaves either the old
export or the new one, never a renamed but empty file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoints import (candidates, fsync_dir, fsync_tree, load_checkpoint_weights, load_newest,
                          read_trainer_state, write_text_atomic, writing)
from .config import TrainConfig
from .prepare import build_model


def _auto_dtype(model, max_mb: float) -> str:
    """fp32 when it fits in ``max_mb``, else fp16 (more precise than bf16 for small weights)
    when every weight is in fp16's range, else bf16."""
    n = sum(v.numel() for k, v in model.state_dict().items() if k != "lm_loss.weight")
    if n * 4 / 2**20 <= max_mb:
        return "fp32"
    biggest = max(float(p.detach().abs().max()) for p in model.parameters())
    return "fp16" if biggest < 6e4 else "bf16"


def _save_durably(model, tokenizer, directory: Path, dtype: torch.dtype, max_shard_mb: float | None) -> None:
    from ..checkpoint import save_model
    from ..storage import WEIGHT_FILE, install_files

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.export-", dir=directory.parent))
    try:
        built = save_model(model, staging / "model", tokenizer=tokenizer, dtype=dtype, max_shard_mb=max_shard_mb)
        fsync_tree(built)
        weights = sorted(p.name for p in built.iterdir() if WEIGHT_FILE.match(p.name))
        weights.sort(key=lambda n: n.endswith(".json"))  # the shard index after its shards
        install_files(built, directory, weights)
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_model(model, tokenizer, directory: Path, dtype: str = "auto", max_mb: float = 25.0,
                 max_length: int | None = None, max_shard_mb: float | None = None) -> tuple[Path, str]:
    """Write ``model`` as an HF-format directory; ``dtype`` "auto" picks fp32/fp16/bf16 (see
    ``_auto_dtype``). ``max_length`` is recorded in config.json (asarm_max_length) when given;
    ``max_shard_mb`` splits the weights into shards of at most that many MiB."""
    if max_length is not None:
        model.config = dataclasses.replace(model.config, max_length=int(max_length))
    if dtype == "auto":
        dtype = _auto_dtype(model, max_mb)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    directory = Path(directory)
    with writing(f"the export {directory}"):
        _save_durably(model, tokenizer, directory, torch_dtype, max_shard_mb)
    return directory, dtype


def export_checkpoint(cfg: TrainConfig, tokenizer, pointer: str, target: Path, log=None) -> dict:
    """Export the checkpoint ``pointer`` (BEST or LATEST) names, or the newest readable one
    (with a warning) when that one is unreadable. Returns its step, dtype and best validation loss."""
    ckpt_root = Path(cfg.out_dir) / "checkpoints"
    model = build_model(cfg, tokenizer)

    def load(directory: Path) -> dict:
        state = read_trainer_state(directory)
        load_checkpoint_weights(model, directory)
        return state

    try:
        _, state = load_newest(candidates(ckpt_root, pointer), load, log)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt_root}: nothing to export: {exc}") from None
    model.eval()
    _, dtype = export_model(model, tokenizer, target, cfg.export_dtype, cfg.max_export_mb, cfg.export_length(),
                            cfg.max_shard_mb)
    return {"exported": str(target), "export_dtype": dtype, "export_step": state["step"],
            "best_valid_loss": state.get("best_valid"), "model": model}


def export_run(cfg: TrainConfig, which: str = "best", export_dir: str | None = None, log=None) -> dict:
    """Export a run's BEST (or LATEST) checkpoint as an HF-format directory without training:
    for shipping the best-so-far model of a run still going or cut short."""
    from ..tokenization import load_tokenizer

    out_dir = Path(cfg.out_dir)
    tokenizer = load_tokenizer(out_dir / "prepared") if (out_dir / "prepared").is_dir() else None
    target = Path(export_dir or cfg.export_dir or out_dir / "model")
    result = export_checkpoint(cfg, tokenizer, "BEST" if which == "best" else "LATEST", target, log)
    result.pop("model")
    return result


def write_metrics(path: Path, metrics: dict) -> None:
    with writing(str(path)):
        write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
