"""kill -9 at random points, then resume: every custom_id exactly once (issue 27's target).

Runs `asarm batch --resume` on N requests and SIGKILLs it at a random moment (ROUNDS times, each a
real kill: a round whose run finished first is run again, so the check never passes on fewer kills),
then lets a last `--resume` finish, and checks the output: every custom_id of the input exactly
once, every line whole JSON, no error. The moment: uniform in 0-2 s after the run's first new output
line (the model has loaded, lines are flowing), so the kill lands anywhere in the write loop. Exit
code 1 when the target is missed.

    python scripts/batch_kill_check.py --requests 400 --rounds 5 --out results/batch-cpu/kill-check.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STORY = "The old man walked to the [MASK:8] and sat down, and the [MASK:6] was cold."


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="asarm-kill-"))
    src, dst = work / "in.jsonl", work / "out.jsonl"
    with open(src, "w") as f:
        for i in range(args.requests):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/infill",
                                "body": {"text": STORY, "seed": i}}) + "\n")
    cmd = [sys.executable, "-m", "asarm.cli", "batch", str(src), "-o", str(dst), "--resume", "--no-progress",
           "--max-batch", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rounds = []
    while sum(r["killed"] for r in rounds) < args.rounds:
        before = dst.read_bytes().count(b"\n") if dst.exists() else 0
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and (dst.read_bytes().count(b"\n") if dst.exists() else 0) <= before:
            time.sleep(0.02)  # wait for its first line: the model has loaded and lines are flowing
        delay = rng.uniform(0.0, 2.0)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        after = dst.read_bytes()
        rounds.append({"round": len(rounds) + 1, "kill_after_first_line_s": round(delay, 3), "killed": not finished,
                       "lines_before": before, "lines_after": after.count(b"\n"),
                       "torn_tail": not after.endswith(b"\n")})
        print(rounds[-1], flush=True)
        if finished and after.count(b"\n") >= args.requests:
            break  # everything is written: no kill can land any more (too few requests for the rounds)
    final = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    counts = collections.Counter(x["custom_id"] for x in lines)
    result = {"requests": args.requests, "kills": sum(r["killed"] for r in rounds), "rounds": rounds,
              "final_exit": final.returncode,
              "output_lines": len(lines), "distinct_custom_ids": len(counts),
              "duplicates": sorted(k for k, v in counts.items() if v > 1),
              "missing": sorted(set(f"r{i}" for i in range(args.requests)) - set(counts)),
              "errors": sum(1 for x in lines if x["error"] is not None)}
    result["every_custom_id_exactly_once"] = (not result["duplicates"] and not result["missing"]
                                              and len(lines) == args.requests)
    result["target_met"] = (result["every_custom_id_exactly_once"] and result["kills"] >= args.rounds
                            and result["errors"] == 0 and final.returncode == 0)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if result["target_met"] else 1)


if __name__ == "__main__":
    main()
