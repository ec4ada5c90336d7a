"""Batch infilling on Ray Data: ``map_batches`` with an actor pool, each actor one model and one
engine (the server's app, ``asarm.batch.local.AppRunner``), so outputs are those of the server
and of a local ``asarm batch`` for the same bodies and seeds.

    import ray, asarm.batch.ray_runner as rr
    ds = ray.data.read_text("s3://bucket/requests.jsonl")          # one row per line: "text"
    out = rr.infill_dataset(ds, model="asarm-en-small", workers=8)  # column "output": a JSON line
    rr.write_output(out, "results.jsonl")                           # OpenAI batch output lines

``ray`` is an optional dependency (``pip install "asarm[ray]"``); nothing here imports it at
module level, so ``asarm batch --ray`` without it is one line, not a traceback.
"""

from __future__ import annotations

import json

RAY_MISSING = "--ray needs Ray Data, which is not installed: pip install 'asarm[ray]'"


def require_ray():
    """The ``ray`` module, or an InputError naming the extra to install."""
    from ..errors import InputError

    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


class EngineActor:
    """One Ray actor: one model, one engine loop. Each call runs its rows concurrently through
    the engine (continuous batching up to ``max_batch`` rows) and returns their output lines in
    row order."""

    def __init__(self, model: str, *, load_options: dict | None = None, max_batch: int = 32,
                 served_name: str | None = None, threads: int | None = 1, text: bool = False,
                 defaults: dict | None = None, admit_wave: int | None = None):
        import os

        from ..checkpoint import load_model
        from ..cli_args import apply_threads
        from .local import AppRunner

        apply_threads(threads)
        self.text, self.defaults = text, defaults or {}
        loaded = load_model(model, **(load_options or {}))
        name = served_name or os.path.basename(str(model).rstrip("/"))
        self.runner = AppRunner(loaded, model_name=name, max_batch=max_batch, admit_wave=admit_wave)

    def __call__(self, batch: dict) -> dict:
        from .format import read_line
        from .local import run_lines

        lines = [str(x) for x in batch["text"]]
        linenos = [int(x) for x in batch["lineno"]] if "lineno" in batch else [0] * len(lines)
        requests = [read_line(line, n, text=self.text, defaults=self.defaults) for line, n in zip(lines, linenos)]
        out = run_lines(self.runner, requests)
        return {"custom_id": [o["custom_id"] for o in out],
                "output": [json.dumps(o, ensure_ascii=False, separators=(",", ":")) for o in out]}

    def __del__(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


def infill_dataset(ds, *, model: str = "asarm-en-small", workers: int = 1, max_batch: int = 32,
                   batch_size: int | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                   threads: int | None = 1, served_name: str | None = None, text: bool = False,
                   defaults: dict | None = None, load_options: dict | None = None, admit_wave: int | None = None):
    """Map a ``ray.data.Dataset`` of input lines (column ``text``: one batch request line, or with
    ``text=True`` one marked-up text; optional column ``lineno`` names lines without a custom_id
    ``line-N``) to a Dataset with columns ``custom_id`` and ``output`` (an OpenAI batch output
    line as JSON). ``workers`` actors, each holding one model (``model``: a shipped name, a path
    every node can read, or a hub id; ``load_options``: ``asarm.load_model``'s revision, device,
    dtype, quantize) and one engine of ``max_batch`` rows, ``num_cpus``/``num_gpus`` each;
    ``threads`` torch threads per actor. Each call hands an actor ``batch_size`` lines (default
    4 × ``max_batch``: the engine stays full while the next lines are planned); ``admit_wave`` as
    ``asarm batch --admit-wave``."""
    require_ray()
    return ds.map_batches(
        EngineActor,
        fn_constructor_kwargs={"model": model, "load_options": load_options, "max_batch": max_batch,
                               "served_name": served_name, "threads": threads, "text": text,
                               "defaults": defaults, "admit_wave": admit_wave},
        batch_size=batch_size or 4 * max_batch, batch_format="numpy", concurrency=workers,
        num_cpus=num_cpus, num_gpus=num_gpus or None)


def write_output(ds, path: str, *, overwrite: bool = False) -> int:
    """Write the ``output`` column of ``infill_dataset``'s result to ``path`` (JSONL, on the
    driver, line by line with fsync: ``asarm.batch.format.OutputWriter``); the lines written."""
    from .format import OutputWriter

    count = 0
    with OutputWriter(path, overwrite=overwrite) as writer:
        for row in ds.iter_rows():
            writer.write(json.loads(row["output"]))
            count += 1
    return count


def run_on_ray(args, todo, skipped, writer) -> dict:
    """``asarm batch --ray``: the lines still to do, through ``infill_dataset`` on a local Ray or
    the cluster at ``--address``; each output line is written (durably) as it comes back."""
    import time

    from ..checkpoint import DEFAULT_MODEL
    from ..cli_args import resolve_threads
    from .format import parse_defaults
    from .local import Progress

    ray = require_ray()
    progress = Progress(len(todo), skipped, enabled=not args.no_progress)
    if not todo:
        return progress.close()
    workers = args.workers or 1
    started_here = not ray.is_initialized()
    if started_here:
        options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if args.address is None:
            options["num_cpus"] = max(1, int(round(workers * args.cpus_per_worker)))
        ray.init(address=args.address, **options)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"text": r.line, "lineno": r.lineno} for r in todo])
        load_options = {"revision": args.revision, "device": args.device, "dtype": args.dtype,
                        "quantize": args.quantize, "fast_path": False if args.no_fast_path else None}
        out = infill_dataset(ds, model=args.model or DEFAULT_MODEL, workers=workers, max_batch=args.max_batch,
                             batch_size=args.rows_per_call, num_cpus=args.cpus_per_worker,
                             num_gpus=args.gpus_per_worker, threads=resolve_threads(args.threads) or 1,
                             served_name=args.served_name, text=args.text, defaults=parse_defaults(args.defaults),
                             load_options=load_options, admit_wave=args.admit_wave)
        progress.start = time.perf_counter()
        for row in out.iter_rows():
            line = json.loads(row["output"])
            writer.write(line)
            progress.update(line)
    finally:
        if started_here:
            ray.shutdown()
    return progress.close()
