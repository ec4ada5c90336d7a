"""Where a batch's time goes, by proportions and counts (issue 27: why ~3x and not 4x).

ROCStories rows (sentence 3 hidden, true length, ASSD k = 5; the evaluation's tokenization) on one
engine (``asarm.batch.rows.iter_decoded``), one torch thread, for each --max-batch with and
without ordering rows by hidden-token count (length bucketing). Per run: passes, rows per pass,
row-passes (rows summed over passes: the work the engine pays for), and CPU-seconds split into
the network forward, the engine's host work around it (plan, draws, verify, advance) and the
driver outside the engine. CPU time (``time.process_time``), not wall-clock: on a loaded machine
the proportions and the counts hold, the absolute seconds do not.

    python scripts/batch_profile.py --stories 200 --out results/batch-cpu/profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def rows(n: int):
    import asarm
    from asarm.batch.rows import RowTask
    from asarm.evaluation.rocstories import RocStoriesTask
    from asarm.sampling.config import DecodeConfig

    model = asarm.load_model("asarm-en-small")
    config = DecodeConfig(method="assd", k=5)
    mask = model.config.mask_token_id
    tasks = [RowTask(str(e.index), [mask if h else t for t, h in zip(e.ids, e.hidden)], e.hidden, config, e.index)
             for e in RocStoriesTask(model).examples(n)]
    return model, tasks


def profile(model, tasks, max_batch: int, sort: bool) -> dict:
    from asarm.batch.rows import iter_decoded

    stats = {}
    start, wall = time.process_time(), time.perf_counter()
    results = list(iter_decoded(model, tasks, max_batch=max_batch, sort=sort, stats=stats))
    cpu, wall = time.process_time() - start, time.perf_counter() - wall
    tokens = sum(sum(r.accepted) for r in results)
    return {"max_batch": max_batch, "sorted_by_hidden": sort, "rows": len(results), "tokens": tokens,
            "passes": stats["passes"], "row_passes": stats["row_passes"],
            "rows_per_pass": round(stats["row_passes"] / stats["passes"], 2),
            "cpu_s": round(cpu, 2), "rows_per_cpu_s": round(len(results) / cpu, 2),
            "share_forward": round(stats["forward_seconds"] / wall, 3),
            "share_engine_host": round((stats["step_seconds"] - stats["forward_seconds"]) / wall, 3),
            "share_outside_engine": round(1 - stats["step_seconds"] / wall, 3)}


def profile_app(model, n: int, max_batch: int, sort: bool) -> dict:
    """The same stories as ``asarm batch`` requests (/v1/completions with hole_length, as
    scripts/batch_bench.py writes them) through the server's app in-process: the engine's share
    of the wall-clock, the rest being request handling (JSON, schemas, tokenization and planning
    in the prepare thread, asyncio) and the engine waiting for it."""
    import asyncio
    import tempfile

    from asarm.batch.format import read_requests
    from asarm.batch.local import AppRunner, by_generation, run_requests

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from batch_bench import write_requests

    path = Path(tempfile.mkdtemp()) / "requests.jsonl"
    write_requests(path, n)
    requests = read_requests(str(path))
    if sort:
        requests = by_generation(requests)
    runner = AppRunner(model, model_name="asarm-en-small", max_batch=max_batch)
    engine = runner.state.loop.adapter.engine
    lines = []
    start, wall = time.process_time(), time.perf_counter()
    try:
        asyncio.run(run_requests(runner, requests, lines.append))
    finally:
        runner.close()
    cpu, wall = time.process_time() - start, time.perf_counter() - wall
    return {"path": "asarm batch (server app)", "max_batch": max_batch, "sorted_by_generation": sort,
            "rows": len(lines), "cpu_s": round(cpu, 2), "rows_per_cpu_s": round(len(lines) / cpu, 2),
            "share_forward": round(engine.forward_seconds / wall, 3),
            "share_engine_host": round((engine.step_seconds - engine.forward_seconds) / wall, 3),
            "share_outside_engine": round(1 - engine.step_seconds / wall, 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stories", type=int, default=200)
    p.add_argument("--max-batch", default="1,16,32,64", help="engine runs; the app runs use 32")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    model, tasks = rows(args.stories)
    runs = []
    for mb in (int(x) for x in args.max_batch.split(",")):
        for sort in ((False,) if mb == 1 else (False, True)):
            runs.append(profile(model, tasks, mb, sort))
            print(json.dumps(runs[-1]), flush=True)
    for sort in (False, True):
        runs.append(profile_app(model, args.stories, 32, sort))
        print(json.dumps(runs[-1]), flush=True)
    record = {"stories": args.stories, "threads": 1, "load_average_after": os.getloadavg(), "runs": runs,
              "command": "python scripts/batch_profile.py --stories %d --max-batch %s" % (args.stories, args.max_batch)}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
