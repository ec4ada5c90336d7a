"""Where the time of one cached ASSD pass goes, and what each change to the pass buys.

    python scripts/profile_cached_pass.py [--length 512] [--variants fp32,bf16,int8] [--profile int8]
        [--compare-layout] [--int8-rows 1,2,4,8,12] [--threads 1] [--device cpu]

Model level, sampler independent: XLNet-base-sized random weights; a ``ContentCache`` holding the
keys of a row half-way through a 95%-hidden run at length L (5% visible + half the hidden tokens
decoded); each timed pass adds k + 1 content rows and k query rows (an ASSD verify pass, k = 5)
and commits nothing, so every pass costs the same. Printed per variant, all in one process:
median pass time, bytes of weights read per pass (``asarm.quantize.bytes_per_pass``), the
machine's copy bandwidth measured in the same run, the floor (bytes / bandwidth) and the pass
as a multiple of it, and a weight-only pass (one content row, one query, empty cache).

--compare-layout also times each float variant with ``model.fast_layout = False`` (plain
contiguous weights); --int8-rows times one 768x3072 int8 product against bf16 per row count
(how ``quantize.FUSED_MAX_ROWS`` was chosen); --profile NAME prints torch.profiler's top ops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from asarm.cache import ContentCache  # noqa: E402
from asarm.config import ASARMConfig  # noqa: E402
from asarm.model import ASARM  # noqa: E402

XLNET_BASE = dict(vocab_size=32000, d_model=768, n_layer=12, n_head=12, d_inner=3072, dropout=0.0)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats: int, device="cpu") -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def build(variant: str, device="cpu", seed=0) -> ASARM:
    """'fp32', 'bf16', 'fp16' or 'int8' (int8 weights, bf16 activations) from the same weights."""
    torch.manual_seed(seed)
    model = ASARM(ASARMConfig(**XLNET_BASE)).eval()
    if variant == "int8":
        from asarm import quantize as quant

        quant.quantize_model(model, "int8")
        return model.to(device=device, dtype=torch.bfloat16)
    return model.to(device=device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[variant])


class CachedPass:
    """A fixed cached verify pass at length L, half-way through a 95%-hidden run."""

    def __init__(self, model: ASARM, length: int, k: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dev = model.device
        self.model, self.k = model, k
        hidden = torch.randperm(length, generator=g)[: round(0.95 * length)].sort().values
        known = torch.ones(length, dtype=torch.bool)
        known[hidden] = False
        decoded = hidden[: len(hidden) // 2]
        known[decoded] = True
        pos = torch.nonzero(known).flatten()
        rank = torch.zeros(length, dtype=torch.long)
        rank[hidden] = torch.arange(1, len(hidden) + 1)
        ids = torch.randint(0, model.config.vocab_size, (1, len(pos)), generator=g)
        self.rel_table = model.relative_table(length)
        self.cache = ContentCache(model, 1, len(pos) + 2 * k + 2)
        with torch.no_grad():  # prefill: the committed keys
            model.forward_rows(ids.to(dev), pos[None].to(dev), rank[pos][None].to(dev),
                               pos[:1][None].to(dev), rank[pos[:1]][None].to(dev),
                               cache=self.cache, rel_table=self.rel_table)
        self.cache.commit(torch.tensor([len(pos)]))
        nxt = hidden[len(hidden) // 2: len(hidden) // 2 + k + 1]
        self.rows = [t[None].to(dev) for t in (torch.randint(0, 100, (len(nxt),), generator=g), nxt, rank[nxt],
                                                nxt[1:], rank[nxt[1:]])]

    @torch.no_grad()
    def __call__(self):
        out = self.model.forward_rows(*self.rows, cache=self.cache, rel_table=self.rel_table)
        self.cache.commit(torch.zeros(1, dtype=torch.long))  # keep nothing: the next pass is the same
        return out


def copy_bandwidth(nbytes: int = 2**30, repeats: int = 3) -> float:
    """Bytes per second of a plain copy of a buffer far larger than the caches (each byte read once
    and written once; counted once)."""
    a = torch.ones(nbytes // 4)
    b = torch.zeros_like(a)
    seconds = best_of(lambda: b.copy_(a), repeats)
    return nbytes / seconds


def weight_only_pass(model: ASARM, rel_table) -> float:
    one = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    cache = ContentCache(model, 1, 4)

    @torch.no_grad()
    def run():
        model.forward_rows(one, one, one * 0, one + 1, one + 1, cache=cache, rel_table=rel_table)
        cache.commit(torch.zeros(1, dtype=torch.long))

    run()
    return best_of(run, 5, model.device)


def time_variant(model, length, passes, bandwidth) -> dict:
    from asarm import quantize as quant

    step = CachedPass(model, length)
    step()
    times = []
    for _ in range(passes):
        sync(model.device)
        start = time.perf_counter()
        step()
        sync(model.device)
        times.append(time.perf_counter() - start)
    nbytes = quant.bytes_per_pass(model)
    median = statistics.median(times)
    floor = nbytes / bandwidth
    return dict(pass_s=median, best_pass_s=min(times), weight_bytes=nbytes, floor_s=floor,
                floor_multiple=median / floor, weight_only_pass_s=weight_only_pass(model, step.rel_table))


def int8_rows_table(rows_list, repeats=7) -> list[dict]:
    """One 768 -> 3072 product: bf16 weights vs int8 via _weight_int8pack_mm vs int8 dequantized."""
    from asarm import quantize as quant

    w = torch.randn(3072, 768)
    wb = w.bfloat16()
    q, scale = quant.quantize_tensor(w)
    sb = scale.bfloat16()
    out = []
    for rows in rows_list:
        x = torch.randn(rows, 768).bfloat16()
        fused = best_of(lambda: [torch.ops.aten._weight_int8pack_mm(x, q, sb) for _ in range(10)], repeats) / 10
        deq = best_of(lambda: [F.linear(x, q.to(x.dtype)) * sb for _ in range(10)], repeats) / 10
        bf16 = best_of(lambda: [F.linear(x, wb) for _ in range(10)], repeats) / 10
        out.append(dict(rows=rows, int8pack_us=fused * 1e6, int8_dequant_us=deq * 1e6, bf16_us=bf16 * 1e6))
        print(f"rows {rows:3d}: int8 fused {fused * 1e6:7.0f} us  int8 dequantized {deq * 1e6:7.0f} us  "
              f"bf16 {bf16 * 1e6:7.0f} us")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--passes", type=int, default=15)
    p.add_argument("--variants", default="fp32,bf16,int8")
    p.add_argument("--dtype", default=None, help="one variant only (fp32/bf16/fp16/int8): same as --variants DTYPE")
    p.add_argument("--compare-layout", action="store_true")
    p.add_argument("--int8-rows", default="")
    p.add_argument("--profile", default="", help="variant to run under torch.profiler")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.dtype:
        args.variants = args.dtype

    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s ({args.threads} thread(s); machine may be shared)")
    results = dict(threads=args.threads, length=args.length, copy_bandwidth=bandwidth, variants={})
    for variant in [v for v in args.variants.split(",") if v]:
        model = build(variant, args.device)
        layouts = [True, False] if args.compare_layout and variant != "int8" else [True]
        for fast in layouts:
            model.fast_layout = fast
            model.eval()  # applies the layout
            name = variant + ("" if fast else " (plain layout)")
            r = time_variant(model, args.length, args.passes, bandwidth)
            results["variants"][name] = r
            print(f"{name:22s} pass {r['pass_s'] * 1e3:6.1f} ms (best {r['best_pass_s'] * 1e3:.1f})  "
                  f"weights {r['weight_bytes'] / 2**20:5.0f} MiB  floor {r['floor_s'] * 1e3:5.1f} ms  "
                  f"= {r['floor_multiple']:.2f}x floor  weight-only pass {r['weight_only_pass_s'] * 1e3:.1f} ms")
        if variant == args.profile:
            from torch.profiler import ProfilerActivity, profile

            step = CachedPass(model, args.length)
            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.passes):
                    step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        del model
    if args.int8_rows:
        results["int8_rows"] = int8_rows_table([int(r) for r in args.int8_rows.split(",")])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
