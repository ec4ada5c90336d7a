"""Unedited sample infills from a checkpoint with ``asarm.text.infill`` (for model cards).

    python scripts/sample_infills.py MODEL PROMPTS.json [--seed 0] [--top-p 0.9] [--greedy]

PROMPTS.json is a list of texts with ``[MASK:n]`` holes. Prints markdown: each prompt, then the
filled text exactly as ``infill`` returned it (a carriage return shown as ``\\r``), and the
sampler's statistics.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from asarm.checkpoint import load_model  # noqa: E402
from asarm.text import infill  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--method", default="assd", choices=["assd", "sequential"])
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    prompts = json.loads(Path(args.prompts).read_text())
    options = dict(method=args.method, k=args.k, temperature=args.temperature, seed=args.seed)
    if args.greedy:
        options["greedy"] = True
    if args.top_p is not None:
        options["top_p"] = args.top_p
    print(f"model `{args.model}`, options `{json.dumps(options)}`\n")
    for i, prompt in enumerate(prompts, 1):
        start = time.perf_counter()
        out, res = infill(model, prompt, return_result=True, **options)
        elapsed = time.perf_counter() - start
        tokens = sum(res.accepted)
        shown = out.replace("\r", "\\r")  # a carriage return would be invisible in markdown
        print(f"{i}. input:\n\n```\n{prompt}\n```\n\n   output:\n\n```\n{shown}\n```\n")
        print(f"   ({tokens} tokens, {int(res.nfe)} passes, {int(res.rounds)} rounds, {elapsed:.2f}s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
