"""The sandbox that runs generated code, checked with HumanEval-infilling oracles: canonical
solutions pass, corrupted ones fail, loops and sleeps time out, early exits do not count."""

from __future__ import annotations

import pytest

from asarm.evaluation.common import find_shared_data
from asarm.evaluation.execution import humaneval_program, run_program, run_programs
from asarm.evaluation.humaneval import VARIANTS, read_problems


def problems(variant: str, n: int = 3) -> list[dict]:
    path = find_shared_data("humaneval-infilling", VARIANTS[variant])
    if path is None:
        pytest.skip("offline HumanEval-infilling data not found")
    probs = read_problems(path)
    # spread over the file: different HumanEval tasks, not n holes of the first one
    step = max(1, len(probs) // n)
    return probs[::step][:n]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_canonical_solutions_pass_and_corrupted_ones_fail(variant):
    probs = problems(variant)
    good = [humaneval_program(p, p["canonical_solution"]) for p in probs]
    # a syntax error in the middle, and a well-formed line that breaks the function at the hole
    bad = [humaneval_program(p, p["canonical_solution"] + "\n)(\n") for p in probs]
    results = run_programs(good + bad, workers=2, timeout=20)
    for p, r in zip(probs, results[: len(probs)]):
        assert r.passed, (p["task_id"], r.detail)
    for p, r in zip(probs, results[len(probs):]):
        assert not r.passed and r.status == "failed", p["task_id"]


def test_semantically_wrong_middle_fails():
    path = find_shared_data("humaneval-infilling", VARIANTS["single-line"])
    if path is None:
        pytest.skip("offline HumanEval-infilling data not found")
    p = read_problems(path)[0]
    assert p["canonical_solution"] == "    for idx, elem in enumerate(numbers):\n"
    r = run_program(humaneval_program(p, "    for idx, elem in enumerate(numbers[:1]):\n"), timeout=20)
    assert r.status == "failed" and "AssertionError" in r.detail


def test_program_is_prompt_middle_suffix_exactly():
    p = {"prompt": "def f(x):\n", "suffix": "    return y\n", "test": "def check(c):\n    assert c(2) == 3\n",
         "entry_point": "f", "canonical_solution": "    y = x + 1\n"}
    prog = humaneval_program(p, "    y = x + 1\n")
    assert prog.startswith("def f(x):\n    y = x + 1\n    return y\n")
    assert prog.rstrip().endswith("check(f)")
    assert run_program(prog).passed
    assert not run_program(humaneval_program(p, "    y = x + 2\n")).passed


def test_infinite_loop_and_sleep_are_stopped():
    loop = run_program("while True:\n    pass\n", timeout=1.5)
    assert loop.status == "timeout" and not loop.passed and loop.elapsed < 15
    sleep = run_program("import time\ntime.sleep(60)\n", timeout=1.0)
    assert sleep.status == "timeout" and sleep.elapsed < 15
    # CPU-time limit below the wall clock: the kernel stops the loop
    cpu = run_program("while True:\n    pass\n", timeout=20, cpu_seconds=1)
    assert cpu.status == "timeout" and cpu.elapsed < 15


def test_early_exit_is_not_a_pass():
    assert not run_program("import sys\nsys.exit(0)\nassert False\n").passed
    assert not run_program("raise SystemExit(0)\n").passed
    assert run_program("x = 1\n").passed


def test_limits_and_no_network():
    assert run_program("x = bytearray(8 * 1024 ** 3)\n", memory_mb=512).status == "failed"
    r = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert r.status == "failed" and "network" in r.detail
    r = run_program("import os\nos.system('echo hi')\n")
    assert r.status == "failed"
    # the program runs in a fresh temporary directory and only sees a minimal environment
    assert run_program("import os\nassert os.path.basename(os.getcwd()).startswith('asarm-exec-')\n"
                       "assert not any('proxy' in k.lower() for k in os.environ)\n").passed
