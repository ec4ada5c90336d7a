"""HumanEval single-line infilling with and without a one-line constraint on the hole.

    OMP_NUM_THREADS=1 python scripts/constrained_humaneval.py [--limit N]
        -> results/constrained/humaneval-single-line/{records.jsonl,summary.json,summary.md}

Protocol (as `asarm eval humaneval-infilling --variant single-line`, results/humaneval-single-line):
the shipped code model asarm-py-small, the reference line's token length given, prompt and suffix
trimmed to 256 tokens, ASSD self-draft k=5, temperature 1, one sample per task with the seed of
`asarm eval` (``batch_seed(seed, index)``), programs run in the evaluation sandbox. Each task is
sampled twice with the same seed: free, and with the hole constrained to one plausible line of
Python (``asarm.evaluation.python_line``: indentation from the context, no newline inside,
balanced brackets up to depth 3, closed strings, ':' at the end exactly when the next line is
deeper). Where no text of the hole's token length is such a line, the constrained run falls back
to the free sample (``constraint_applied`` false). A completion that does not compile
(``compile`` of the whole program) fails without running; the rest run in the sandbox.
Resumable: records already in records.jsonl are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import asarm  # noqa: E402
from asarm.evaluation.execution import humaneval_program, run_programs  # noqa: E402
from asarm.evaluation.humaneval import HumanEvalInfillingTask  # noqa: E402
from asarm.evaluation.python_line import line_automaton, line_shape  # noqa: E402
from asarm.sampling import DecodeConfig, sample  # noqa: E402
from asarm.sampling.constraints import HoleConstraint  # noqa: E402
from asarm.seeds import batch_seed  # noqa: E402
from asarm.text.constraints import token_bytes  # noqa: E402
from asarm.tokenization import decode  # noqa: E402

MODES = ("free", "constrained")
CHUNK = 100
KEEP_AUTOMATA = 4  # up to ~300 MB each (dicts of ~400 states x ~7,000 tokens)


def compiles(program: str) -> bool:
    """Whether the completed program is valid Python (parsed, never run)."""
    try:
        compile(program, "program.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


def summarize(records: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        rows = [r for r in records if r["mode"] == mode]
        n = len(rows)
        passed = sum(r["passed"] for r in rows)
        tokens = sum(r["generated_tokens"] for r in rows)
        out[mode] = {
            "n": n,
            "pass_at_1": passed / n if n else None,
            "pass_at_1_ci95": wilson(passed, n),
            "exact_match": sum(r["exact_match"] for r in rows) / n if n else None,
            "program_compiles": sum(r["compiles"] for r in rows) / n if n else None,
            "line_is_plausible": sum(r["plausible"] for r in rows) / n if n else None,
            "constraint_applied": sum(r["constraint_applied"] for r in rows) / n if n else None,
            "passes_per_token": sum(r["nfe"] for r in rows) / tokens if tokens else None,
        }
    free = {r["index"]: r for r in records if r["mode"] == "free"}
    both = [(free[r["index"]], r) for r in records if r["mode"] == "constrained" and r["index"] in free]
    out["paired"] = {"tasks": len(both)}
    for field in ("passed", "compiles", "exact_match"):
        only_constrained = sum(c[field] and not f[field] for f, c in both)
        only_free = sum(f[field] and not c[field] for f, c in both)
        out["paired"][field] = {"only_constrained": only_constrained, "only_free": only_free,
                                "mcnemar_p": mcnemar(only_constrained, only_free)}
    return out


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of b vs c discordant pairs (a binomial test at 1/2)."""
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def markdown(summary: dict, meta: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"# HumanEval single-line infilling, free vs one-line constraint ({meta['model']})", "",
             f"ASSD self-draft k={meta['k']}, temperature 1, seed {meta['seed']} (same seed per task in both runs), "
             f"true hole length given, {meta['threads']} torch thread; sandbox timeout {meta['timeout_s']} s.", "",
             "| hole | tasks | pass@1 (%) | 95% CI | exact match (%) | program compiles (%) | plausible line (%) "
             "| constraint applied (%) | passes/token |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        s = summary[mode]
        lo, hi = s["pass_at_1_ci95"]
        lines.append(f"| {mode} | {s['n']} | {pct(s['pass_at_1'])} | [{pct(lo)}, {pct(hi)}] | {pct(s['exact_match'])} "
                     f"| {pct(s['program_compiles'])} | {pct(s['line_is_plausible'])} | {pct(s['constraint_applied'])} "
                     f"| {s['passes_per_token']:.3f} |")
    p = summary["paired"]
    lines += ["", f"Paired over {p['tasks']} tasks (only with the constraint / only without, exact McNemar p):"]
    for field in ("passed", "compiles", "exact_match"):
        q = p[field]
        lines.append(f"- {field.replace('_', ' ')}: {q['only_constrained']} / {q['only_free']}, p = {q['mcnemar_p']:.2g}")
    lines += ["", f"Reference lines the constraint admits: {meta['reference_admitted']} of {meta['tasks']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="the first N tasks (default: all 1,033)")
    parser.add_argument("--out", default=str(ROOT / "results" / "constrained" / "humaneval-single-line"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="programs run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    parser.add_argument("--report-only", action="store_true", help="write the summary of the records already "
                        "there for the first --limit tasks (a run cut short: whole chunks of 100 tasks)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = asarm.load_model("asarm-py-small")
    task = HumanEvalInfillingTask(model, variant="single-line", max_tokens=256, workers=args.workers,
                                  timeout=args.timeout)
    examples = task.examples(args.limit)
    task.check_sandbox(examples[0].info["problem"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records_file = out / "records.jsonl"
    records = [json.loads(line) for line in records_file.open()] if records_file.exists() else []
    done = {(r["mode"], r["index"]) for r in records}
    tok, config = model.tokenizer, DecodeConfig(method="assd", draft="self", k=args.k)
    vocabulary, excluded = token_bytes(tok), {model.config.mask_token_id}

    def shape_key(e):
        problem = e.info["problem"]
        return sorted(line_shape(problem["prompt"], problem["suffix"]).items())

    automata: dict = {}
    start_time = time.perf_counter()
    with records_file.open("a") as f:
        # chunks of CHUNK tasks in order (a run cut short has whole chunks), each sorted by the
        # line's shape, so that each automaton is built about once per chunk
        for count, e in enumerate(sorted(examples, key=lambda e: (e.index // CHUNK, shape_key(e), e.index))):
            problem = e.info["problem"]
            key = json.dumps(shape_key(e))
            if key not in automata and not args.report_only:
                if len(automata) >= KEEP_AUTOMATA:  # drop the oldest
                    del automata[next(iter(automata))]
                automata[key] = line_automaton(problem["prompt"], problem["suffix"], vocabulary,
                                               model.config.vocab_size, excluded)
            if args.report_only or all((m, e.index) in done for m in MODES):
                continue
            automaton = automata[key]
            truth = [t for t, h in zip(e.ids, e.hidden) if h]
            ids, hidden = torch.tensor([e.ids]), torch.tensor([e.hidden])
            start, n = e.hidden.index(True) if any(e.hidden) else 0, e.num_hidden
            seed = batch_seed(args.seed, e.index)
            rows = []
            for mode in MODES:
                applied = mode == "constrained" and not e.info.get("skipped") and automaton.admits(n)
                middle, result = "", None
                if not e.info.get("skipped"):
                    constraints = [[HoleConstraint(start, start + n, automaton)]] if applied else None
                    result = sample(model, ids, hidden, config, seed=seed, constraints=constraints)
                    generated = result.input_ids[0, start:start + n].tolist()
                    middle = decode(tok, generated)
                program = humaneval_program(problem, middle)
                rows.append({"index": e.index, "id": e.id, "mode": mode, "seed": seed, "hidden_tokens": n,
                             "constraint_applied": applied, "reference_admitted": automaton.accepts(truth),
                             "output": middle, "exact_match": middle == problem["canonical_solution"],
                             "plausible": result is not None and automaton.accepts(generated),
                             "compiles": result is not None and compiles(program), "program": program,
                             "nfe": int(result.nfe[0]) if result is not None else 0,
                             "generated_tokens": int(sum(result.accepted[0])) if result is not None else 0})
            runnable = [r for r in rows if r["compiles"]]
            results = run_programs([r["program"] for r in runnable], workers=args.workers, timeout=args.timeout,
                                   memory_mb=task.memory_mb)
            for r in rows:
                r.update(passed=False, status="skipped" if e.info.get("skipped") else "does not compile")
            for r, x in zip(runnable, results):
                r.update(passed=x.passed, status=x.status)
            for r in rows:
                if (r["mode"], r["index"]) not in done:
                    del r["program"]
                    f.write(json.dumps(r) + "\n")
                    records.append(r)
            f.flush()
            if count % 50 == 0:
                print(f"{count + 1}/{len(examples)} tasks, {time.perf_counter() - start_time:.0f} s", file=sys.stderr)
    wanted = {e.index for e in examples}
    records = [r for r in records if r["index"] in wanted]
    missing = len(wanted) - len({r["index"] for r in records})
    if missing:
        print(f"{missing} of the {len(wanted)} tasks have no records yet", file=sys.stderr)
    admitted = sum(r["reference_admitted"] for r in records if r["mode"] == "free")
    summary = summarize(records)
    meta = {"model": "asarm-py-small", "k": args.k, "seed": args.seed, "threads": torch.get_num_threads(),
            "timeout_s": args.timeout, "tasks": len(wanted) - missing, "reference_admitted": admitted,
            "command": "python scripts/constrained_humaneval.py" + (f" --limit {args.limit}" if args.limit else "")}
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
