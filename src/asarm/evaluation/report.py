"""Summaries of evaluation records: JSON, a markdown table beside the paper's numbers, k-sweep plots,
and ``merge`` of sharded runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import InputError
from .common import RECORD_GLOB, config_label, dedupe, mean_ci, proportion_ci, read_meta, read_records

COMMON_METRICS = ("nfe", "draft_calls", "rounds", "tokens_per_round", "passes_per_token", "elapsed_s",
                  "generated_tokens")
TASK_METRICS = {
    "wikitext": ("gen_ppl", "entropy_generated_bits", "entropy_sequence_bits", "entropy_eval_tokens_bits"),
    "rocstories": ("rouge1", "rouge2", "rougeL"),
    "humaneval-infilling": (),
}
PROPORTIONS = {"humaneval-infilling": {"pass@1": "passed", "exact_match": "exact_match"}}
# metric shown on the quality axis of the k-sweep plot, and its label
QUALITY = {"wikitext": ("gen_ppl", "generative perplexity"), "rocstories": ("rouge1", "ROUGE-1 (x100)"),
           "humaneval-infilling": ("pass@1", "pass@1 (%)")}

# quality metrics compared pairwise with sequential decoding
PAIRED = {"wikitext": ("gen_ppl", "entropy_sequence_bits"), "rocstories": ("rouge1", "rouge2", "rougeL"),
          "humaneval-infilling": ("pass@1",)}

PAPER_MODEL = "paper (XLNet-base AS-ARM, a different model)"
PAPER = {
    "wikitext": [
        {"row": "sequential", "gen_ppl": 107.9, "entropy": 7.65, "nfe": 486, "draft_calls": None, "tokens_per_round": None, "time_s": 18.21},
        {"row": "ASSD n-gram draft, k=5", "gen_ppl": 111.7, "entropy": 7.64, "nfe": 422, "draft_calls": 422, "tokens_per_round": None, "time_s": 16.80},
        {"row": "ASSD self-draft, k=5", "gen_ppl": 107.6, "entropy": 7.64, "nfe": 434, "draft_calls": None, "tokens_per_round": 2.24, "time_s": 16.50},
    ],
    "rocstories": [
        {"row": "ASSD (AS-ARM)", "rouge1": 18.0},
        {"row": "DiffuGPT-S (as cited by the paper)", "rouge1": 16.4},
    ],
    "humaneval-infilling": [
        {"row": "ASSD (AS-ARM), single-line", "pass@1": 38.59},
        {"row": "DiffuLLaMA 6.7B (as cited by the paper), single-line", "pass@1": 40.68},
    ],
}
PAPER_NOTES = {
    "wikitext": "paper: WikiText-2 test, 512-token sequences, 95% hidden, k=5, A4000 GPU; gen-PPL under gpt2-large; "
                "entropy = mean per-sequence unigram entropy (bits) of the whole decoded sequence in GPT-2 tokens.",
    "rocstories": "paper: first 1,000 stories, sentence 3 hidden with its true token length (protocol of DiffuLLaMA).",
    "humaneval-infilling": "paper: HumanEval single-line infilling, true middle length given, pass@1.",
}


def _config_order(name: str):
    if name == "sequential":
        return (0, 0, "", 0, 0, "")
    base, *variants = name.split("+")  # assd-<draft>-k<k>[+variant...]
    parts = base.split("-")
    try:
        draft_rank = {"self": 0, "ngram": 1}.get(parts[1], 2)  # the paper's self-draft first
        return (1, draft_rank, parts[1], int(parts[2][1:]), len(variants), "+".join(variants))
    except (IndexError, ValueError):
        return (2, 0, name, 0, 0, "")


ELAPSED_NOTE = {
    "sample": "elapsed_s: wall-clock of the batch's sampling call divided by its rows (evaluation and scoring excluded)",
    "batch path": "elapsed_s: a row's wall-clock in the batch path's engine, from joining to its last pass, "
                  "sharing every pass with up to max_batch rows: a latency, not a cost per example",
}


def summarize(meta: dict, records: list[dict]) -> dict:
    task = meta["task"]
    by_config: dict[str, list[dict]] = {}
    for r in records:
        by_config.setdefault(r["config"], []).append(r)
    configs = {}
    for name in sorted(by_config, key=_config_order):
        recs = by_config[name]
        first = recs[0]
        metrics = {}
        for key in COMMON_METRICS + TASK_METRICS.get(task, ()):
            vals = [r.get(key) for r in recs if r.get(key) is not None]
            if vals:
                metrics[key] = mean_ci(vals)
        tokens = sum(r.get("generated_tokens") or 0 for r in recs)
        rounds = sum(r.get("rounds") or 0 for r in recs)
        nfe = sum(r.get("nfe") or 0 for r in recs)
        metrics["tokens_per_round_pooled"] = {"mean": tokens / rounds if rounds else None, "ci95": None, "n": len(recs)}
        metrics["passes_per_token_pooled"] = {"mean": nfe / tokens if tokens else None, "ci95": None, "n": len(recs)}
        for key, field in PROPORTIONS.get(task, {}).items():
            ok = sum(1 for r in recs if r.get(field))
            p = proportion_ci(ok, len(recs))
            metrics[key] = {k: (100 * v if isinstance(v, float) and k != "n" else v) for k, v in p.items()}
        configs[name] = {"method": first.get("method"), "draft": first.get("draft"), "k": first.get("k"),
                         "variants": first.get("variants") or [],
                         "label": _label(first), "n": len(recs), "metrics": metrics}
    # Exact samplers draw the same distribution: paired differences against sequential (same
    # examples, same hidden positions) should be centred on zero.
    seq = {int(r["index"]): r for r in by_config.get("sequential", [])}
    if seq:
        for name, c in configs.items():
            if name == "sequential":
                continue
            diffs = {}
            for key in PAIRED.get(task, ()):
                field = PROPORTIONS.get(task, {}).get(key, key)
                vals = [float(r[field]) - float(seq[int(r["index"])][field]) for r in by_config[name]
                        if int(r["index"]) in seq and r.get(field) is not None
                        and seq[int(r["index"])].get(field) is not None]
                if vals:
                    st = mean_ci(vals)
                    if key in PROPORTIONS.get(task, {}):
                        st = {k: (100 * v if isinstance(v, float) else v) for k, v in st.items()}
                    diffs[key] = st
            c["paired_vs_sequential"] = diffs
    return {
        "task": task,
        "settings": meta.get("settings"),
        "model": meta.get("model"),
        "seed": meta.get("seed"),
        "batch_size": meta.get("batch_size"),
        "temperature": meta.get("temperature"),
        "runtime": meta.get("runtime"),
        "configs": configs,
        "paper": PAPER.get(task, []),
        "paper_note": PAPER_NOTES.get(task),
        "notes": [
            "mean +- half-width of the 95% confidence interval over examples (Student t; Wilson for pass@1)",
            ELAPSED_NOTE["batch path" if (meta.get("runtime") or {}).get("decoding") else "sample"],
            "nfe counts every network pass, draft passes included; draft_calls counts self-draft passes or n-gram proposals",
        ],
    }


def _label(rec: dict) -> str:
    return config_label(rec.get("method"), rec.get("draft"), rec.get("k"), rec.get("variants") or [])


def _fmt(stat: dict | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    m = stat["mean"]
    if stat.get("ci95") is None or not math.isfinite(stat["ci95"]):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {stat['ci95']:.{digits}f}"


def _p(value, digits=2) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def markdown(summary: dict) -> str:
    task = summary["task"]
    model = summary.get("model") or {}
    settings = summary.get("settings") or {}
    rt = summary.get("runtime") or {}
    lines = [f"# asarm eval {task}", ""]
    lines.append(f"Model: `{model.get('model')}`" + (f" (revision {model.get('revision')})" if model.get("revision") else "")
                 + f", {model.get('parameters', '?')} parameters, {model.get('dtype')}; seed {summary.get('seed')}, "
                 f"batch size {summary.get('batch_size')}, temperature {summary.get('temperature')}"
                 + (f"; {rt.get('device')}, {rt.get('threads')} torch thread(s)." if rt else "."))
    lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "evaluator_label") + ".")
    lines.append("")
    rows = summary["configs"]
    if task == "wikitext":
        ppl_label = settings.get("evaluator_label") or "gen-PPL"
        lines.append(f"Perplexity column: **{ppl_label}**.")
        lines.append("")
        head = ["decoding", "n", "gen-PPL", "entropy seq. (bits)", "entropy gen. (bits)", "NFE", "draft calls",
                "tokens/round", "passes/token", "time (s)"]
        lines += [_row(head), _row(["---"] * len(head))]
        for c in rows.values():
            m = c["metrics"]
            lines.append(_row([c["label"], c["n"], _fmt(m.get("gen_ppl")), _fmt(m.get("entropy_sequence_bits")),
                               _fmt(m.get("entropy_generated_bits")), _fmt(m.get("nfe"), 1), _fmt(m.get("draft_calls"), 1),
                               _fmt(m.get("tokens_per_round")), _fmt(m.get("passes_per_token"), 3), _fmt(m.get("elapsed_s"))]))
        for p in PAPER["wikitext"]:
            lines.append(_row([f"{PAPER_MODEL}: {p['row']}", "", _p(p["gen_ppl"], 1), _p(p["entropy"]), "", _p(p["nfe"]),
                               _p(p["draft_calls"]), _p(p["tokens_per_round"]), "", _p(p["time_s"]) + " (A4000)"]))
        if any("entropy_eval_tokens_bits" in c["metrics"] for c in rows.values()):
            lines += ["", "Entropy over the evaluator's tokens (the paper's definition): " + ", ".join(
                f"{c['label']}: {_fmt(c['metrics'].get('entropy_eval_tokens_bits'))}" for c in rows.values())]
    elif task == "rocstories":
        head = ["decoding", "n", "ROUGE-1", "ROUGE-2", "ROUGE-L", "NFE", "tokens/round", "passes/token", "time (s)"]
        lines += [_row(head), _row(["---"] * len(head))]
        for c in rows.values():
            m = c["metrics"]
            lines.append(_row([c["label"], c["n"], _fmt(m.get("rouge1")), _fmt(m.get("rouge2")), _fmt(m.get("rougeL")),
                               _fmt(m.get("nfe"), 1), _fmt(m.get("tokens_per_round")), _fmt(m.get("passes_per_token"), 3),
                               _fmt(m.get("elapsed_s"), 3)]))
        for p in PAPER["rocstories"]:
            lines.append(_row([f"{PAPER_MODEL}: {p['row']}" if "AS-ARM" in p["row"] else f"paper: {p['row']}", "",
                               _p(p["rouge1"], 1), "", "", "", "", "", ""]))
    else:
        head = ["decoding", "n", "pass@1 (%)", "95% CI", "exact match (%)", "NFE", "tokens/round", "passes/token", "time (s)"]
        lines += [_row(head), _row(["---"] * len(head))]
        for c in rows.values():
            m = c["metrics"]
            p = m.get("pass@1") or {}
            ci = f"[{p['low']:.1f}, {p['high']:.1f}]" if p.get("low") is not None else "–"
            lines.append(_row([c["label"], c["n"], _p(p.get("mean")), ci, _p((m.get("exact_match") or {}).get("mean")),
                               _fmt(m.get("nfe"), 1), _fmt(m.get("tokens_per_round")), _fmt(m.get("passes_per_token"), 3),
                               _fmt(m.get("elapsed_s"), 3)]))
        for p in PAPER["humaneval-infilling"]:
            who = f"{PAPER_MODEL}: {p['row']}" if "AS-ARM" in p["row"] else f"paper: {p['row']}"
            lines.append(_row([who, "", _p(p["pass@1"]), "", "", "", "", "", ""]))
    paired = [(c["label"], c.get("paired_vs_sequential") or {}) for c in rows.values() if c.get("paired_vs_sequential")]
    if paired:
        lines += ["", "Paired difference from sequential decoding on the same examples (exact samplers: "
                      "expected 0 within the interval):", ""]
        for label, d in paired:
            lines.append(f"- {label}: " + ", ".join(f"Δ{k} = {_fmt(v)}" for k, v in d.items()))
    lines += ["", f"_{PAPER_NOTES.get(task, '')}_", ""]
    lines += [f"- {n}" for n in summary.get("notes", [])]
    return "\n".join(lines) + "\n"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def plot_sweep(summary: dict, path: Path) -> bool:
    """quality and passes per token against k for each ASSD draft (sequential as a reference
    line). Returns False (no file) when the run has fewer than two k values."""
    task = summary["task"]
    qkey, qlabel = QUALITY[task]
    series: dict[str, list[tuple[int, dict]]] = {}
    for c in summary["configs"].values():
        if c["method"] == "assd":
            key = "+".join([c["draft"]] + list(c.get("variants") or []))
            series.setdefault(key, []).append((int(c["k"]), c["metrics"]))
    if not any(len(v) >= 2 for v in series.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    seq = summary["configs"].get("sequential")
    for draft, pts in sorted(series.items()):
        pts.sort(key=lambda t: t[0])
        ks = [k for k, _ in pts]
        for ax, key in ((axes[0], qkey), (axes[1], "passes_per_token")):
            ys = [(m.get(key) or {}).get("mean") for _, m in pts]
            es = [(m.get(key) or {}).get("ci95") or 0.0 for _, m in pts]
            if all(y is None for y in ys):
                continue
            ax.errorbar(ks, [y if y is not None else float("nan") for y in ys], yerr=es, marker="o", capsize=3,
                        label=f"ASSD {draft}-draft")
    if seq is not None:
        for ax, key in ((axes[0], qkey), (axes[1], "passes_per_token")):
            y = (seq["metrics"].get(key) or {}).get("mean")
            if y is not None:
                ax.axhline(y, color="gray", linestyle="--", label="sequential")
    axes[0].set_ylabel(qlabel)
    axes[1].set_ylabel("network passes per generated token")
    for ax in axes:
        ax.set_xlabel("k (draft block size)")
        ax.set_xticks(sorted({k for pts in series.values() for k, _ in pts}))
        ax.legend()
        ax.grid(alpha=0.3)
    model = (summary.get("model") or {}).get("model")
    fig.suptitle(f"asarm eval {task} ({model})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(out_dir, records: list[dict], suffix: str = "") -> dict:
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    summary = summarize(meta, records)
    (out_dir / f"summary{suffix}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out_dir / f"summary{suffix}.md").write_text(markdown(summary))
    plot = out_dir / f"sweep_k{suffix}.png"
    if plot_sweep(summary, plot):
        summary["plot"] = str(plot)
    return summary


def merge(out_dir) -> dict:
    """Combine every ``records*.jsonl`` of a folder (the shards of one run) into records.jsonl and
    write the summary, table and plots of the whole run."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: no such folder")
    read_meta(out_dir)
    files = sorted(out_dir.glob(RECORD_GLOB))
    if not files:
        raise InputError(f"{out_dir}: no records*.jsonl files to merge")
    records = dedupe(read_records(files))
    tmp = out_dir / "records.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(out_dir / "records.jsonl")
    return write_reports(out_dir, records)
