"""Load test of ``asarm serve`` on loopback: closed-loop clients for a bounded time.

    asarm bench serve --clients 1,8,32 --duration 30 --repeats 3 --out results/serve-cpu
    python -m asarm.bench.loadtest ...   (the same)

Starts ``asarm serve`` as a subprocess (or uses ``--url``), then for each client count N runs N
clients that each send /v1/completions requests back to back for ``--duration`` seconds (then
wait for the requests in flight). N = 1 is the one-at-a-time throughput. The client counts run
``--repeats`` times, interleaved, and medians are reported. Reports requests/s,
generated tokens/s, p50/p99 latency, errors and 429 rejections per N, the speed-up over N = 1,
and writes results.json and throughput.png to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "The old man walked to the",
    "She opened the door and",
    "After the storm, the village",
    "My brother never liked",
    "On the first day of school,",
    "The train was late, so we",
    "He looked at the letter and",
    "In the morning the market",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def client(http, url: str, body_of, deadline: float, stats: dict, cid: int) -> None:
    i = 0
    while time.monotonic() < deadline:
        body = body_of(cid, i)
        i += 1
        start = time.perf_counter()
        try:
            r = await http.post(url + "/v1/completions", json=body)
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            stats["errors"] += 1
            stats["error_kinds"].append(type(exc).__name__)
            continue
        if r.status_code == 429:
            stats["rejected"] += 1
            await asyncio.sleep(float(r.headers.get("Retry-After", 1)))
        elif r.status_code != 200:
            stats["errors"] += 1
            stats["error_kinds"].append(str(r.status_code))
        else:
            stats["latency"].append(time.perf_counter() - start)
            stats["tokens"] += r.json()["usage"]["completion_tokens"]
            stats["nfe"] += r.json()["asarm"]["nfe"]


def server_counters(url: str) -> dict:
    """Engine-side totals from /metrics: passes, their summed time, rows over all passes."""
    import httpx

    want = {"asarm_passes_total": "passes", "asarm_pass_seconds_sum": "pass_s", "asarm_batch_size_sum": "rows"}
    out = dict.fromkeys(want.values(), 0.0)
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            out[want[name]] = float(value)
    return out


async def run_phase(url: str, n: int, duration: float, body_of) -> dict:
    import httpx

    stats = {"latency": [], "tokens": 0, "nfe": 0, "errors": 0, "rejected": 0, "error_kinds": []}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(http, url, body_of, start + duration, stats, c) for c in range(n)))
        wall = time.monotonic() - start
    lat = stats.pop("latency")
    done = len(lat)
    return {"clients": n, "wall_s": round(wall, 2), "requests": done, "requests_per_s": round(done / wall, 3),
            "tokens_per_s": round(stats["tokens"] / wall, 2), "p50_latency_s": round(percentile(lat, 50), 3),
            "p99_latency_s": round(percentile(lat, 99), 3), "mean_latency_s": round(sum(lat) / max(done, 1), 3),
            "tokens_per_pass_per_row": round(stats["tokens"] / max(stats["nfe"], 1), 3), **stats}


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "asarm.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-queue", str(args.max_queue), "--log-level", "warning", "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("asarm serve did not start")


def plot(summary: list[dict], runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["clients"] for r in summary]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ns, [r["tokens_per_s"] for r in summary], "o-", label="median")
    a.plot([r["clients"] for r in runs], [r["tokens_per_s"] for r in runs], "x", color="grey", label="each run")
    a.set(xlabel="concurrent clients", ylabel="generated tokens / s", title="throughput", xscale="log", xticks=ns)
    a.set_xticklabels([str(n) for n in ns])
    a.legend()
    b.plot(ns, [r["p50_latency_s"] for r in summary], "o-", label="p50")
    b.plot(ns, [r["p99_latency_s"] for r in summary], "s--", label="p99")
    b.set(xlabel="concurrent clients", ylabel="latency (s)", title="latency (median of runs)", xscale="log",
          xticks=ns)
    b.set_xticklabels([str(n) for n in ns])
    b.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(url: str, n: int, duration: float, body_of) -> dict:
    """One phase: n closed-loop clients for ``duration`` s, plus the engine's view from /metrics."""
    before = server_counters(url)
    r = asyncio.run(run_phase(url, n, duration, body_of))
    after = server_counters(url)
    d = {k: after[k] - before[k] for k in after}
    r["engine_passes"] = int(d["passes"])
    r["mean_rows_per_pass"] = round(d["rows"] / max(d["passes"], 1), 2)
    r["mean_pass_ms"] = round(1000 * d["pass_s"] / max(d["passes"], 1), 2)
    r["engine_busy_share"] = round(d["pass_s"] / r["wall_s"], 3)
    print(f"clients={n:3d} req/s={r['requests_per_s']:.2f} tok/s={r['tokens_per_s']:.1f} "
          f"p50={r['p50_latency_s']:.3f}s p99={r['p99_latency_s']:.3f}s errors={r['errors']} "
          f"rejected={r['rejected']} rows/pass={r['mean_rows_per_pass']} pass={r['mean_pass_ms']}ms "
          f"busy={r['engine_busy_share']}", flush=True)
    return r


def summarize(runs: list[dict], counts: list[int]) -> list[dict]:
    """Per client count: medians over the repeats; the speed-up is the ratio of median tokens/s."""
    import statistics

    out = []
    for n in counts:
        rs = [r for r in runs if r["clients"] == n]
        row = {"clients": n, "repeats": len(rs)}
        for key in ("requests_per_s", "tokens_per_s", "p50_latency_s", "p99_latency_s", "mean_rows_per_pass",
                    "mean_pass_ms"):
            row[key] = round(statistics.median(r[key] for r in rs), 3)
        row["errors"] = sum(r["errors"] for r in rs)
        row["rejected"] = sum(r["rejected"] for r in rs)
        out.append(row)
    base = next((r for r in out if r["clients"] == 1), None)
    for r in out:
        r["speedup_vs_one_at_a_time"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2) if base else None
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m asarm.bench.loadtest", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p) -> None:
    """The load test's options (``python -m asarm.bench.loadtest`` and ``asarm bench serve``)."""
    p.add_argument("--url", default=None, help="an already running server (default: start asarm serve)")
    p.add_argument("--model", default=None, help="model for the started server (default asarm-en-small)")
    p.add_argument("--clients", default="1,8,32", help="comma-separated client counts; 1 = one at a time")
    p.add_argument("--duration", type=float, default=30.0, help="seconds each client count sends requests")
    p.add_argument("--repeats", type=int, default=3, help="run the client counts this many times, interleaved "
                   "(on a shared machine the load drifts; medians are reported)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--method", default="assd", choices=["assd", "sequential"])
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="the started server's activations (default: the server's, fp32 on CPU)")
    p.add_argument("--out", default="results/serve-cpu")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parse_args(argv), "python -m asarm.bench.loadtest " + " ".join(argv))


def run(args, command: str) -> int:
    counts = [int(x) for x in args.clients.split(",")]
    load_before = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 minutes: was the machine quiet?

    def body_of(cid: int, i: int) -> dict:
        return {"prompt": PROMPTS[(cid + i) % len(PROMPTS)], "max_tokens": args.max_tokens,
                "seed": cid * 100_000 + i, "method": args.method, "k": args.k}

    proc, url = (None, args.url) if args.url else start_server(args)
    runs = []
    try:
        for rep in range(args.repeats):
            for n in counts:
                runs.append(dict(measure(url, n, args.duration, body_of), repeat=rep))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    summary = summarize(runs, counts)
    for r in summary:
        print(f"median clients={r['clients']:3d} tok/s={r['tokens_per_s']:.1f} speed-up={r['speedup_vs_one_at_a_time']}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {k: getattr(args, k) for k in ("duration", "repeats", "max_tokens", "method", "k", "max_batch", "threads",
                                   "dtype")}
    setup.update(model=args.model or "asarm-en-small", cpu=platform.processor() or platform.machine(),
                 cpu_count=os.cpu_count(), command=command,
                 load_average_before=load_before,
                 note="loopback; load-test clients and server on the same machine")
    (out / "results.json").write_text(json.dumps({"setup": setup, "summary": summary, "runs": runs}, indent=2) + "\n")
    plot(summary, runs, out / "throughput.png",
         f"asarm serve, {setup['model']}, {args.method} k={args.k}, {args.max_tokens} tokens/request, "
         f"{args.threads} torch thread(s), {args.dtype or 'fp32'}, max batch {args.max_batch}")
    print(f"wrote {out / 'results.json'} and {out / 'throughput.png'}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
