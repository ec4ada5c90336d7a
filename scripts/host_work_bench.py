"""Host work per pass of the engine, a baseline commit's sampling code against the current one,
side by side in one process, one torch thread.

    OMP_NUM_THREADS=1 python scripts/host_work_bench.py [--baseline 9fe234a] [--model asarm-en-small]
        [--dtype auto] [--seeds 4] [--repeats 2] [--out results/host-work]

The baseline's ``src/asarm/sampling`` is read with ``git show`` and imported as
``asarm.sampling_baseline``: it runs on the same model object, the same exact cache and the same
fast pass, so only the host code of a round differs (plans, target distributions, draws,
verification, outcomes, row bookkeeping). The row is ``asarm bench --suite pass``'s (``PROMPT``:
a 40-token prompt + 80 hidden tokens). Seed after seed, every sampler in turn, both codes decode
the same row with the same seed, taking turns at going first, so a slow spell of a shared
machine hits every configuration alike. Per run: ``Engine.forward_seconds`` (the model's ``forward_rows``) and
``Engine.step_seconds`` (whole passes); host work = step - forward. Reported per sampler and
code: medians over runs of ms of forward per pass, ms of host work per pass, tokens/s of whole
runs (``add`` included), passes per token, and whether the two codes decoded the same tokens
(they must: the host changes keep every draw).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import asarm
from asarm.bench.passes import PROMPT
from asarm.sampling import DecodeConfig
from asarm.sampling.engine import Engine
from asarm.tokenization import encode

SAMPLERS = {
    "sequential": dict(method="sequential"),
    "ASSD k=5": dict(method="assd", k=5),
    "ASSD k=5 + bonus": dict(method="assd", k=5, bonus=True),
    "ASSD n-gram k=5": dict(method="assd", draft="ngram", k=5),
    "ASSD one-pass k=5": dict(method="assd", k=5, one_pass=True),
    "ASSD one-pass adaptive k": dict(method="assd", k=5, one_pass=True, adaptive_k=True),
    "ASSD draft head k=5": dict(method="assd", draft="head", k=5),  # needs a model with a draft head
    "ASSD draft head one-pass k=5": dict(method="assd", draft="head", k=5, one_pass=True),
}


def load_baseline(commit: str):
    """The Engine class of ``commit``'s src/asarm/sampling, imported as asarm.sampling_baseline
    (its relative imports of asarm's other modules resolve to the current ones)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    files = subprocess.run(git + ["ls-tree", "--name-only", commit, "src/asarm/sampling/"], capture_output=True,
                           text=True, check=True).stdout.split()
    folder = Path(tempfile.mkdtemp(prefix="asarm-sampling-baseline-"))
    for f in files:
        text = subprocess.run(git + ["show", f"{commit}:{f}"], capture_output=True, text=True, check=True).stdout
        (folder / Path(f).name).write_text(text)
    name = "asarm.sampling_baseline"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    from asarm.sampling_baseline.config import DecodeConfig as BaselineConfig
    from asarm.sampling_baseline.engine import Engine as BaselineEngine

    return BaselineEngine, BaselineConfig


def run_once(engine_cls, config_cls, model, ids, masked, options: dict, seed: int) -> dict:
    start = time.perf_counter()
    engine = engine_cls(model)
    handle = engine.add(ids, masked, config_cls(**options), seed=seed)
    engine.run()
    seconds = time.perf_counter() - start
    passes, hidden = handle.row.nfe, int(masked.sum())
    return dict(forward_ms=1000 * engine.forward_seconds / passes,
                host_ms=1000 * (engine.step_seconds - engine.forward_seconds) / passes,
                tokens_per_s=hidden / seconds, passes_per_token=passes / hidden, tokens=handle.row.tokens.tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="9fe234a", help="the commit whose sampling code is the 'before'")
    p.add_argument("--model", default="asarm-en-small")
    p.add_argument("--dtype", default="auto", help="the model's dtype (auto: bf16 on CPUs with native bf16)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="runs per (sampler, code, seed)")
    p.add_argument("--only", default=None, help="comma-separated substrings of sampler names")
    p.add_argument("--out", default=None, help="folder for host-work.json and host-work.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    codes = {"before": load_baseline(args.baseline), "after": (Engine, DecodeConfig)}
    model = asarm.load_model(args.model, device="cpu", dtype=args.dtype)
    prompt = torch.tensor(encode(model.tokenizer, PROMPT))[:40]
    ids = torch.cat([prompt, torch.full((80,), model.config.mask_token_id)])
    masked = torch.zeros(len(ids), dtype=torch.bool)
    masked[len(prompt):] = True
    samplers = {k: v for k, v in SAMPLERS.items()
                if args.only is None or any(s in k for s in args.only.split(","))}
    runs = {(s, c): [] for s in samplers for c in codes}
    same = {s: True for s in samplers}
    for name, options in samplers.items():  # warm-up
        for code in codes.values():
            run_once(*code, model, ids, masked, options, 0)
    turn = 0
    for seed in range(args.seeds):
        for _ in range(args.repeats):
            for name, options in samplers.items():
                order = list(codes) if turn % 2 == 0 else list(codes)[::-1]
                turn += 1
                results = {c: run_once(*codes[c], model, ids, masked, options, seed) for c in order}
                same[name] &= results["before"]["tokens"] == results["after"]["tokens"]
                for c, r in results.items():
                    runs[name, c].append(r)
        print(f"seed {seed}: done", flush=True)
    records = []
    for (name, code), rs in runs.items():
        rec = dict(sampler=name, code=code, same_tokens=same[name])
        for key in ("forward_ms", "host_ms", "tokens_per_s", "passes_per_token"):
            rec[key] = statistics.median(r[key] for r in rs)
        rec["host_share"] = rec["host_ms"] / (rec["host_ms"] + rec["forward_ms"])
        records.append(rec)
    seq = {c: next(r["tokens_per_s"] for r in records if r["code"] == c and r["sampler"] == "sequential")
           for c in codes} if "sequential" in samplers else None
    lines = ["| sampler | code | forward ms/pass | host ms/pass | host share | passes/token | tokens/s | "
             "vs sequential, same code | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ratio = f"{r['tokens_per_s'] / seq[r['code']]:.2f}x" if seq else "-"
        lines.append(f"| {r['sampler']} | {r['code']} | {r['forward_ms']:.2f} | {r['host_ms']:.3f} | "
                     f"{100 * r['host_share']:.0f}% | {r['passes_per_token']:.3f} | {r['tokens_per_s']:.1f} | {ratio} | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    load = os.getloadavg()
    header = (f"{args.model} ({args.dtype}), 1 thread, before = {args.baseline}'s sampling code, after = this checkout; "
              f"{args.seeds} seeds x {args.repeats} runs, medians; load average {load[0]:.1f} / {load[1]:.1f}")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(command=" ".join(sys.argv), torch=torch.__version__, load_average=load, **vars(args))
        (out / "host-work.json").write_text(json.dumps(dict(meta=meta, records=records), indent=2))
        (out / "host-work.md").write_text(text)


if __name__ == "__main__":
    main()
