"""``asarm batch``: OpenAI batch files (or lines of marked-up text) through the server's request
path, on this machine's engine or on a Ray cluster.

    asarm batch requests.jsonl -o results.jsonl --max-batch 32
    asarm batch stories.txt --text -o filled.jsonl --defaults '{"seed": 0, "k": 5}'
    asarm batch requests.jsonl -o results.jsonl --ray --workers 8 --address auto

    format.py      request and output lines (OpenAI's batch shapes), the durable writer, resume
    local.py       the server's app called in-process: one request path for server, batch, Ray
    ray_runner.py  ``infill_dataset``: map_batches over a ray.data.Dataset, an actor per engine;
                   ``decode_rows_on_ray``: token rows on the same actors
    rows.py        token rows (an evaluation's examples) on one engine, as ``sample`` decodes them
    runner.py      ``RowRunner``: token rows here or on Ray (what ``asarm eval --max-batch/--ray`` uses)

Manual: docs/batch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_batch(args) -> int:
    from ..errors import InputError
    from .format import OutputWriter, parse_defaults, read_requests

    check_batch_options(args)
    defaults = parse_defaults(args.defaults)
    if args.ray:
        from .ray_runner import require_ray

        require_ray()  # before anything is read or loaded: one line if ray is missing
    requests = read_requests(args.input, text=args.text, defaults=defaults)
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise InputError("the output must not be the input file")
    with OutputWriter(args.output, resume=args.resume, overwrite=args.overwrite) as writer:
        from .local import by_generation

        todo = by_generation([r for r in requests if r.custom_id not in writer.done])
        skipped = len(requests) - len(todo)
        if args.ray:
            from .ray_runner import run_on_ray

            summary = run_on_ray(args, todo, skipped, writer)
        else:
            summary = run_locally(args, todo, skipped, writer)
    print(summary_line(summary, args.output), file=sys.stderr)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def run_locally(args, todo, skipped, writer) -> dict:
    import asyncio

    from ..checkpoint import DEFAULT_MODEL
    from ..cli_args import apply_threads, load_cli_model
    from ..errors import InputError
    from .local import AppRunner, Progress, run_requests

    apply_threads(args.threads)
    if not todo:
        return Progress(0, skipped, enabled=False).close()
    model = load_cli_model(args)
    name = args.served_name or os.path.basename(str(args.model or DEFAULT_MODEL).rstrip("/"))
    runner = AppRunner(model, model_name=name, max_batch=args.max_batch, admit_wave=args.admit_wave)
    progress = Progress(len(todo), skipped, enabled=not args.no_progress)  # after loading: rates count decoding

    def on_line(line):
        writer.write(line)
        progress.update(line)

    try:
        asyncio.run(run_requests(runner, todo, on_line))
    except OSError as exc:  # the output cannot take more (a full disk): what is written stays
        raise InputError(f"writing {args.output} failed: {exc.strerror or exc}; the lines written are kept, "
                         "rerun with --resume to continue") from None
    finally:
        runner.close()
    return progress.close()


def summary_line(s: dict, output: str) -> str:
    skipped = f", {s['skipped']} already done" if s["skipped"] else ""
    return (f"{s['requests']} requests in {s['seconds']:.1f} s ({s['ok']} ok, {s['failed']} failed{skipped}): "
            f"{s['requests_per_s']:.2f} requests/s, {s['tokens_per_s']:.1f} tokens/s -> {output}")


def check_batch_options(args) -> None:
    from ..errors import InputError

    check_engine_options(args.max_batch, args.admit_wave, args.workers, args.ray, args.address,
                         args.cpus_per_worker, args.gpus_per_worker)
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other")


DEFAULT_MAX_BATCH = 32  # measured on ROCStories: 64 rows per pass no faster (results/batch-cpu/)


def add_engine_arguments(p, *, max_batch_default: int | None = DEFAULT_MAX_BATCH, what: str = "") -> None:
    """--max-batch and --admit-wave: the engine's batch (``asarm batch``; ``asarm eval``)."""
    default = f"default {max_batch_default}" if max_batch_default else "default: one sample call per --batch-size"
    p.add_argument("--max-batch", type=int, default=max_batch_default, help=f"most rows decoded together per "
                   f"engine, rows joining as others finish{what} ({default})")
    p.add_argument("--admit-wave", type=int, default=None, metavar="N", help="waiting rows join the running "
                   "batch once N rows are free (default: --max-batch: whole waves, the best throughput measured; "
                   "1: at once, as the server)")


def add_ray_arguments(p, *, workers_flag: str = "--workers") -> None:
    """The Ray options (``asarm batch --ray``; ``asarm eval --ray``, where --workers is taken)."""
    ray = p.add_argument_group("Ray (pip install 'asarm[ray]')")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data: an actor pool, one model and engine each")
    ray.add_argument(workers_flag, dest="workers" if workers_flag == "--workers" else "ray_workers", type=int,
                     default=None, help="actors (default 1 with --ray)")
    ray.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray, or the one "
                     "`ray job submit` runs in)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="num_cpus per actor (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="num_gpus per actor (default 0)")


def check_engine_options(max_batch: int | None, admit_wave: int | None, workers: int | None, ray: bool,
                         address: str | None, cpus: float, gpus: float, workers_flag: str = "--workers") -> None:
    """One line for each option that cannot work (``InputError``)."""
    from ..errors import InputError

    if max_batch is not None and max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {max_batch}")
    if admit_wave is not None and not 1 <= admit_wave <= (max_batch or DEFAULT_MAX_BATCH):
        raise InputError(f"--admit-wave must be from 1 to --max-batch ({max_batch or DEFAULT_MAX_BATCH}), "
                         f"got {admit_wave}")
    if workers is not None and workers < 1:
        raise InputError(f"{workers_flag} must be >= 1, got {workers}")
    if (workers is not None or address is not None) and not ray:
        raise InputError(f"{workers_flag} and --address go with --ray")
    if cpus <= 0 or gpus < 0:
        raise InputError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")


def add_cli(sub) -> None:
    from ..cli_args import add_model_arguments

    p = sub.add_parser("batch", help="run an OpenAI batch file (or text lines with holes) locally or on Ray",
                       description="Run every request of an OpenAI batch file (JSONL lines {custom_id, method, url, "
                                   "body}; url /v1/completions, /v1/infill or /v1/score) through the server's "
                                   "request path with continuous batching, and append OpenAI batch output lines "
                                   "to OUTPUT as they finish. Resumable: --resume skips the custom_ids OUTPUT "
                                   "already holds. Manual: docs/batch.md.")
    p.add_argument("input", help="the batch file (JSONL), or with --text one marked-up text per line")
    p.add_argument("-o", "--output", required=True, help="the output JSONL (OpenAI batch output lines)")
    p.add_argument("--text", action="store_true", help="INPUT holds one text with [MASK] holes per line: each "
                   "line is a /v1/infill request named line-N")
    p.add_argument("--defaults", default=None, metavar="JSON", help="body fields for every request that does "
                   "not set them, e.g. '{\"seed\": 0, \"method\": \"assd\", \"k\": 5}'")
    add_engine_arguments(p)
    p.add_argument("--resume", action="store_true", help="OUTPUT exists: keep its lines, run only the rest")
    p.add_argument("--overwrite", action="store_true", help="OUTPUT exists: replace it")
    p.add_argument("--served-name", default=None, help="the model name bodies may give in 'model' "
                   "(default: the model's name, as asarm serve)")
    p.add_argument("--summary", default=None, metavar="FILE", help="also write the run's summary as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(p)
    p.add_argument("--rows-per-call", type=int, default=None, help=argparse.SUPPRESS)
    add_model_arguments(p)
    p.set_defaults(func=cmd_batch)
