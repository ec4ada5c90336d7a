"""Batch throughput on the shipped model: N ROCStories infills (sentence 3 hidden, its true token
length given, ASSD k = 5, seed = story index) through

  one-at-a-time  the same requests one after another in one process (the server's request path,
                 one in flight: what a loop over `asarm infill` or the server amounts to);
  batch          `asarm batch` (continuous batching, --max-batch);
  ray-1, ray-2   `asarm batch --ray --workers 1 / 2` (a local Ray; one torch thread per actor).

Every run writes its output under OUT; the table and JSON go to OUT/README.md and OUT/batch.json.
The figures are requests/s over decoding (model loading excluded for the local runs; for Ray the
whole run from the first request sent, actor start and model load included, and also without).

    python scripts/batch_bench.py --stories 1000 --out results/batch-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_requests(path: Path, n: int) -> int:
    from asarm.evaluation.rocstories import read_stories, split_story

    data = ROOT.parent / "shared" / "data" / "rocstories" / "cloze_test_val__spring2016.csv.gz"
    if not data.exists():
        data = Path("/work/shared/data/rocstories/cloze_test_val__spring2016.csv.gz")
    import asarm
    from asarm.tokenization import encode

    tok = asarm.load_model("asarm-en-small").tokenizer
    with open(path, "w") as f:
        for i, story in enumerate(read_stories(data)[:n]):
            prefix, middle, suffix = split_story(story["sentences"])
            body = {"prompt": prefix, "suffix": suffix, "hole_length": len(encode(tok, middle)),
                    "method": "assd", "k": 5, "seed": i}
            f.write(json.dumps({"custom_id": f"story-{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")
    return n


def one_at_a_time(requests_path: Path, out: Path) -> dict:
    """The same requests, one in flight, through the same in-process app (model load excluded)."""
    import torch

    import asarm
    from asarm.batch.format import OutputWriter, read_requests
    from asarm.batch.local import AppRunner, Progress, run_requests

    torch.set_num_threads(1)
    requests = read_requests(str(requests_path))
    runner = AppRunner(asarm.load_model("asarm-en-small"), model_name="asarm-en-small", max_batch=1)
    progress = Progress(len(requests), 0, enabled=False)
    with OutputWriter(str(out), overwrite=True) as writer:
        def on_line(line):
            writer.write(line)
            progress.update(line)
        try:
            asyncio.run(run_requests(runner, requests, on_line, concurrency=1))
        finally:
            runner.close()
    return progress.close()


def cli(requests_path: Path, out: Path, *extra: str) -> dict:
    summary = out.with_suffix(".summary.json")
    cmd = [sys.executable, "-m", "asarm.cli", "batch", str(requests_path), "-o", str(out), "--overwrite",
           "--no-progress", "--threads", "1", "--summary", str(summary), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    result = json.loads(summary.read_text())
    result["wall_s_with_loading"] = round(time.perf_counter() - start, 2)
    return result


def texts(path: Path) -> dict:
    out = {}
    for line in open(path):
        rec = json.loads(line)
        body = (rec.get("response") or {}).get("body") or {}
        out[rec["custom_id"]] = [c["text"] for c in body.get("choices", [])] or None
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stories", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--out", default="results/batch-cpu")
    p.add_argument("--skip", default="", help="comma-separated runs to skip")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    requests = out / "requests.jsonl"
    write_requests(requests, args.stories)
    runs, skip = {}, set(filter(None, args.skip.split(",")))
    load = {"before": os.getloadavg()}
    if "one" not in skip:
        runs["one-at-a-time"] = one_at_a_time(requests, out / "one-at-a-time.jsonl")
        print("one-at-a-time", runs["one-at-a-time"], flush=True)
    if "batch" not in skip:
        runs["batch"] = cli(requests, out / "batch.jsonl", "--max-batch", str(args.max_batch))
        print("batch", runs["batch"], flush=True)
    for workers in (1, 2):
        if f"ray{workers}" not in skip:
            runs[f"ray-{workers}"] = cli(requests, out / f"ray-{workers}.jsonl", "--ray", "--workers", str(workers),
                                         "--max-batch", str(args.max_batch))
            print(f"ray-{workers}", runs[f"ray-{workers}"], flush=True)
    load["after"] = os.getloadavg()
    reference = texts(out / "batch.jsonl") if (out / "batch.jsonl").exists() else None
    same = {name: texts(out / f"{name}.jsonl") == reference for name in runs if reference is not None}
    record = {"stories": args.stories, "max_batch": args.max_batch, "threads_per_worker": 1,
              "load_average": load, "runs": runs, "same_texts_as_batch": same,
              "command": "python scripts/batch_bench.py " + " ".join(sys.argv[1:])}
    (out / "batch.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
