"""Wall-clock of token-wise against block verification, paired and interleaved, at 1 thread.

    OMP_NUM_THREADS=1 python scripts/verification_timing.py [--chunks 12] [--repeats 2] [--model asarm-en-small]

On a shared machine the load changes from minute to minute, so the two verifiers run one after
the other on the same WikiText-2 test chunk (128 tokens, 95% hidden, the eval protocol) with the
same seed, alternating which goes first, and the script reports generated tokens per second of
each and their paired ratio, for plain and one-pass ASSD (k = 5, batch 1), plus the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import asarm
from asarm.evaluation import wikitext

VARIANTS = {"ASSD k=5": dict(), "one-pass k=5": dict(one_pass=True),
            "one-pass k=5 + adaptive-k": dict(one_pass=True, adaptive_k=True)}


def timed(model, example, **options) -> tuple[float, int, int]:
    ids, hidden = torch.tensor(example.ids), torch.tensor(example.hidden)
    start = time.perf_counter()
    res = asarm.sample(model, ids, hidden, method="assd", k=5, seed=example.index, **options)
    return time.perf_counter() - start, int(hidden.sum()), int(res.nfe)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="asarm-en-small")
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = asarm.load_model(args.model, device="cpu")
    examples = wikitext.WikiTextTask(model, length=128, evaluator="self").examples(args.chunks)
    print(f"{args.model}, first {len(examples)} WikiText-2 test chunks x {args.repeats}, 95% hidden, batch 1, "
          f"1 thread; load average before: {os.getloadavg()}")
    for name, options in VARIANTS.items():
        seconds = {"token": 0.0, "block": 0.0}
        tokens = {"token": 0, "block": 0}
        ratios = []
        for r in range(args.repeats):
            for i, e in enumerate(examples):
                order = ("token", "block") if (i + r) % 2 == 0 else ("block", "token")
                got = {v: timed(model, e, verification=v, **options) for v in order}
                for v in order:
                    seconds[v] += got[v][0]
                    tokens[v] += got[v][1]
                ratios.append((got["token"][0] / got["token"][2]) / (got["block"][0] / got["block"][2]))
        tps = {v: tokens[v] / seconds[v] for v in seconds}
        print(f"{name:28s} token {tps['token']:6.1f} tok/s   block {tps['block']:6.1f} tok/s   "
              f"block/token {tps['block'] / tps['token']:.3f}   per-pass time token/block "
              f"{statistics.mean(ratios):.3f} (median {statistics.median(ratios):.3f})", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
