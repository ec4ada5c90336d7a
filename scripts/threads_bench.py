"""How many torch threads to use on the CPU: 30-token infills with the shipped models at several
thread counts, with the machine as it is and with background processes keeping cores busy.

    python scripts/threads_bench.py                       # threads 1,2,default x load 0,1 busy cores
    python scripts/threads_bench.py --threads 1,2,4 --loads 0,1,2 --reps 5

Each (model, threads) cell runs in a fresh worker process that loads the model, warms up with one
infill, then times --reps infills (different seeds, same text) and reports the median. "default"
leaves torch's own choice (one thread per core). A busy core is a `while True: pass` process
started before the worker and killed after it. Cells are interleaved so that drifting load from
other users of the machine hits every setting. Writes results/threads-cpu/threads.json and
threads.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEXTS = {
    "asarm-en-small": "The old fisherman rowed out past the rocks at dawn.[MASK:30]",
    "asarm-py-small": "def mean(values):\n    \"\"\"Average of a list of numbers.\"\"\"\n[MASK:30]",
}
SPIN = "while True: pass"


def worker(model_name: str, threads: str, reps: int, budget_s: float) -> dict:
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    from asarm.checkpoint import load_model
    from asarm.text import infill

    model = load_model(model_name, device="cpu")
    text = TEXTS[model_name]
    infill(model, text, seed=0)  # warm-up: first-call allocations
    times: list[float] = []
    start = time.perf_counter()
    for rep in range(reps):
        t = time.perf_counter()
        infill(model, text, seed=rep + 1)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:  # a collapsed setting: enough to show it
            break
    return {"threads_used": torch.get_num_threads(), "times_s": [round(x, 4) for x in times]}


def run_cell(model_name: str, threads: str, busy: int, reps: int, budget_s: float) -> dict:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        time.sleep(0.2 if busy else 0)
        cmd = [sys.executable, __file__, "--worker", model_name, "--threads", threads, "--reps", str(reps),
               "--budget", str(budget_s)]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    times = result["times_s"]
    return {"model": model_name, "threads": threads, "threads_used": result["threads_used"], "busy_cores": busy,
            "loadavg_1min_at_start": round(load, 2), "median_s": round(statistics.median(times), 4),
            "min_s": min(times), "runs": len(times), "times_s": times}


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"30-token infill (ASSD, self-draft, k=5), median of up to {meta['reps']} runs per cell after a warm-up; "
             f"{meta['cpus']} CPUs ({meta['processor']}), torch {meta['torch']}; {meta['date']}.",
             "The machine is shared with other sessions: 'busy cores' are ours on top of whatever else ran "
             "(load average at the start of each cell in the last column).", "",
             "| model | threads | busy cores (ours) | median s / infill | min s | runs | load avg |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        threads = f"default ({r['threads_used']})" if r["threads"] == "default" else r["threads"]
        lines.append(f"| {r['model']} | {threads} | {r['busy_cores']} | {r['median_s']:.3f} | {r['min_s']:.3f} "
                     f"| {r['runs']} | {r['loadavg_1min_at_start']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", default="1,2,default", help="comma-separated thread counts ('default' = torch's)")
    parser.add_argument("--loads", default="0,1", help="comma-separated numbers of busy cores to add")
    parser.add_argument("--models", default=",".join(TEXTS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=40.0, help="stop a cell's repetitions after this many seconds")
    parser.add_argument("--out", default="results/threads-cpu")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.reps, args.budget)))
        return
    import torch

    meta = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), "reps": args.reps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_before": os.getloadavg()}
    records = []
    for busy in [int(x) for x in args.loads.split(",")]:
        for model_name in args.models.split(","):
            for threads in args.threads.split(","):
                records.append(run_cell(model_name, threads, busy, args.reps, args.budget))
                print(json.dumps(records[-1]), flush=True)
    meta["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "threads.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    (out / "threads.md").write_text(markdown(records, meta))
    print(markdown(records, meta))


if __name__ == "__main__":
    main()
