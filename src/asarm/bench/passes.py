"""``asarm bench --suite pass``: what one cached pass costs against its rows, per build, and what
that makes of every sampler's tokens/s — all side by side in one process.

Builds: eager fp32 (the reference: today's default pass before the fast pass), the fast pass in
fp32, eager and fast bf16, eager and fast int8 (bf16 activations). For each model:

1. **Pass against rows.** A row of ``length`` positions, half of them already in the cache, then
   passes with ``rows`` query rows and ``max(rows - 1, 1)`` new content rows (a verify pass with
   rows - 1 drafts; rows = 1 is a sequential pass). Every build is timed in turn, round after
   round, so slow drifts of the machine hit all builds alike; the median pass of each is kept.
   Beside it, the weight-streaming floor: bytes of weights one pass reads / a plain copy's
   bandwidth, measured in the same run.
2. **Samplers.** Shipped models: the 40-token prompt + 80 hidden tokens of the flat-pass issue's
   probe (``PROMPT``), whole runs, seed after seed with every (sampler, build) in turn, median
   run kept. Random XLNet-base-sized weights: ``asarm bench``'s windows at L = ``--lengths``
   with 95% hidden.

Ratios are against eager fp32 sequential of the same model and thread count, from this run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ..cache import ContentCache
from ..errors import InputError

ROWS = (1, 2, 4, 8, 11, 16, 32)
# name: (dtype, quantize, fast pass)
BUILDS = {
    "eager fp32": ("fp32", None, False),
    "fast fp32": ("fp32", None, True),
    "eager bf16": ("bf16", None, False),
    "fast bf16": ("bf16", None, True),
    "eager int8": ("bf16", "int8", False),
    "fast int8": ("bf16", "int8", True),
}
REFERENCE_BUILD = "eager fp32"
SAMPLERS = {
    "sequential": dict(method="sequential"),
    "ASSD k=5": dict(method="assd", k=5),
    "ASSD n-gram k=5": dict(method="assd", draft="ngram", k=5),
    "ASSD one-pass k=5": dict(method="assd", k=5, one_pass=True),
    "ASSD one-pass adaptive k": dict(method="assd", k=5, one_pass=True, adaptive_k=True),
}
PROMPT = ("The old man walked slowly to the edge of the village, where the river bent around the hill and "
          "the children played in the long grass every summer evening.")


def load_build(model_name: str, build: str, seed: int):
    from .samplers import load_bench_model

    dtype, quantize, fast = BUILDS[build]
    model = load_bench_model(model_name, "cpu", dtype, seed, quantize)
    return model.use_fast_path(fast, warn=True)


def pass_inputs(model, length: int, rows: int, seed: int):
    """(prefill args, pass args) for ``time_pass``: ``length // 2`` visible tokens, then a pass
    with ``rows`` queries and ``max(rows - 1, 1)`` new content rows after them."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    known = length // 2
    ids = torch.randint(0, vocab, (1, known + rows), generator=g)
    ids[ids == model.config.mask_token_id] = 0
    pos = torch.arange(known)[None]
    prefill = (ids[:, :known], pos, torch.zeros_like(pos), torch.tensor([[known]]), torch.ones(1, 1, dtype=torch.long))
    n_content = max(rows - 1, 1)
    cpos = torch.arange(known, known + n_content)[None]
    qpos = torch.arange(known, known + rows)[None]
    step = (ids[:, known:known + n_content], cpos, torch.arange(1, n_content + 1)[None], qpos,
            torch.arange(1, rows + 1)[None])
    return prefill, step


class PassTimer:
    """One model's cache, prefilled once per row count; ``time`` runs passes that are forgotten
    again (commit of nothing), so every timed pass sees the same cache."""

    def __init__(self, model, length: int, seed: int):
        self.model, self.length = model, length
        self.table = model.relative_table(length + max(ROWS) + 1)
        self.states = {}
        for rows in ROWS:
            prefill, step = pass_inputs(model, length, rows, seed)
            cache = ContentCache(model, 1, length + max(ROWS) + 2)
            with torch.no_grad():
                model.forward_rows(*prefill, cache=cache, rel_table=self.table)
            cache.commit(torch.tensor([prefill[0].shape[1]]))
            self.states[rows] = (cache, step)

    @torch.no_grad()
    def time(self, rows: int, passes: int) -> list[float]:
        cache, step = self.states[rows]
        out = []
        for _ in range(passes):
            start = time.perf_counter()
            self.model.forward_rows(*step, cache=cache, rel_table=self.table)
            out.append(time.perf_counter() - start)
            cache.commit(torch.zeros(1, dtype=torch.long))
        return out


def bench_passes(models: dict, length: int, rounds: int, passes: int, seed: int) -> list[dict]:
    timers = {build: PassTimer(model, length, seed) for build, model in models.items()}
    for timer in timers.values():  # warm-up: first calls allocate and pack
        for rows in ROWS:
            timer.time(rows, 2)
    samples = {(b, r): [] for b in models for r in ROWS}
    for _ in range(rounds):
        for build, timer in timers.items():
            for rows in ROWS:
                samples[build, rows] += timer.time(rows, passes)
    records = []
    for build in models:
        one_row = statistics.median(samples[build, 1])
        for rows in ROWS:
            seconds = statistics.median(samples[build, rows])
            records.append(dict(build=build, rows=rows, length=length, seconds_per_pass=seconds,
                                vs_one_row=seconds / one_row))
    return records


def sampler_inputs(model, model_name: str, length: int, seed: int):
    """(ids [B, L], hidden mask [B, L], protocol) for the sampler timings."""
    if model_name == "random-base":
        from .samplers import make_inputs

        ids, masked = make_inputs("95%", length, model.config.vocab_size, model.config.mask_token_id, 1, seed)
        return ids, masked, f"random tokens, L = {length}, 95% hidden (uniform), bench windows"
    from ..tokenization import encode

    prompt = torch.tensor(encode(model.tokenizer, PROMPT))[:40]
    L = len(prompt) + 80
    ids = torch.cat([prompt, torch.full((80,), model.config.mask_token_id)])[None]
    masked = torch.zeros(1, L, dtype=torch.bool)
    masked[0, len(prompt):] = True
    return ids, masked, f"{len(prompt)}-token prompt (PROMPT) + 80 hidden tokens, whole runs"


def time_windows(model, ids, masked, decode_kwargs: dict) -> dict:
    """Random-weight models: ``asarm bench``'s windows (their rows accept nearly every draft, so
    whole runs would be a few rounds long)."""
    from .samplers import Config, time_config
    from ..sampling import DecodeConfig

    stats = time_config(model, ids, masked, Config("x", DecodeConfig(**decode_kwargs)), window=4,
                        stages=(0.0, 0.2, 0.4, 0.6, 0.8), full=False, seed=0)
    return dict(tokens_per_s=stats["tokens"] / stats["seconds"], passes_per_token=stats["passes"] / stats["tokens"],
                seconds_per_pass=stats["seconds"] / stats["steps"])


def time_run(model, ids, masked, decode_kwargs: dict, seed: int) -> tuple[float, float]:
    """(seconds, passes) of one whole seeded run."""
    from ..sampling import sample

    start = time.perf_counter()
    result = sample(model, ids, masked, seed=seed, **decode_kwargs)
    return time.perf_counter() - start, float(result.nfe.sum())


def bench_samplers(models: dict, model_name: str, length: int, seeds: int, seed: int) -> tuple[list[dict], str]:
    """Every (sampler, build) timed. Shipped models: whole runs, interleaved — seed after seed,
    each seed runs every sampler on every build — so a slow spell of the machine hits every
    configuration alike; the median run of each is kept."""
    inputs = {b: sampler_inputs(m, model_name, length, seed) for b, m in models.items()}
    protocol = next(iter(inputs.values()))[2]
    jobs = [(name, build) for name in SAMPLERS for build in models]
    stats = {}
    if model_name == "random-base":
        for name, build in jobs:
            ids, masked, _ = inputs[build]
            stats[name, build] = time_windows(models[build], ids, masked, SAMPLERS[name])
    else:
        runs = {job: [] for job in jobs}
        for name, build in jobs:  # warm-up
            time_run(models[build], inputs[build][0], inputs[build][1], SAMPLERS[name], 0)
        for s in range(seeds):
            for name, build in jobs:
                runs[name, build].append(time_run(models[build], inputs[build][0], inputs[build][1], SAMPLERS[name], s))
        for job, timings in runs.items():
            hidden = int(inputs[job[1]][1].sum())
            seconds = statistics.median(t for t, _ in timings)
            passes = statistics.mean(p for _, p in timings) / hidden
            stats[job] = dict(tokens_per_s=hidden / seconds, passes_per_token=passes,
                              seconds_per_pass=seconds / (passes * hidden))
    records = [dict(sampler=name, build=build, **stats[name, build]) for name, build in jobs]
    reference = stats["sequential", REFERENCE_BUILD]["tokens_per_s"]
    for r in records:
        r["vs_eager_fp32_sequential"] = r["tokens_per_s"] / reference
        r["vs_sequential_same_build"] = r["tokens_per_s"] / stats["sequential", r["build"]]["tokens_per_s"]
    return records, protocol


def floor_seconds(model, bandwidth: float) -> float:
    from ..quantize import bytes_per_pass

    return bytes_per_pass(model) / bandwidth


def run(args) -> int:
    from ..quantize import copy_bandwidth

    model_names = args.model.split(",")
    threads = [int(t) for t in args.threads_axis.split(",")]
    builds = list(BUILDS) if args.builds == "all" else [b.strip() for b in args.builds.split(",")]
    for b in builds:
        if b not in BUILDS:
            raise InputError(f"unknown build {b!r}: use some of {', '.join(BUILDS)}")
    if REFERENCE_BUILD not in builds:
        builds.insert(0, REFERENCE_BUILD)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pass_records, sampler_records, protocols = [], [], {}
    for model_name in model_names:
        length = int(args.lengths.split(",")[0]) if model_name == "random-base" else 120
        models = {b: load_build(model_name, b, args.seed) for b in builds}
        for n in threads:
            torch.set_num_threads(n)
            bandwidth = copy_bandwidth()
            for r in bench_passes(models, length, args.rounds, args.window, args.seed):
                floor = floor_seconds(models[r["build"]], bandwidth)
                pass_records.append(dict(model=model_name, threads=n, floor_seconds=floor,
                                         floor_multiple=r["seconds_per_pass"] / floor, **r))
            records, protocols[model_name] = bench_samplers(models, model_name, length, args.seeds, args.seed)
            sampler_records += [dict(model=model_name, threads=n, **r) for r in records]
            print(f"{model_name}, {n} thread(s): done", flush=True)
        del models
    meta = dict(torch=torch.__version__, machine=platform.processor() or platform.machine(),
                command=getattr(args, "command_line", "asarm bench --suite pass"), rows=list(ROWS),
                protocols=protocols, builds={b: BUILDS[b] for b in builds},
                note="ratios are within one model and thread count, from this one run")
    (out / "pass.json").write_text(json.dumps(dict(meta=meta, passes=pass_records, samplers=sampler_records), indent=2))
    text = pass_table(pass_records) + "\n\n" + sampler_table(sampler_records) + "\n"
    (out / "pass.md").write_text(text)
    plot(pass_records, out / "pass.png")
    print(text)
    print(f"wrote {out / 'pass.json'}, {out / 'pass.md'}, {out / 'pass.png'}")
    return 0


def pass_table(records) -> str:
    lines = ["| model | threads | build | " + " | ".join(f"{r} rows" for r in ROWS) + " | 11 rows / 1 row | 1 row / floor |",
             "|---|---|---|" + "---|" * (len(ROWS) + 2)]
    keys = dict.fromkeys((r["model"], r["threads"], r["build"]) for r in records)
    for model, threads, build in keys:
        rs = {r["rows"]: r for r in records if (r["model"], r["threads"], r["build"]) == (model, threads, build)}
        cells = " | ".join(f"{1000 * rs[n]['seconds_per_pass']:.2f}" for n in ROWS)
        lines.append(f"| {model} | {threads} | {build} | {cells} | {rs[11]['vs_one_row']:.2f}x | "
                     f"{rs[1]['floor_multiple']:.2f}x |")
    return "ms per cached pass against its query rows:\n\n" + "\n".join(lines)


def sampler_table(records) -> str:
    lines = ["| model | threads | sampler | build | tokens/s | passes/token | ms/pass | vs eager fp32 sequential | "
             "vs sequential, same build |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['threads']} | {r['sampler']} | {r['build']} | {r['tokens_per_s']:.1f} | "
                     f"{r['passes_per_token']:.3f} | {1000 * r['seconds_per_pass']:.2f} | "
                     f"{r['vs_eager_fp32_sequential']:.2f}x | {r['vs_sequential_same_build']:.2f}x |")
    return "Samplers:\n\n" + "\n".join(lines)


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["threads"]) for r in records))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (model, threads) in zip(axes[0], panels):
        for build in dict.fromkeys(r["build"] for r in records):
            rs = [r for r in records if (r["model"], r["threads"], r["build"]) == (model, threads, build)]
            ax.plot([r["rows"] for r in rs], [1000 * r["seconds_per_pass"] for r in rs], marker="o", label=build)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("query rows in the pass")
        ax.set_ylabel("ms per cached pass")
        ax.set_title(f"{model}, {threads} thread(s)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
