"""fp32 vs bf16 vs int8 weight-only cached ASSD on CPU, against the memory-bandwidth floor.

    python scripts/bench_quantized.py [--length 512] [-k 5] [--repeats 2] [--threads 1]
        [--baseline-src DIR] [--out results/bench-cpu-quantized]

XLNet-base-sized random weights (seed 0), one row of L tokens with 95% hidden (uniformly random
positions and visible tokens), cached ASSD with self drafts, k = 5, left to right. Per variant:

- tokens/s of whole ``asarm.sample`` runs (public API; passes counted by ``SampleResult.nfe``),
  and seconds per pass of those runs;
- the model alone: median time of a fixed cached verify pass half-way through the run
  (``scripts/profile_cached_pass.py``'s ``CachedPass``: k + 1 new content rows, k queries);
- bytes of weights read per pass (``asarm.quantize.bytes_per_pass``), the copy bandwidth measured
  in this run (1 GiB ``copy_``, best of 3, before every measurement; the best is used), the floor
  = bytes / bandwidth, and the model pass as a multiple of the floor.

Each measurement runs in its own process (one model in memory at a time), variants interleaved,
``--repeats`` rounds. On a shared machine the load changes between measurements, so every
ratio is taken *within* a round (tokens/s vs the fp32 measured in the same round; pass time vs
the floor from the copy bandwidth measured just before it) and the table reports the median
over rounds of those ratios, next to the best absolute figures. ``--baseline-src DIR`` adds
"fp32 before": the same fp32 measurement with another source tree (e.g. ``git archive`` of the
commit before this work), run in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "bf16", "int8")


def weight_bytes(model) -> int:
    """``asarm.quantize.bytes_per_pass`` (repeated here so an older source tree can be measured)."""
    skip = (".r", ".r.int8", ".r.scale", "seg_embed", "r_s_bias")
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
               if n != "lm_loss.weight" and not n.endswith(skip))


def worker(variant: str, length: int, k: int, passes: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "scripts"))
    from asarm.sampling import sample
    from profile_cached_pass import CachedPass, build  # noqa: E402

    model = build(variant)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
    ids[ids == model.config.mask_token_id] = 0
    masked = torch.zeros(1, length, dtype=torch.bool)
    masked[0, torch.randperm(length, generator=g)[: round(0.95 * length)]] = True
    res = sample(model, ids, masked, method="assd", draft="self", k=k, seed=0)
    tokens, nfe = int(masked.sum()), int(res.nfe.sum())
    step = CachedPass(model, length, k)
    step()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return dict(variant=variant, tokens=tokens, passes=nfe, run_s=res.elapsed, tokens_per_s=tokens / res.elapsed,
                run_s_per_pass=res.elapsed / nfe, model_pass_s=times[len(times) // 2], model_pass_best_s=times[0],
                weight_bytes=weight_bytes(model), dtype=str(model.dtype), threads=torch.get_num_threads())


def run_worker(variant, src: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", variant, "--length", str(args.length), "-k", str(args.k),
           "--passes", str(args.passes), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def copy_bandwidth() -> float:
    sys.path.insert(0, str(ROOT / "src"))
    from asarm.quantize import copy_bandwidth as measure

    return measure()


def summarize(mine: list[dict], rounds: list[dict]) -> dict:
    """Best absolute figures of one variant and the median over rounds of its in-round ratios."""
    import statistics

    fp32 = {r["round"]: r for r in rounds if r["label"] == "fp32"}
    best = max(mine, key=lambda r: r["tokens_per_s"])
    out = dict(best)
    out.update(
        tokens_per_s=best["tokens_per_s"], best_model_pass_s=min(r["model_pass_s"] for r in mine),
        floor_multiple=statistics.median(r["floor_multiple"] for r in mine),
        speedup_vs_fp32=statistics.median(r["tokens_per_s"] / fp32[r["round"]]["tokens_per_s"] for r in mine),
        pass_speedup_vs_fp32=statistics.median(fp32[r["round"]]["model_pass_s"] / r["model_pass_s"] for r in mine),
        rounds=[{k: r[k] for k in ("round", "tokens_per_s", "model_pass_s", "copy_bandwidth", "floor_multiple")}
                for r in mine])
    return out


def markdown(records, bandwidth) -> str:
    lines = [f"Copy bandwidth: best {bandwidth / 1e9:.2f} GB/s over the run (measured before every measurement).", "",
             "| variant | tokens/s (best) | tokens/s vs fp32 (median of rounds) | model pass (best, ms) | "
             "pass speed vs fp32 | weights/pass (MiB) | floor at best bandwidth (ms) | pass / floor (median of rounds) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_fp32']:.2f}x | "
                     f"{r['best_model_pass_s'] * 1e3:.1f} | {r['pass_speedup_vs_fp32']:.2f}x | "
                     f"{r['weight_bytes'] / 2**20:.0f} | {r['weight_bytes'] / bandwidth * 1e3:.1f} | {r['floor_multiple']:.2f}x |")
    return "\n".join(lines)


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(labels, [r["tokens_per_s"] for r in records], color="tab:blue")
    axes[0].set_ylabel("cached ASSD tokens / s (L=512, 95% hidden, k=5)")
    axes[1].bar(labels, [r["floor_multiple"] for r in records], color="tab:orange")
    axes[1].axhline(1.0, color="black", lw=1)
    axes[1].axhline(2.0, color="gray", ls="--", lw=1, label="target for fp32: 2x")
    axes[1].set_ylabel("model pass / floor (weight bytes / copy bandwidth)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--passes", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--baseline-src", default=None)
    p.add_argument("--out", default=str(ROOT / "results/bench-cpu-quantized"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.length, args.k, args.passes, args.threads)))
        return 0

    jobs = [(v, v, ROOT / "src") for v in args.variants.split(",")]
    if args.baseline_src:
        jobs.insert(0, ("fp32 before", "fp32", Path(args.baseline_src).resolve()))
    rounds = []
    for round_ in range(args.repeats):
        for label, variant, src in jobs:
            bw = copy_bandwidth()
            r = run_worker(variant, src, args)
            r.update(label=label, round=round_, copy_bandwidth=bw, floor_s=r["weight_bytes"] / bw)
            r["floor_multiple"] = r["model_pass_s"] / r["floor_s"]
            rounds.append(r)
            print(f"round {round_} {label:12s} {r['tokens_per_s']:6.1f} tok/s  model pass {r['model_pass_s'] * 1e3:6.1f} ms  "
                  f"copy {bw / 1e9:.2f} GB/s  = {r['floor_multiple']:.2f}x floor", flush=True)
    bandwidths = [r["copy_bandwidth"] for r in rounds]
    bandwidth = max(bandwidths)
    records = [summarize([r for r in rounds if r["label"] == label], rounds) for label, _, _ in jobs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python " + " ".join(sys.argv), machine=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), threads=args.threads, length=args.length, k=args.k, hidden="95%",
                copy_bandwidths=bandwidths, copy_bandwidth=bandwidth, load_average=os.getloadavg(),
                rounds=rounds,
                note="shared machine: other sessions ran on the same 2 cores during the run")
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, records=records), indent=2))
    table = markdown(records, bandwidth)
    (out / "bench.md").write_text(table + "\n")
    plot(records, out / "bench.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
