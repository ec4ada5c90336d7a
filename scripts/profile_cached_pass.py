"""Where the time of one cached ASSD pass goes (XLNet-base-sized random weights, CPU or GPU).

    python scripts/profile_cached_pass.py --length 512 [--batch 1] [--device cpu] [--dtype fp32]

Rows are fast-forwarded to half their hidden tokens decoded (as ``asarm bench`` does), then
``--passes`` engine steps run under ``torch.profiler``. Prints the operators that take the most
time, and three reference costs measured in the same process:
  * the whole cached pass (engine step: planning, model, softmax, acceptance);
  * a *weight-only* pass: the same model with one content row and one query over an empty cache,
    i.e. what streaming every weight matrix once costs here, whatever the sequence length;
  * one full-recompute pass with every position known (the baseline's dearest pass).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from asarm.bench import Config, build_rows, load_bench_model, make_inputs, sync, time_full_pass
from asarm.cache import ContentCache
from asarm.sampling import _Engine


def best_of(fn, repeats: int, device) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    model = load_bench_model("random-base", args.device, args.dtype, seed=0)
    cfg = Config("cached ASSD self", "assd", k=args.k, batch=args.batch)
    ids, masked = make_inputs("95%", args.length, model.config.vocab_size, model.config.mask_token_id, args.batch, 0)
    rows = build_rows(model, ids, masked, cfg, seed=0, progress=0.5)
    engine = _Engine(model, rows, args.length, cfg.speculation.max_k, True, rows[0].target, None)
    engine.step()  # prefill of the known tokens, untimed
    engine.step()
    times = []
    for _ in range(args.passes):
        sync(model.device)
        start = time.perf_counter()
        engine.step()
        sync(model.device)
        times.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.passes):
            engine.step()
        sync(model.device)
    sorts = ["self_device_time_total", "self_cuda_time_total"] if model.device.type == "cuda" else []
    for sort in sorts + ["self_cpu_time_total"]:  # the device key's name differs across torch versions
        try:
            print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
            break
        except (KeyError, AttributeError, ValueError, RuntimeError):
            continue

    # weight-only pass: 1 content row, 1 query, empty cache
    one = torch.zeros(args.batch, 1, dtype=torch.long, device=model.device)
    tiny_cache = ContentCache(model, args.batch, 4)

    def weight_pass():
        model.forward_rows(one, one, one * 0, one + 1, one + 1, cache=tiny_cache, rel_table=engine.rel_table)
        tiny_cache.commit(torch.zeros(args.batch, dtype=torch.long))  # keep nothing: the cache stays empty

    weight_s = best_of(weight_pass, 5, model.device)
    full_s = time_full_pass(model, args.length)
    params = model.num_parameters()
    bytes_ = params * torch.finfo(model.dtype).bits // 8
    median = sorted(times)[len(times) // 2]
    print(f"model: {params / 1e6:.1f}M parameters, {bytes_ / 2**20:.0f} MiB of weights ({model.dtype}), "
          f"{torch.get_num_threads()} threads, device {model.device}")
    print(f"cached ASSD pass (L={args.length}, B={args.batch}, k={args.k}, half decoded): median {median * 1e3:.1f} ms")
    print(f"weight-only pass (1 row, empty cache):                      {weight_s * 1e3:.1f} ms "
          f"({bytes_ / weight_s / 1e9:.1f} GB/s of weights)")
    print(f"full-recompute pass, all {args.length} positions known:      {full_s * 1e3:.1f} ms "
          f"= {full_s / median:.1f} cached passes")


if __name__ == "__main__":
    main()
