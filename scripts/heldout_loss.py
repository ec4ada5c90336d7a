"""Held-out loss/perplexity of a checkpoint under the paper's order (fixed masks from a seed).

    python scripts/heldout_loss.py MODEL SOURCE [SOURCE ...] [--kind text|code] [--seq-len 128]
        [--max-chunks 512] [--hidden 0.85 0.99] [--seed 1234] [--max-chars N]

MODEL: shipped name or HF-format directory; SOURCE: anything ``asarm.data`` reads (files, folders,
.zip/.gz/.jsonl, ``python-stdlib-tests``). Prints one JSON line: mean cross-entropy per hidden token
(nats), its perplexity, the number of hidden tokens scored.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from asarm.train import evaluate_sources  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("sources", nargs="+")
    p.add_argument("--kind", default="text", choices=["text", "code"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-chunks", type=int, default=512)
    p.add_argument("--hidden", type=float, nargs=2, default=[0.85, 0.99], metavar=("LOW", "HIGH"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-chars", type=int, default=None, help="read at most this many characters")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = evaluate_sources(args.model, args.sources, kind=args.kind, seq_len=args.seq_len,
                           max_chunks=args.max_chunks, seed=args.seed, low=args.hidden[0], high=args.hidden[1],
                           max_chars=args.max_chars)
    res["model"] = args.model
    res["sources"] = args.sources
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
