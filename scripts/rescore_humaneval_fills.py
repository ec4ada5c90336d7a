"""Run the programs of a HumanEval ``--hole-length`` folder's fills again, on this machine.

The fills (each record's ``fills[length]["output"]``, the decoded middle) are what the model
wrote; whether they pass depends only on the program prompt + middle + suffix + tests. This
re-executes every distinct program in the sandbox, rewrites the record files (atomically) with
the new ``passed``/``status`` and ``"programs_run_on": "<host>"``, and writes the report again.

Used once: the first GPU run of issue 13 hit a sandbox bug there (every program "failed").

    python scripts/rescore_humaneval_fills.py results/hole-length/humaneval-single-line-asarm-py-small-v3 --workers 2
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from asarm.evaluation.common import RECORD_GLOB, read_records
from asarm.evaluation.execution import humaneval_program, run_programs
from asarm.evaluation.hole_length_report import write_report
from asarm.evaluation.humaneval import read_problems, variant_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per program (default: the run's)")
    args = ap.parse_args()
    folder = Path(args.folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta["task"] != "humaneval-infilling":
        raise SystemExit(f"{folder}: not a HumanEval run ({meta['task']})")
    settings = meta["settings"]
    data = Path(settings["data"])  # where the run read it; else this machine's copy
    problems = {p["task_id"]: p for p in read_problems(data if data.is_file() else variant_path(settings["variant"], None))}
    timeout = args.timeout or settings["timeout_s"]
    files = sorted(folder.glob(RECORD_GLOB))
    per_file = {f: read_records([f]) for f in files}
    programs = sorted({humaneval_program(problems[r["id"]], fill["output"])
                       for recs in per_file.values() for r in recs for fill in r["fills"].values()})
    print(f"{len(programs)} distinct programs from {sum(map(len, per_file.values()))} records", file=sys.stderr)
    results = dict(zip(programs, run_programs(programs, workers=args.workers, timeout=timeout,
                                              memory_mb=settings["memory_mb"])))
    errors = [r for r in results.values() if r.status == "error"]
    if errors:
        raise SystemExit(f"the sandbox failed on {len(errors)} programs here too: {errors[0].detail}")
    host = socket.gethostname()
    for f, recs in per_file.items():
        for r in recs:
            for fill in r["fills"].values():
                res = results[humaneval_program(problems[r["id"]], fill["output"])]
                fill["passed"], fill["status"] = res.passed, res.status
            r["programs_run_on"] = host
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        tmp.replace(f)
    print(write_report(folder)["modes"]["oracle"]["pass@1"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
