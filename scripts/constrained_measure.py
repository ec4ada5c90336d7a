"""Constrained holes: overhead of constrained ASSD on the shipped model, and how far the locally
renormalized chain is from the model conditioned on the constraint (an enumerable tiny case).

    OMP_NUM_THREADS=1 python scripts/constrained_measure.py [--only overhead|distance]
        ->  results/constrained/{overhead,distance}.json

The overhead target (constrained ASSD >= 0.8x the tokens/s of unconstrained ASSD) needs a quiet
machine: ``--only overhead`` takes about 2 minutes on one idle core.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
OUT = ROOT / "results" / "constrained"

import asarm  # noqa: E402
from asarm.text.constraints import compile_spec  # noqa: E402


TEXTS = {  # per shipped model: a text with constrained holes, and the constraints
    "asarm-en-small": ("The meeting was held in [MASK:3] in the city of [MASK:4]. Its budget was [MASK:4] dollars, "
                       "and the chair wore [MASK:2].",
                       {0: {"regex": r" (19|20)[0-9][0-9]"}, 1: {"regex": r" [A-Z][a-z]+( [A-Z][a-z]+)?"},
                        2: {"regex": r" [0-9]{1,3}(,[0-9]{3})*"}, 3: {"choice": [" red", " dark blue", " a hat"]}}),
    "asarm-py-small": ("def area(width, height):\n    [MASK:6]\n    return[MASK:4]\n\nprint(area([MASK:2], 3))\n",
                       {0: {"regex": r" [a-z_]+ = [a-z_]+ \* [a-z_]+"}, 1: {"regex": r" [a-z_]+( [*+] [0-9]+)?"},
                        2: {"regex": r"[0-9]+"}}),
}
METHODS = {"assd-self-k5": dict(k=5), "assd-ngram-k5": dict(draft="ngram", k=5),
           "assd-one-pass-k5": dict(k=5, one_pass=True), "sequential": dict(method="sequential")}


def overhead(runs: int = 12) -> dict:
    """Tokens/s of the same infill, free and constrained, side by side: each seed runs free then
    constrained, so both see the same load (compilation done before, as a server caches it)."""
    torch.set_num_threads(1)
    out = {}
    for name, (text, constraints) in TEXTS.items():
        model = asarm.load_model(name)
        start = time.perf_counter()
        for spec in constraints.values():
            compile_spec(spec, model.tokenizer, model.config.vocab_size, {model.config.mask_token_id})
        compile_seconds = time.perf_counter() - start
        rows = {}
        for method, options in METHODS.items():
            totals = {"free": [0, 0.0], "constrained": [0, 0.0]}
            for seed in range(-1, runs):  # seed -1: a warm-up, not counted
                for label, cons in (("free", None), ("constrained", constraints)):
                    start = time.perf_counter()
                    _, result = asarm.infill(model, text, seed=max(seed, 0), constraints=cons, return_result=True,
                                             **options)
                    if seed >= 0:
                        totals[label][0] += sum(result.accepted)
                        totals[label][1] += time.perf_counter() - start
            rows[method] = {label: {"tokens_per_s": round(t / s, 1), "seconds": round(s, 2)}
                            for label, (t, s) in totals.items()}
            rows[method]["ratio"] = round(rows[method]["constrained"]["tokens_per_s"]
                                          / rows[method]["free"]["tokens_per_s"], 3)
        out[name] = {"text": text, "constraints": constraints, "compile_seconds_first_time": round(compile_seconds, 3),
                     "results": rows}
    return {"threads": 1, "runs_per_cell": runs, "protocol": "free and constrained alternate per seed; "
            "automata compiled before timing; 1 torch thread", "models": out}


def distance() -> dict:
    """Total variation between the locally renormalized chain and p(x | x matches), exactly."""
    from conftest import tiny_model
    from exact import exact_joint
    from test_constraints import HOLES, INPUT, MASKED, VOCAB, constrained_joint
    import re

    model = tiny_model(seed=3)
    out = {}
    for order in ([2, 3, 5], [5, 2, 3]):
        local = constrained_joint(model, INPUT, MASKED, order)
        free = exact_joint(model, INPUT, MASKED, order)

        def matches(x):
            return all(re.fullmatch(rx, b"".join(VOCAB[x[i]] for i, p in enumerate([2, 3, 5]) if s <= p < e).decode())
                       for s, e, rx in HOLES)

        z = sum(p for x, p in free.items() if matches(x))
        conditioned = {x: (p / z if matches(x) else 0.0) for x, p in free.items()}
        tv = 0.5 * sum(abs(local[x] - conditioned[x]) for x in free)
        out["order " + ",".join(map(str, order))] = {"total_variation": round(tv, 4), "mass_of_constraint": round(z, 4)}
    return {"model": "tiny test model (tests/test_constraints.py: vocab 8, 3 hidden positions)",
            "holes": [list(h) for h in HOLES], "results": out}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="constrained holes: overhead and distance measurements")
    parser.add_argument("--only", choices=["overhead", "distance"], default=None)
    parser.add_argument("--runs", type=int, default=12, help="timed runs per (model, sampler, free/constrained)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.only != "overhead":
        d = distance()
        (OUT / "distance.json").write_text(json.dumps(d, indent=2) + "\n")
        print(json.dumps(d, indent=2))
    if args.only != "distance":
        o = overhead(args.runs)
        (OUT / "overhead.json").write_text(json.dumps(o, indent=2) + "\n")
        print(json.dumps({m: {k: v["ratio"] for k, v in r["results"].items()} for m, r in o["models"].items()}, indent=2))
