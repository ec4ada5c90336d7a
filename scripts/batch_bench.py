"""Batch throughput on the shipped model: N ROCStories infills (sentence 3 hidden, its true token
length given, ASSD k = 5, seed = story index) through

  one-at-a-time  the same requests one after another in one process (the server's request path,
                 one in flight: what a loop over `asarm infill` or the server amounts to);
  batch          `asarm batch` (continuous batching, --max-batch);
  ray-1, ray-2   `asarm batch --ray --workers 1 / 2` (a local Ray; one torch thread per actor).

Every process and actor runs one torch thread. Every run writes its output under OUT; the figures
go to OUT/batch.json, OUT/batch.png and the table between the markers in OUT/README.md. Requests/s
count decoding: model loading is excluded for the local runs; for Ray the actors' start-up (Ray,
the actor processes, their model loads: from the run's start to the first actor ready) is reported
apart, and the rate is given over the decoding after it and over the whole run. About 5-6 minutes
for 1,000 stories on an idle 2-core machine (one at a time is most of it).

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


def decode_rates(run: dict) -> dict:
    """A Ray run's rates over decoding alone (after the first actor was ready)."""
    actors = run.get("actors") or {}
    if actors.get("decode_s"):
        run["decode_requests_per_s"] = round(run["requests"] / actors["decode_s"], 3)
        run["decode_tokens_per_s"] = round(run["tokens"] / actors["decode_s"], 2)
    return run


def compress(path: Path) -> None:
    import gzip
    import shutil

    with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()


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
            runs[f"ray-{workers}"] = decode_rates(cli(requests, out / f"ray-{workers}.jsonl", "--ray", "--workers",
                                                      str(workers), "--max-batch", str(args.max_batch)))
            print(f"ray-{workers}", runs[f"ray-{workers}"], flush=True)
    load["after"] = os.getloadavg()
    reference = texts(out / "batch.jsonl") if (out / "batch.jsonl").exists() else None
    same = {name: texts(out / f"{name}.jsonl") == reference for name in runs if reference is not None}
    record = {"stories": args.stories, "max_batch": args.max_batch, "threads_per_worker": 1,
              "load_average": load, "runs": runs, "same_texts_as_batch": same,
              "command": "python scripts/batch_bench.py " + " ".join(sys.argv[1:])}
    (out / "batch.json").write_text(json.dumps(record, indent=2) + "\n")
    for name in runs:  # the outputs stay, compressed (texts compared above)
        compress(out / f"{name}.jsonl")
    table = markdown_table(record)
    write_table(out / "README.md", table)
    plot(record, out / "batch.png")
    print(table)


RUNS = {"one-at-a-time": "one at a time (same path, one in flight)", "batch": "`asarm batch --max-batch {mb}`",
        "ray-1": "`--ray --workers 1`", "ray-2": "`--ray --workers 2`"}
TABLE_START, TABLE_END = "<!-- batch_bench table -->", "<!-- /batch_bench table -->"


def rate(run: dict) -> float:
    """Requests/s over decoding: the local runs' own figure, Ray's after its start-up."""
    return run.get("decode_requests_per_s") or run["requests_per_s"]


def markdown_table(record: dict) -> str:
    runs = record["runs"]
    one = runs.get("one-at-a-time")
    lines = [TABLE_START, "",
             f"{record['stories']} ROCStories infills, `--max-batch {record['max_batch']}`, one torch thread per "
             f"process / actor, load average {record['load_average']['before'][0]:.1f} before and "
             f"{record['load_average']['after'][0]:.1f} after (`{record['command']}`):", "",
             "| run | requests/s (decoding) | tokens/s | Ray start-up s | requests/s incl. start-up | vs one at a time "
             "| same texts as batch |", "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        actors = run.get("actors") or {}
        ratio = f"{rate(run) / rate(one):.2f}×" if one else "–"
        if name == "ray-2" and "ray-1" in runs:
            ratio += f" ({rate(run) / rate(runs['ray-1']):.2f}× one actor)"
        lines.append(f"| {RUNS[name].format(mb=record['max_batch'])} | {rate(run):.2f} "
                     f"| {run.get('decode_tokens_per_s') or run['tokens_per_s']:.1f} "
                     f"| {actors.get('startup_s', '–')} | {run['requests_per_s']:.2f} | {ratio} "
                     f"| {record['same_texts_as_batch'].get(name, '–')} |")
    return "\n".join(lines + ["", TABLE_END])


def write_table(readme: Path, table: str) -> None:
    """Put the table between its markers in README.md (appended the first time)."""
    text = readme.read_text() if readme.exists() else "# `asarm batch` throughput\n"
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + table + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    readme.write_text(text)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["runs"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [rate(record["runs"][n]) for n in names], color="#4c72b0")
    ax.set_ylabel("requests/s (decoding)")
    ax.set_title(f"{record['stories']} ROCStories infills, 1 torch thread per worker")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
