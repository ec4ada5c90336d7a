"""Held-out perplexity of the shipped models: fp32 vs bf16 vs int8 weight-only, the cards' protocol.

    python scripts/quantized_perplexity.py [--out results/bench-cpu-quantized/perplexity.json]

Same chunks, same fixed masks (seed 1234, hidden fraction uniform in 85-99%), same data as the
model cards' "Held-out figures": asarm-en-small on WikiText-2 test (512 chunks of 128 tokens),
asarm-py-small on python-stdlib-tests (256 chunks of 256 tokens). int8 = ``load_model(...,
quantize="int8")`` with its default bf16 activations, and with fp32 activations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from asarm.checkpoint import load_model  # noqa: E402
from asarm.train import evaluate_sources  # noqa: E402

CARDS = [
    dict(model="asarm-en-small", sources=[str(ROOT.parent / "shared/data/wikitext-2/test.txt.gz")], kind="text",
         seq_len=128, max_chunks=512),
    dict(model="asarm-py-small", sources=["python-stdlib-tests"], kind="code", seq_len=256, max_chunks=256),
]
VARIANTS = {
    "fp32": dict(dtype="fp32"),
    "bf16": dict(dtype="bf16"),
    "int8 (bf16 activations)": dict(quantize="int8"),
    "int8 (fp32 activations)": dict(quantize="int8", dtype="fp32"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results/bench-cpu-quantized/perplexity.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-chunks", type=int, default=None, help="override the cards' chunk counts (quick runs)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    for card in CARDS:
        for name, options in VARIANTS.items():
            model = load_model(card["model"], device="cpu", **options)
            start = time.perf_counter()
            res = evaluate_sources(model, card["sources"], kind=card["kind"], seq_len=card["seq_len"],
                                   max_chunks=args.max_chunks or card["max_chunks"], seed=1234, low=0.85, high=0.99)
            res.update(model=card["model"], variant=name, seconds=time.perf_counter() - start,
                       activations=str(model.dtype), quantization=model.config.quantization)
            records.append(res)
            print(json.dumps(res), flush=True)
    for r in records:
        base = next(b for b in records if b["model"] == r["model"] and b["variant"] == "fp32")
        r["perplexity_vs_fp32"] = r["ppl"] / base["ppl"] - 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(threads=args.threads, records=records), indent=2))
    for r in records:
        print(f"{r['model']:15s} {r['variant']:24s} loss {r['loss']:.4f}  ppl {r['ppl']:8.2f}  "
              f"({100 * r['perplexity_vs_fp32']:+.2f}% vs fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
