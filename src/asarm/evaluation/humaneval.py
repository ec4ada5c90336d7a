"""``asarm eval humaneval-infilling``: code infilling pass@1 (docs/design.md, "Paper results").

Protocol (openai/human-eval-infilling, with the paper's given hole length): each task has a
prefix (``prompt``), a true middle (``canonical_solution``) and a ``suffix``. The sequence is
encode(prompt) + encode(middle) + encode(suffix), each piece encoded separately, and the middle's
tokens are hidden: the model learns the true length of the hole in tokens and nothing else.

Extraction is exact: the generated tokens of the hole are decoded alone, and the program is the
ORIGINAL prompt string + decoded middle + the ORIGINAL suffix string (no re-detokenisation of the
context, no stripping), followed by the task's tests and ``check(entry_point)``. Programs run in
sandboxed subprocesses (``execution.py``). pass@1 = the fraction of tasks whose one sample passes.

When prompt + middle + suffix is longer than the model's limit, the prompt loses tokens at its
start and the suffix at its end (the program still uses the full strings); a task whose middle
alone is too long counts as failed ("skipped").
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..errors import InputError, SandboxError
from .common import Example, find_shared_data, fit_infill
from .execution import humaneval_program, run_program, run_programs

VARIANTS = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}


def read_problems(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such HumanEval-infilling file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    need = {"task_id", "prompt", "suffix", "canonical_solution", "test", "entry_point"}
    if problems and not need <= set(problems[0]):
        raise InputError(f"{path}: not a HumanEval-infilling file (needs fields {sorted(need)})")
    return problems


def variant_path(variant: str, data=None) -> Path:
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if data is not None:
        p = Path(data)
        return p / VARIANTS[variant] if p.is_dir() else p
    found = find_shared_data("humaneval-infilling", VARIANTS[variant])
    if found is None:
        raise InputError(f"no HumanEval-infilling data found: pass --data PATH ({VARIANTS[variant]}, "
                         "from the data/ folder of openai/human-eval-infilling)")
    return found


class HumanEvalInfillingTask:
    name = "humaneval-infilling"

    def __init__(self, model, *, variant: str = "single-line", data=None, timeout: float = 10.0,
                 memory_mb: int = 1024, workers: int = 4, max_tokens: int | None = None):
        self.model = model
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise InputError("this model has no tokenizer files; evaluations need text in and out")
        self.tokenizer = tok
        self.variant = variant
        self.path = variant_path(variant, data)
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.workers = workers
        self.max_tokens = model_max_tokens(model, max_tokens)
        self._sandbox_checked = False

    def settings(self) -> dict:
        return {"variant": self.variant, "data": str(self.path), "timeout_s": self.timeout,
                "memory_mb": self.memory_mb, "hidden": "canonical middle, true token length",
                "max_tokens": self.max_tokens}

    def examples(self, limit: int | None) -> list[Example]:
        problems = read_problems(self.path)
        if limit is not None:
            problems = problems[:limit]
        return [problem_example(i, pr, self.tokenizer, self.max_tokens) for i, pr in enumerate(problems)]

    def check_sandbox(self, problem: dict) -> None:
        """Run one canonical solution before anything is scored: where the sandbox cannot run
        programs, every completion would silently count as a failure (pass@1 = 0)."""
        r = run_program(humaneval_program(problem, problem["canonical_solution"]), timeout=max(self.timeout, 10.0),
                        memory_mb=self.memory_mb)
        if not r.passed:
            raise SandboxError(f"the sandbox cannot run HumanEval programs on this machine: {problem['task_id']}'s "
                               f"canonical solution gave {r.status!r} ({r.detail.strip()[-300:] or 'no detail'})")
        self._sandbox_checked = True

    def score(self, examples, outputs, generated) -> list[dict]:
        from ..tokenization import decode

        if not self._sandbox_checked:
            self.check_sandbox(examples[0].info["problem"])
        middles = [decode(self.tokenizer, g) for g in generated]
        programs = [humaneval_program(e.info["problem"], m) for e, m in zip(examples, middles)]
        runnable = [i for i, e in enumerate(examples) if not e.info.get("skipped")]
        results = run_programs([programs[i] for i in runnable], workers=self.workers,
                               timeout=self.timeout, memory_mb=self.memory_mb)
        by_index = dict(zip(runnable, results))
        recs = []
        for i, (e, m) in enumerate(zip(examples, middles)):
            r = by_index.get(i)
            recs.append({
                "passed": bool(r.passed) if r else False,
                "status": r.status if r else "skipped",
                "detail": (r.detail if r else "middle longer than the model's limit")[-500:],
                "output": m,
                "exact_match": m == e.info["problem"]["canonical_solution"],
                "truncated_context": bool(e.info.get("truncated")),
            })
        return recs


def model_max_tokens(model, max_tokens):
    limit = model.config.max_length
    if max_tokens is None:
        return limit
    if max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {max_tokens}")
    return min(max_tokens, limit) if limit else max_tokens


def problem_example(index: int, problem: dict, tokenizer, max_len: int | None) -> Example:
    from ..tokenization import encode

    p = encode(tokenizer, problem["prompt"])
    m = encode(tokenizer, problem["canonical_solution"])
    s = encode(tokenizer, problem["suffix"])
    p2, s2, fits = fit_infill(p, m, s, max_len)
    info = {"problem": problem, "truncated": (len(p2), len(s2)) != (len(p), len(s))}
    if not fits:  # nothing to sample: scored as a failure
        info["skipped"] = True
        keep = p[-1:] or s[:1] or [0]
        return Example(index, problem["task_id"], keep, [False] * len(keep), info)
    return Example(index, problem["task_id"], p2 + m + s2, [False] * len(p2) + [True] * len(m) + [False] * len(s2), info)


def add_arguments(p) -> None:
    p.add_argument("--variant", default="single-line", choices=list(VARIANTS), help="benchmark variant (paper: single-line)")
    p.add_argument("--data", default=None, help="a HumanEval-infilling .jsonl[.gz] file or the folder holding them "
                   "(default: the project's offline copy)")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program (default 10)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (default 1024 MiB)")
    p.add_argument("--workers", type=int, default=4, help="programs run at once (default 4)")
    p.add_argument("--max-tokens", type=int, default=None, help="trim the prompt's start and the suffix's end so "
                   "that a sequence has at most this many tokens (default: the model's limit, if it has one)")


def build_task(model, args) -> HumanEvalInfillingTask:
    return HumanEvalInfillingTask(model, variant=args.variant, data=args.data, timeout=args.timeout,
                                  memory_mb=args.memory_mb, workers=args.workers, max_tokens=args.max_tokens)
