"""Milliseconds per engine step for a batch of rows decoded together, one torch thread.

    python scripts/engine_step_bench.py --rows 30 --dtype fp32
    python scripts/engine_step_bench.py --rows 30 --dtype bf16
    python scripts/engine_step_bench.py --rows 1

Half the rows join one step after the others, so the batch holds rows in different ASSD
phases (as a server's does); each row continues a short prompt by 64 tokens with ASSD k = 5.
Best of three timings of 15 steps. Compare settings in one session on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch

import asarm
from asarm.sampling.config import DecodeConfig
from asarm.sampling.engine import Engine
from asarm.tokenization import encode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="asarm-en-small")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = asarm.load_model(args.model, device="cpu", dtype=args.dtype)
    prompt = encode(model.tokenizer, "The old man walked to the store and")
    ids = torch.tensor(prompt + [model.config.mask_token_id] * 64)
    masked = torch.zeros(len(ids), dtype=torch.bool)
    masked[len(prompt):] = True

    def add(engine, seed):
        engine.add(ids, masked, DecodeConfig(method="assd", k=5), seed=seed)

    timings = []
    for _ in range(3):
        engine = Engine(model)
        first = (args.rows + 1) // 2
        for i in range(first):
            add(engine, i)
        engine.step()
        for i in range(first, args.rows):
            add(engine, i)
        engine.step()
        engine.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        timings.append((time.perf_counter() - start) / args.steps * 1000)
    print(f"{args.model} {args.dtype}, {args.rows} rows, 1 thread: {min(timings):.1f} ms per step (best of 3)")


if __name__ == "__main__":
    main()
