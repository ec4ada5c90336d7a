"""Training AS-ARMs with the paper's joint objective (docs/design.md, "Training objective").

``asarm train --config cfg.json [--set key=value ...] [--resume] [--out DIR]``; see
docs/training.md. Per sequence a hidden fraction is drawn (warm-up: from 15% to uniform in
[85%, 99%] over the first ``mask_warmup_steps`` steps), that many positions are hidden uniformly
at random, the order is visible first then hidden left to right (``random_order``: true for
uniform orders, a probability p for a mixture: each sequence in a random order with probability p), and the loss is the mean cross-entropy of the query-stream predictions at the hidden
positions, all factors of the chain from one pass (``ASARM.chain_logits``).

The package, one file per concern:
  config.py       TrainConfig, load_config (JSON + ``--set`` overrides)
  objective.py    masking schedule, masks, chain loss, fixed-mask validation loss
  prepare.py      tokenizer + packed chunks, the model to start from
  trainer.py      Trainer (the loop) and TrainState (what a checkpoint restores)
  checkpoints.py  run-folder checkpoints: atomic saves, no pickle, resume with fallback
  export.py       HF-format export (fsynced), export_run
  logs.py         train/valid CSV logs, loss.png, TensorBoard, progress bar
  cli.py          ``asarm train`` arguments and entry point

Output directory:
  prepared/            tokenizer + packed train/validation chunks (reused on resume)
  checkpoints/         step-XXXXXXX/ (model.safetensors, config.json, trainer_state.json +
                       trainer_state.safetensors), LATEST and BEST pointer files; only the last
                       and the best are kept
  train_log.csv        step, loss, lr, grad_norm, mask_low, mask_high, tokens, tokens_per_s, elapsed_s
  valid_log.csv        step, valid_loss, valid_ppl, valid_tokens
  loss.png, tb/        plot; TensorBoard scalars when tensorboard is installed
  model/               final HF-format export (config.json, model.safetensors, tokenizer files)
  metrics.json         final figures
"""

from .checkpoints import RunFolderError, load_checkpoint_weights, read_trainer_state, save_checkpoint
from .cli import add_arguments, add_cli, main, run_train_command
from .config import TrainConfig, load_config
from .export import export_model, export_run
from .logs import CSVLog, plot_losses, read_log
from .objective import chain_loss, evaluate, evaluate_sources, mask_range, sample_ranks
from .prepare import build_model, prepare_data
from .trainer import Trainer, TrainState, lr_factor, make_optimizer, train

__all__ = [
    "CSVLog", "RunFolderError", "TrainConfig", "TrainState", "Trainer", "add_arguments", "add_cli", "build_model",
    "chain_loss", "evaluate", "evaluate_sources", "export_model", "export_run", "load_checkpoint_weights",
    "load_config", "lr_factor", "main", "make_optimizer", "mask_range", "plot_losses", "prepare_data",
    "read_log", "read_trainer_state", "sample_ranks", "save_checkpoint", "train",
]
