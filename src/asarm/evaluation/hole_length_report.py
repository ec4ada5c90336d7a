"""Summary, table and posterior plot of a ``--hole-length`` run (see ``hole_length``)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import RECORD_GLOB, mean_ci, proportion_ci, read_records
from ..lengths import prior_from_counts
from .hole_length import PRIORS, mode_names, posterior

METRICS = {"rocstories": ("rouge1", "rouge2", "rougeL"), "humaneval-infilling": ("passed",)}


def _p_true(rec, factorization, prior) -> float:
    n = rec["true_length"]
    if n > len(rec["fits"]):
        return 0.0
    return float(posterior(rec["loglik"][factorization], prior, rec["fits"])[n - 1])


def summarize(records: list[dict], meta: dict, prior: list[float]) -> dict:
    task = meta["task"]
    rows = {}
    for mode in mode_names():
        chosen = [r["lengths"][mode] for r in records]
        errors = [abs(c - r["true_length"]) for c, r in zip(chosen, records)]
        fills = [r["fills"][str(c)] for c, r in zip(chosen, records)]
        row = {"exact": proportion_ci(sum(e == 0 for e in errors), len(errors)), "mae": mean_ci(errors),
               "mean_length": mean_ci(chosen)}
        for m in METRICS[task]:
            if m == "passed":
                row["pass@1"] = proportion_ci(sum(bool(f.get("passed")) for f in fills), len(fills))
            else:
                row[m] = mean_ci([f[m] for f in fills])
        if mode.startswith("posterior/"):
            _, fact, pname = mode.split("/")
            row["p_true"] = mean_ci([_p_true(r, fact, prior if pname == "learned" else None) for r in records])
        rows[mode] = row
    max_len = meta["candidates"][1]
    in_range = [r for r in records if r["true_length"] <= max_len]
    rows["prior-mode"]["p_true"] = mean_ci([prior[r["true_length"] - 1] if r in in_range else 0.0 for r in records])
    return {"task": task, "model": meta.get("model"), "examples": len(records), "fixed_length": meta["fixed_length"],
            "prior_mode": meta["prior_mode"], "candidates": meta["candidates"], "uniform_p_true": 1.0 / max_len,
            "true_length_mean": mean_ci([r["true_length"] for r in records]), "modes": rows}


def _fmt(cell, scale=1.0, digits=2) -> str:
    if cell is None or cell.get("mean") is None:
        return "–"
    ci = cell.get("ci95")
    return f"{cell['mean'] * scale:.{digits}f}" + (f" ± {ci * scale:.{digits}f}" if ci is not None else "")


def table(summary: dict) -> str:
    task = summary["task"]
    metric_cols = ["ROUGE-1", "ROUGE-2", "ROUGE-L"] if task == "rocstories" else ["pass@1 (%)"]
    head = ["length chosen by", "exact length (%)", "MAE (tokens)", "mean p(true length)", *metric_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, row in summary["modes"].items():
        label = {"oracle": "oracle (true length)", "fixed": f"fixed (mean answer length, {summary['fixed_length']})",
                 "prior-mode": f"learned prior's mode ({summary['prior_mode']})"}.get(mode, mode)
        metrics = ([_fmt(row[m]) for m in ("rouge1", "rouge2", "rougeL")] if task == "rocstories"
                   else [_fmt(row["pass@1"], 100, 1)])
        lines.append("| " + " | ".join([label, _fmt(row["exact"], 100, 1), _fmt(row["mae"]),
                                        _fmt(row.get("p_true"), 1, 3), *metrics]) + " |")
    return "\n".join(lines)


def write_report(out_dir) -> dict:
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    prior = prior_from_counts(json.loads((out_dir / "prior.json").read_text())["counts"])
    by_index = {int(r["index"]): r for r in read_records(sorted(out_dir.glob(RECORD_GLOB)))}  # every shard's
    records = [by_index[i] for i in sorted(by_index)]
    summary = summarize(records, meta, prior)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = (f"# {summary['task']}: hole length without the oracle ({summary['model']}, {summary['examples']} examples)\n\n"
          f"Candidates {summary['candidates'][0]}..{summary['candidates'][1]} tokens; uniform prior's p(true length) = "
          f"{summary['uniform_p_true']:.3f}; true length {_fmt(summary['true_length_mean'])} tokens on average. "
          f"Decoding: {meta['decoding']}.\n\n" + table(summary) + "\n")
    (out_dir / "summary.md").write_text(md)
    if records:
        plot_posteriors(records[:4], prior, out_dir / "posteriors.png", summary["task"])
    return summary


def plot_posteriors(records, prior, path, title) -> None:
    """A few examples' posteriors (length on x, probability on y), the true length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(4 * len(records), 3.2), squeeze=False)
    for ax, r in zip(axes[0], records):
        xs = list(range(1, len(r["fits"]) + 1))
        for fact in r["loglik"]:
            for pname in PRIORS:
                post = posterior(r["loglik"][fact], prior if pname == "learned" else None, r["fits"])
                ax.plot(xs, post.tolist(), label=f"{fact}, {pname} prior", lw=1.2)
        ax.plot(xs, prior, "k:", lw=1, label="learned prior")
        ax.axvline(r["true_length"], color="red", ls="--", lw=1, label="true length")
        ax.set_title(f"{r['id']}", fontsize=8)
        ax.set_xlabel("hole length (tokens)")
    axes[0][0].set_ylabel("posterior probability")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"{title}: length posteriors", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
