"""Does a row decode the same tokens alone as among 31 others joining in a random order?

    python scripts/batch_invariance_check.py --dtype fp32 --trials 3

32 rows (three prompts, 10-16 hidden tokens, sequential and ASSD with k = 1..5, some greedy),
each first decoded alone, then all together in ``--trials`` random join orders (a step after
every fifth row joins). Prints the rows that differ per trial. In fp32 a CPU matmul's last bits
depend on the batch's shape, which can flip a draw in rare cases; fp64 makes that vanishingly
unlikely.
"""

from __future__ import annotations

import argparse

import torch

import asarm
from asarm.sampling.config import DecodeConfig
from asarm.sampling.engine import Engine
from asarm.tokenization import encode

PROMPTS = ["The old man walked to the store and", "She opened the door and", "In 1990 the city council"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="asarm-en-small")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp64"])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    model = asarm.load_model(args.model, device="cpu", dtype=dtype)

    def row(i):
        prompt = encode(model.tokenizer, PROMPTS[i % len(PROMPTS)])
        ids = torch.tensor(prompt + [model.config.mask_token_id] * (10 + i % 7))
        masked = torch.zeros(len(ids), dtype=torch.bool)
        masked[len(prompt):] = True
        config = DecodeConfig(method="assd" if i % 4 else "sequential", k=1 + i % 5, greedy=i % 7 == 0)
        return ids, masked, config

    alone = []
    for i in range(args.rows):
        engine = Engine(model)
        ids, masked, config = row(i)
        handle = engine.add(ids, masked, config, seed=1000 + i)
        engine.run()
        alone.append(handle.row.tokens.tolist())
    differing = 0
    for trial in range(args.trials):
        engine, handles = Engine(model), {}
        order = torch.randperm(args.rows, generator=torch.Generator().manual_seed(trial)).tolist()
        for j, i in enumerate(order):
            ids, masked, config = row(i)
            handles[i] = engine.add(ids, masked, config, seed=1000 + i)
            if j % 5 == 4:
                engine.step()
        engine.run()
        differ = [i for i in range(args.rows) if handles[i].row.tokens.tolist() != alone[i]]
        differing += len(differ)
        print(f"{args.dtype} trial {trial}: rows that differ from their run alone: {differ or 'none'}")
    print(f"{differing} of {args.rows * args.trials} rows differ")


if __name__ == "__main__":
    main()
