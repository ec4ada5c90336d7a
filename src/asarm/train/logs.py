"""What a run reports while it trains (rank 0 only): ``train_log.csv``, ``valid_log.csv``,
``loss.png``, TensorBoard scalars in ``tb/`` when tensorboard is installed, and a progress bar."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

from .checkpoints import write_text_atomic, writing

TRAIN_FIELDS = ["step", "loss", "lr", "grad_norm", "mask_low", "mask_high", "tokens", "tokens_per_s", "elapsed_s"]
VALID_FIELDS = ["step", "valid_loss", "valid_ppl", "valid_tokens"]


class CSVLog:
    """Append-only CSV; on resume rows after the checkpoint's step are dropped (the rewrite is
    atomic, so a full disk cannot cost the rows already logged)."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None):
        self.path, self.fields = path, fields
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:  # a row cut short by a crash has empty fields: dropped
                rows = [r for r in csv.DictReader(f)
                        if None not in r.values() and r["step"].isdigit() and int(r["step"]) <= resume_step]
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=fields, lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
        with writing(str(path)):
            write_text_atomic(path, text.getvalue())
        self.rows = rows

    def write(self, row: dict) -> None:
        with writing(str(self.path)), open(self.path, "a", newline="") as f:
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
    # one panel per x axis: tokens seen and training minutes (summed over resumed sessions)
    by_step = {int(r["step"]): r for r in train_rows}
    axes_x = (("tokens", 1e-6, "tokens seen (millions)"), ("elapsed_s", 1 / 60, "training time (minutes)"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (field, scale, label) in zip(axes, axes_x):
        if train_rows and field in train_rows[0]:
            ax.plot([float(r[field]) * scale for r in train_rows], [float(r["loss"]) for r in train_rows],
                    label="train (current masking rate)", lw=0.8)
            valid = [r for r in valid_rows if int(r["step"]) in by_step]
            ax.plot([float(by_step[int(r["step"])][field]) * scale for r in valid],
                    [float(r["valid_loss"]) for r in valid], "o-", label="validation (85-99% hidden, fixed masks)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy per hidden token (nats)")
    axes[0].legend()
    fig.tight_layout()
    try:
        with writing(str(out_dir / "loss.png")):
            fig.savefig(out_dir / "loss.png", dpi=100)
    finally:
        plt.close(fig)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    with writing(str(out_dir / "tb")):
        return SummaryWriter(str(out_dir / "tb"))


def _progress_bar(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)


class RunLogs:
    """The logs of one run; ``resume_step`` (None for a fresh run) trims rows a resumed run
    will log again. Tokens/s is measured over the steps since the last logged one."""

    def __init__(self, out_dir: Path, resume_step: int | None, total_steps: int):
        self.out_dir = out_dir
        trim = -1 if resume_step is None else resume_step
        self.train = CSVLog(out_dir / "train_log.csv", TRAIN_FIELDS, trim)
        self.valid = CSVLog(out_dir / "valid_log.csv", VALID_FIELDS, trim)
        self.tb = _tensorboard(out_dir)
        self.progress = _progress_bar(total_steps, resume_step or 0)
        self.window_tokens, self.window_t = 0, time.time()

    def step(self, step: int, tokens: int, row: dict | None) -> None:
        """Count ``tokens``; when ``row`` is given (a logging step) write it with tokens/s."""
        self.window_tokens += tokens
        if row is not None:
            now = time.time()
            tps = self.window_tokens / max(now - self.window_t, 1e-9)
            self.window_tokens, self.window_t = 0, now
            self.train.write({**row, "tokens_per_s": round(tps, 1)})
            if self.tb is not None:
                self.tb.add_scalar("train/loss", float(row["loss"]), step)
                self.tb.add_scalar("train/lr", float(row["lr"]), step)
                self.tb.add_scalar("train/tokens_per_s", tps, step)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{float(row['loss']):.3f}", lr=f"{float(row['lr']):.2e}",
                                          tok_s=f"{tps:.0f}", refresh=False)
        if self.progress is not None:
            self.progress.update(1)

    def validation(self, step: int, res: dict) -> None:
        self.valid.write({"step": step, "valid_loss": repr(res["loss"]), "valid_ppl": repr(res["ppl"]),
                          "valid_tokens": res["tokens"]})
        if self.tb is not None:
            self.tb.add_scalar("valid/loss", res["loss"], step)
            self.tb.add_scalar("valid/ppl", res["ppl"], step)
        plot_losses(self.out_dir, self.train.rows, self.valid.rows)

    def best_validation(self) -> dict | None:
        rows = self.valid.rows
        return min(rows, key=lambda r: float(r["valid_loss"])) if rows else None

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tb is not None:
            self.tb.close()
