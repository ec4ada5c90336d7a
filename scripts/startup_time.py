"""Start-up time of the `asarm` command: wall-clock and CPU time per process, plus what
`python -X importtime` says the imports cost. Compares source trees side by side, interleaved
(so a busy machine slows them alike):

    git archive <old-commit> src | tar -x -C /tmp/old
    OMP_NUM_THREADS=1 python scripts/startup_time.py --src /tmp/old/src --src src --repeat 7

Cases: the floor that no change here can lower (importing torch), `asarm --help`, `asarm models`, an argument error, import + load of the default shipped
model, and a whole `asarm infill` of a 3-token hole. CPU time (user + sys of the child) moves
less than wall time when other jobs share the cores; both are reported, with the load average.
Writes results/startup-cpu/startup.json and startup.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOAD = "from asarm.cli import main; from asarm.checkpoint import load_model; load_model('asarm-en-small', device='cpu')"
CASES = {
    "floor: python -c 'import torch'": ["-c", "import torch"],
    "asarm --help": ["-m", "asarm.cli", "--help"],
    "asarm models": ["-m", "asarm.cli", "models"],
    "argument error (-k x)": ["-m", "asarm.cli", "infill", "x [MASK:2]", "-k", "x"],
    "import + load asarm-en-small": ["-c", LOAD],
    "asarm infill (3-token hole)": ["-m", "asarm.cli", "infill", "The cat sat on the [MASK:3] and purred.",
                                    "--seed", "0", "--device", "cpu"],
}


def timed(argv: list[str], src: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit code) of one python process."""
    env = dict(os.environ, PYTHONPATH=src)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def import_profile(argv: list[str], src: str, top: int = 6) -> dict:
    """Total import time and the costliest top-level imports, from `python -X importtime`."""
    env = dict(os.environ, PYTHONPATH=src)
    err = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        if not name[1:].startswith(" "):  # indent 0: imported by the program itself
            rows.append((name.strip(), int(cumulative) / 1e6))
    names = {n.strip() for n in (ln.split("|")[-1] for ln in err.splitlines() if "|" in ln)}
    rows.sort(key=lambda r: -r[1])
    return {"total_import_s": round(sum(s for _, s in rows), 3), "top": [[n, round(s, 3)] for n, s in rows[:top]],
            "imports_torch": "torch" in names, "imports_transformers": "transformers" in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", default=None, help="a source tree (repeatable; default src)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="results/startup-cpu")
    args = parser.parse_args()
    srcs = args.src or ["src"]
    load_before = os.getloadavg()
    runs = {(case, src): [] for case in CASES for src in srcs}
    for _ in range(args.repeat):
        for case, argv in CASES.items():
            for src in srcs:  # interleaved: each tree sees the same machine
                runs[case, src].append(timed(argv, src))
    records = []
    for (case, src), rs in runs.items():
        walls, cpus = [r[0] for r in rs], [r[1] for r in rs]
        records.append({"case": case, "src": src, "wall_median_s": round(statistics.median(walls), 3),
                        "wall_min_s": round(min(walls), 3), "cpu_median_s": round(statistics.median(cpus), 3),
                        "exit_codes": sorted({r[2] for r in rs})})
    profiles = {src: {"asarm --help": import_profile(CASES["asarm --help"], src),
                      "import + load": import_profile(["-c", LOAD], src)} for src in srcs}
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "repeat": args.repeat,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps({"meta": meta, "records": records, "import_profiles": profiles}, indent=1))
    lines = [f"{args.repeat} runs per cell, interleaved; {meta['cpus']} CPUs, load average "
             f"{load_before[0]:.1f} before, {meta['loadavg_after'][0]:.1f} after; {meta['date']}", "",
             "| case | source | wall median (s) | wall min (s) | CPU median (s) | exit |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['src']} | {r['wall_median_s']:.3f} | {r['wall_min_s']:.3f} | {r['cpu_median_s']:.3f} "
              f"| {','.join(map(str, r['exit_codes']))} |" for r in records]
    lines += ["", "| source | path | imports (s) | torch | transformers | costliest top-level imports (s) |",
              "|---|---|---|---|---|---|"]
    for src, prof in profiles.items():
        for what, p in prof.items():
            top = ", ".join(f"{n} {s:.2f}" for n, s in p["top"][:4])
            lines.append(f"| {src} | {what} | {p['total_import_s']:.2f} | {p['imports_torch']} | "
                         f"{p['imports_transformers']} | {top} |")
    (out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
