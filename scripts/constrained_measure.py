"""Constrained holes: overhead of constrained ASSD on the shipped model, and how far the locally
renormalized chain is from the model conditioned on the constraint (an enumerable tiny case).

    OMP_NUM_THREADS=1 python scripts/constrained_measure.py  ->  results/constrained/*.json
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


def overhead(repeats: int = 3) -> dict:
    """Tokens/s of the same infill, free and constrained (ASSD self-draft k=5 and n-gram)."""
    torch.set_num_threads(1)
    model = asarm.load_model("asarm-en-small")
    text = ("The meeting was held in [MASK:3] in the city of [MASK:4]. Its budget was [MASK:4] dollars, "
            "and the chair wore [MASK:2].")
    constraints = {0: {"regex": r" (19|20)[0-9][0-9]"}, 1: {"regex": r" [A-Z][a-z]+( [A-Z][a-z]+)?"},
                   2: {"regex": r" [0-9]{1,3}(,[0-9]{3})*"}, 3: {"choice": [" red", " dark blue", " a hat"]}}
    t = time.perf_counter()
    for spec in constraints.values():
        compile_spec(spec, model.tokenizer, model.config.vocab_size, {model.config.mask_token_id})
    compile_seconds = time.perf_counter() - t
    rows = {}
    for name, options in {"assd-self-k5": dict(k=5), "assd-ngram-k5": dict(draft="ngram", k=5),
                          "assd-one-pass-k5": dict(k=5, one_pass=True), "sequential": dict(method="sequential")}.items():
        for label, cons in (("free", None), ("constrained", constraints)):
            tokens = seconds = 0.0
            for seed in range(repeats * 4):
                start = time.perf_counter()
                _, result = asarm.infill(model, text, seed=seed, constraints=cons, return_result=True, **options)
                seconds += time.perf_counter() - start
                tokens += sum(result.accepted)
            rows.setdefault(name, {})[label] = {"tokens_per_s": round(tokens / seconds, 1),
                                                "seconds": round(seconds, 2)}
        rows[name]["ratio"] = round(rows[name]["constrained"]["tokens_per_s"] / rows[name]["free"]["tokens_per_s"], 3)
    return {"model": "asarm-en-small", "threads": 1, "text": text, "constraints": constraints,
            "compile_seconds_first_time": round(compile_seconds, 3), "runs_per_cell": repeats * 4, "results": rows}


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
    OUT.mkdir(parents=True, exist_ok=True)
    d = distance()
    (OUT / "distance.json").write_text(json.dumps(d, indent=2) + "\n")
    print(json.dumps(d, indent=2))
    o = overhead()
    (OUT / "overhead.json").write_text(json.dumps(o, indent=2) + "\n")
    print(json.dumps(o, indent=2))
