"""``asarm bench --suite cache|speedups``: samplers side by side in one process, same checkpoint,
same inputs.

Configurations (docs/design.md): full-recompute sequential (the paper's serial baseline), full-
recompute ASSD (the paper's ASSD), cached sequential, cached ASSD (self and n-gram drafts),
batched cached ASSD. Every configuration is timed the same way, on *windows* of passes spread
over the run: the rows are fast-forwarded to 0%, 20%, 40%, 60% and 80% of their hidden tokens
decoded (decoded tokens drawn at random: the cost of a pass depends on how many tokens are
known, not on which), one untimed pass absorbs the prefill, then ``--window`` passes are timed.
tokens/s = tokens decoded in the windows / time spent in them. This keeps the O(n^2) baseline
affordable at L = 1024 while weighting early (cheap) and late (dear) passes alike; ``--full``
times whole runs instead.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from ..config import ASARMConfig
from ..devices import resolve_device, resolve_dtype
from ..errors import InputError
from ..model import ASARM
from ..sampling import DecodeConfig, Engine, speedup_configs as decode_speedup_configs
from ..sampling.config import PROPOSERS

XLNET_BASE = dict(vocab_size=32000, d_model=768, n_layer=12, n_head=12, d_inner=3072, dropout=0.0)


@dataclasses.dataclass(frozen=True)
class Config:
    """A benchmark configuration: how to decode, and how many rows share each pass."""

    name: str
    decode: DecodeConfig
    batch: int = 1


def default_configs(k: int, batches: list[int]) -> list[Config]:
    configs = [
        Config("full-recompute sequential", DecodeConfig("sequential", k=1, cache=False)),
        Config("full-recompute ASSD", DecodeConfig("assd", k=k, cache=False)),
        Config("cached sequential", DecodeConfig("sequential", k=1)),
        Config("cached ASSD self", DecodeConfig("assd", k=k)),
        Config("cached ASSD n-gram", DecodeConfig("assd", "ngram", k)),
    ]
    configs += [Config(f"batched cached ASSD B={b}", DecodeConfig("assd", k=k), batch=b) for b in batches]
    return configs


def speedup_configs(k: int) -> list[Config]:
    """Plain cached ASSD against each exact improvement and their combination (one list,
    ``asarm.sampling.speedup_configs``, shared with ``asarm eval --speedups``)."""
    return [Config(_speedup_name(c), c) for c in decode_speedup_configs(k)]


def _speedup_name(c: DecodeConfig) -> str:
    """"ASSD + one-pass + adaptive k": the names earlier result files use."""
    if c.method == "sequential":
        return "cached sequential"
    draft = "" if c.draft == "self" else " " + PROPOSERS[c.draft].label.removesuffix(" draft")  # "ASSD n-gram"
    return " + ".join(["ASSD" + draft] + [v.replace("adaptive-k", "adaptive k") for v in c.variants])


def make_inputs(setting: str, length: int, vocab: int, mask_id: int, batch: int, seed: int, corpus=None):
    """[batch, L] visible tokens and a hidden mask: '95%' hides 95% of positions uniformly;
    '50%-spans' hides random spans covering half the sequence. Tokens come from ``corpus`` (a
    1-D tensor of token ids, consecutive chunks) when given, else uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    if corpus is not None:
        if len(corpus) < batch * length:
            raise InputError(f"the benchmark text has {len(corpus)} tokens; {batch * length} are needed")
        ids = corpus[: batch * length].view(batch, length).clone()
    else:
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        ids[ids == mask_id] = (mask_id + 1) % vocab
    masked = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        if setting == "95%":
            masked[b, torch.randperm(length, generator=g)[: round(0.95 * length)]] = True
        elif setting == "50%-spans":
            while masked[b].sum() < length // 2:
                span = int(torch.randint(4, 33, (1,), generator=g))
                start = int(torch.randint(0, length, (1,), generator=g))
                masked[b, start : start + span] = True
        else:
            raise InputError(f"unknown setting {setting!r} (use 95% or 50%-spans)")
    return ids, masked


def fast_forward(ids, masked, progress: float, vocab: int, mask_id: int, seed: int):
    """Inputs whose first ``progress`` of hidden positions (left to right) are already known,
    with random tokens: a pass costs what it costs at that point of a run (the cost depends on
    how many tokens are known, not on which)."""
    g = torch.Generator().manual_seed(seed + 1)
    ids, masked = ids.clone(), masked.clone()
    for b in range(ids.shape[0]):
        hidden = torch.nonzero(masked[b]).flatten()
        done = hidden[: int(progress * len(hidden))]
        fill = torch.randint(0, vocab, (len(done),), generator=g)
        fill[fill == mask_id] = (mask_id + 1) % vocab
        ids[b, done], masked[b, done] = fill, False
    return ids, masked


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_config(model, ids, masked, cfg: Config, window: int, stages, full: bool, seed: int) -> dict:
    """Time one configuration; returns tokens, passes, rounds, seconds in the timed windows and
    the part of those seconds spent outside the model's forward (host_seconds)."""
    tokens = passes = rounds = steps_total = 0
    seconds = forward = 0.0
    cfg_model = model.config
    for progress in ([0.0] if full else stages):
        fids, fmasked = fast_forward(ids, masked, progress, cfg_model.vocab_size, cfg_model.mask_token_id, seed)
        engine = Engine(model, cache=cfg.decode.cache)
        handles = [engine.add(fids[b], fmasked[b], cfg.decode, seed=seed, row_index=b) for b in range(len(fids))]
        if not full:
            engine.step()  # untimed: prefill of the known tokens, warm-up
        before = [(h.row.n_decoded, h.row.nfe, h.row.rounds) for h in handles]
        steps, engine.step_seconds, engine.forward_seconds = 0, 0.0, 0.0
        while engine.active and (full or steps < window):
            engine.step()
            steps += 1
        seconds += engine.step_seconds
        forward += engine.forward_seconds
        steps_total += steps
        for h, (n, nfe, rd) in zip(handles, before):
            tokens += h.row.n_decoded - n
            passes += h.row.nfe - nfe
            rounds += h.row.rounds - rd
    return dict(tokens=tokens, passes=passes, rounds=rounds, steps=steps_total, seconds=seconds,
                host_seconds=seconds - forward)


def time_full_pass(model, length: int, repeats: int = 2) -> float:
    """Seconds for one full-recompute pass with every position known (L content rows, one
    query): the dearest pass of a full-recompute run."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=model.device)
    ranks = torch.zeros(1, length, dtype=torch.long, device=model.device)
    ranks[0, -1] = 1
    model.chain_logits(ids, ranks)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(model.device)
        start = time.perf_counter()
        model.chain_logits(ids, ranks)
        sync(model.device)
        best = min(best, time.perf_counter() - start)
    return best


def run_bench(model, lengths, settings, configs, window=6, stages=(0.0, 0.2, 0.4, 0.6, 0.8), full=False,
              seed=0, progress_bar=True, corpus=None) -> list[dict]:
    from tqdm import tqdm

    records = []
    jobs = [(L, s, c) for L in lengths for s in settings for c in configs]
    cache_bytes_per_token = 2 * model.config.n_layer * model.config.d_model * torch.finfo(model.dtype).bits // 8
    for L, setting, cfg in tqdm(jobs, desc="bench", disable=not progress_bar):
        ids, masked = make_inputs(setting, L, model.config.vocab_size, model.config.mask_token_id, cfg.batch, seed, corpus)
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        stats = time_config(model, ids.to("cpu"), masked, cfg, window, stages, full, seed)
        tok_s = stats["tokens"] / stats["seconds"] if stats["seconds"] else float("nan")
        d = cfg.decode
        record = dict(length=L, setting=setting, config=cfg.name, decode=d.name, method=d.method, draft=d.draft,
                      cache=d.cache, batch=cfg.batch, k=d.k, **stats, tokens_per_s=tok_s,
                      host_fraction=stats["host_seconds"] / stats["seconds"] if stats["seconds"] else None,
                      seconds_per_pass=stats["seconds"] / max(stats["steps"], 1),
                      passes_per_token=stats["passes"] / max(stats["tokens"], 1),
                      tokens_per_round=stats["tokens"] / max(stats["rounds"], 1),
                      cache_bytes_per_token=cache_bytes_per_token if d.cache else 0)
        if model.device.type == "cuda":
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(model.device)
        records.append(record)
    # speed-up against the first configuration of the suite (the serial baseline)
    baseline = {(r["length"], r["setting"]): r["tokens_per_s"] for r in records if r["config"] == configs[0].name}
    for r in records:
        base = baseline.get((r["length"], r["setting"]))
        r["speedup_vs_baseline"] = r["tokens_per_s"] / base if base else None
    return records


def markdown_table(records) -> str:
    lines = ["| L | setting | configuration | tokens/s | s/pass | host share of pass | weights read/pass | "
             "pass / floor | passes/token | tokens/round | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        speed = f"{r['speedup_vs_baseline']:.1f}x" if r.get("speedup_vs_baseline") else "-"
        lines.append(f"| {r['length']} | {r['setting']} | {r['config']} | {r['tokens_per_s']:.1f} | "
                     f"{r['seconds_per_pass']:.4f} | {_percent(r.get('host_fraction'))} | {_mib(r.get('weight_bytes_per_pass'))} | "
                     f"{_times(r.get('floor_multiple'))} | {r['passes_per_token']:.3f} | {r['tokens_per_round']:.2f} | {speed} |")
    return "\n".join(lines)


def _percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f} MiB"


def _times(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in records})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for name in dict.fromkeys(r["config"] for r in records):
            rs = [r for r in records if r["config"] == name and r["setting"] == setting]
            ax.plot([r["length"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"hidden: {setting}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_text_file(path: str) -> str:
    import gzip

    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def load_bench_model(name: str | None, device, dtype, seed: int, quantize: str | None = None,
                     fast_path: bool | None = None):
    """A shipped/local/hub model, or ``random-base``: XLNet-base-sized random weights (``seed``).
    ``fast_path``: as ``load_model`` (None: on for CPUs)."""
    if name in (None, "random-base"):
        torch.manual_seed(seed)
        model = ASARM(ASARMConfig(**XLNET_BASE)).eval()
        model.name_or_path = "random XLNet-base-sized weights"
        if quantize is not None:
            from ..quantize import quantize_model

            model = quantize_model(model, quantize)
        default = torch.bfloat16 if quantize is not None else torch.float32  # int8 runs bf16 activations
        model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype) or default)
        return model.use_fast_path(model.device.type == "cpu" if fast_path is None else fast_path)
    from ..checkpoint import load_model

    return load_model(name, device=device, dtype=dtype, quantize=quantize, fast_path=fast_path)


@torch.no_grad()
def run(args) -> int:
    """``asarm bench --suite cache|speedups``: every configuration on every length and setting,
    written as bench.json, bench.md and bench.png under ``--out``."""
    from ..quantize import copy_bandwidth, floor_columns

    lengths = [int(x) for x in args.lengths.split(",")]
    settings = args.settings.split(",")
    batches = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else []
    suite = speedup_configs(args.k) if args.suite == "speedups" else default_configs(args.k, batches)
    configs = [c for c in suite if not args.only or any(o in c.name for o in args.only.split(","))]
    quantizations = [None if q == "none" else q for q in args.quantize.split(",")]
    bandwidth = copy_bandwidth()  # the floor's denominator, measured in this run
    records = []
    for quantize in quantizations:
        model = load_bench_model(args.model, args.device, args.dtype, args.seed, quantize,
                                 fast_path=False if args.no_fast_path else None)
        corpus = None
        if args.text_file:
            from ..tokenization import encode

            if model.tokenizer is None:
                raise InputError("--text-file needs a model with a tokenizer")
            corpus = torch.tensor(encode(model.tokenizer, read_text_file(args.text_file)))
        variant = [c if quantize is None else dataclasses.replace(c, name=f"{c.name} [{quantize}]") for c in configs]
        if getattr(model, "draft_head", None) is None:  # draft="head" configs need a trained head
            variant = [c for c in variant if c.decode.draft != "head"]
        for r in run_bench(model, lengths, settings, variant, window=args.window, full=args.full, seed=args.seed,
                           corpus=corpus):
            r.update(quantize=quantize or "none", **floor_columns(model, r["seconds_per_pass"], bandwidth))
            records.append(r)
    full_pass = {L: time_full_pass(model, L) for L in lengths}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=getattr(model, "name_or_path", args.model), parameters=model.num_parameters(),
                device=str(model.device), dtype=str(model.dtype), torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                window=args.window, full=args.full, timing="full runs" if args.full else
                "windows at 0/20/40/60/80% decoded (see asarm/bench/samplers.py)", command=getattr(args, "command_line", "asarm bench"),
                inputs=args.text_file or "uniformly random tokens", full_pass_seconds=full_pass,
                copy_bandwidth_bytes_per_s=bandwidth)
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, records=records), indent=2))
    table = markdown_table(records)
    (out / "bench.md").write_text(table + "\n")
    plot(records, out / "bench.png")
    print(table)
    print("one full-recompute pass (L content rows + 1 query): " +
          ", ".join(f"L={L}: {t:.3f}s" for L, t in full_pass.items()))
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0
