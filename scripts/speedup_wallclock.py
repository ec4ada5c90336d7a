"""Wall-clock of exact ASSD configurations against sequential decoding, side by side in one run.

    OMP_NUM_THREADS=1 python scripts/speedup_wallclock.py [--model asarm-en-small] [--dtype bf16]
        [--windows 4] [--repeats 3] [--only NAME,NAME] [--out results/multi-draft/wallclock-bf16]

Rows: ``--windows`` consecutive 128-token windows of the WikiText-2 test text, 95% of each hidden
(``asarm bench``'s inputs, its seed), one row at a time, one torch thread. Each repeat decodes
every window with every configuration (``asarm.sampling.speedup_configs``, picked by name with
``--only``; sequential always), the configurations in a rotated order, so a slow spell of a
shared machine hits all of them alike (each window is decoded by every configuration back to
back); a warm-up decode of the first window comes before. Reported per configuration: tokens/s
over all windows (median over repeats), its speed against sequential (the median over windows
and repeats of the sequential run's time on the same window in the same repeat over its own),
passes per token and tokens per round over all windows (the same in every repeat: fixed seeds). Written as JSON and Markdown to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import asarm
from asarm.bench.samplers import make_inputs, read_text_file
from asarm.sampling import DecodeConfig, sample, speedup_configs
from asarm.tokenization import encode

DEFAULT_ONLY = ("assd-self-k5,assd-self-k5+one-pass,assd-self-k5+one-pass+3-branches,assd-head-k5,"
                "assd-head-k5+3-branches,assd-head-k5+one-pass,assd-head-k5+one-pass+3-branches")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="asarm-en-small")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--text-file", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/test.txt.gz"))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=DEFAULT_ONLY, help="configuration names (DecodeConfig.name), comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/multi-draft/wallclock-bf16")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = asarm.load_model(args.model, dtype=args.dtype)
    corpus = torch.tensor(encode(model.tokenizer, read_text_file(args.text_file)))
    ids, masked = make_inputs("95%", 128, model.config.vocab_size, model.config.mask_token_id, args.windows, args.seed,
                              corpus)
    wanted = args.only.split(",")
    configs = [DecodeConfig("sequential", k=1)] + [c for c in speedup_configs(5) if c.name in wanted]
    missing = set(wanted) - {c.name for c in configs}
    if missing:
        raise SystemExit(f"unknown configuration names: {', '.join(sorted(missing))}")

    def decode(config: DecodeConfig, window: int):
        start = time.perf_counter()
        result = sample(model, ids[window], masked[window], config=config, seed=args.seed + window)
        return time.perf_counter() - start, result

    decode(configs[0], 0)  # warm-up: first-call costs (kernel selection, packing) are not a configuration's
    seconds = {c.name: [[0.0] * args.windows for _ in range(args.repeats)] for c in configs}
    counts = {}
    for repeat in range(args.repeats):
        for window in range(args.windows):  # every configuration on one window back to back: a slow spell hits all
            shift = (repeat * args.windows + window) % len(configs)
            for config in configs[shift:] + configs[:shift]:
                elapsed, result = decode(config, window)
                seconds[config.name][repeat][window] = elapsed
                counts[(config.name, window)] = (int(result.nfe), int(result.rounds))
    tokens = int(masked.sum())
    rows = []
    for config in configs:
        nfe = sum(counts[(config.name, w)][0] for w in range(args.windows))
        rounds = sum(counts[(config.name, w)][1] for w in range(args.windows))
        runs = seconds[config.name]
        # the ratio per window and repeat: the same window's sequential run, a few seconds apart
        ratios = [seconds["sequential"][r][w] / runs[r][w] for r in range(args.repeats) for w in range(args.windows)]
        rows.append(dict(config=config.name, label=config.label,
                         tokens_per_s=tokens / statistics.median(sum(run) for run in runs),
                         vs_sequential=statistics.median(ratios), passes_per_token=nfe / tokens,
                         tokens_per_round=tokens / rounds, seconds=runs))
    meta = dict(model=args.model, dtype=args.dtype, threads=torch.get_num_threads(), windows=args.windows,
                repeats=args.repeats, hidden_tokens=tokens, load_average=os.getloadavg(), commit=_commit())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wallclock.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [f"{args.model} ({args.dtype}), {meta['threads']} thread, {args.windows} WikiText-2 windows of 128 tokens, "
             f"95% hidden ({tokens} tokens), {args.repeats} repeats, medians; commit {meta['commit']}; load average "
             f"after the run {meta['load_average'][0]:.2f} / {meta['load_average'][1]:.2f}", "",
             "| configuration | tokens/s | vs sequential, same window and repeat | passes/token | tokens/round |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['vs_sequential']:.2f}× | {r['passes_per_token']:.3f} | "
              f"{r['tokens_per_round']:.2f} |" for r in rows]
    (out / "wallclock.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
