"""Batch infilling on Ray Data: ``map_batches`` with an actor pool, each actor one model and one
engine (the server's app, ``asarm.batch.local.AppRunner``), so outputs are those of the server
and of a local ``asarm batch`` for the same bodies and seeds.

    import ray, asarm.batch.ray_runner as rr
    ds = ray.data.read_text("s3://bucket/requests.jsonl")          # one row per line: "text"
    out = rr.infill_dataset(ds, model="asarm-en-small", workers=8)  # column "output": a JSON line
    rr.write_output(out, "results.jsonl")                           # OpenAI batch output lines

Token rows (an evaluation's examples, ``asarm.batch.rows``) take the same actor pool with
``RowActor``: ``decode_rows_on_ray``.

Every actor pins its torch threads (``asarm.threads``; default one) before it loads its model and
reports when it was ready, so a run's summary gives the actors' start-up apart from decoding.

``ray`` is an optional dependency (``pip install "asarm[ray]"``); nothing here imports it at
module level, so ``asarm batch --ray`` without it is one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

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


@contextlib.contextmanager
def ray_session(address: str | None, cpus: float):
    """Ray, started here (a local instance with ``cpus`` CPUs, or joining ``address``) unless the
    program already did; stopped at the end only if started here."""
    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address is None:
            options["num_cpus"] = max(1, int(round(cpus)))
        ray.init(address=address, **options)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        if started_here:
            ray.shutdown()


class _ActorBase:
    """What every actor does first: pin torch's threads, load its model, note when it was ready."""

    def __init__(self, model, load_options: dict | None, threads: int | None):
        import torch

        from ..checkpoint import load_model
        from ..threads import apply_threads

        start = time.time()
        apply_threads(threads)  # before the model loads: its fast pass packs for this many threads
        self.model = model if not isinstance(model, (str, os.PathLike)) else load_model(model, **(load_options or {}))
        self.ready, self.startup_s = time.time(), time.time() - start
        self.threads = torch.get_num_threads()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _stamp(self, out: dict, n: int) -> dict:
        """The actor's columns beside its outputs: who ran them, its torch threads, when it was ready."""
        out.update(actor=[self.name] * n, torch_threads=[self.threads] * n, actor_ready=[self.ready] * n,
                   actor_startup_s=[self.startup_s] * n)
        return out


class ActorStats:
    """The driver's view of the actors from their stamps: how many ran rows, their torch threads,
    their start-up (first actor ready minus the run's start) and the rows each ran."""

    def __init__(self, start: float):
        self.start = start
        self.rows: dict[str, int] = {}
        self.threads: set[int] = set()
        self.first_ready: float | None = None
        self.load_s: list[float] = []

    def update(self, row: dict) -> None:
        name = str(row["actor"])
        if name not in self.rows:
            self.load_s.append(float(row["actor_startup_s"]))
        self.rows[name] = self.rows.get(name, 0) + 1
        self.threads.add(int(row["torch_threads"]))
        ready = float(row["actor_ready"])
        self.first_ready = ready if self.first_ready is None else min(self.first_ready, ready)

    def summary(self, end: float) -> dict:
        """``startup_s``: from the run's start to the first actor ready (Ray's start when the run
        starts it, the actor processes, the model loads); ``decode_s``: from then to the last
        output. Times are wall clocks of the driver and the actors' nodes (one machine here; on a
        cluster, as good as the nodes' clock sync)."""
        ready = self.first_ready if self.first_ready is not None else end
        return {"actors": len(self.rows), "rows_per_actor": sorted(self.rows.values()),
                "torch_threads_per_actor": sorted(self.threads),
                "actor_load_s": [round(x, 3) for x in sorted(self.load_s)],
                "startup_s": round(max(0.0, ready - self.start), 3), "decode_s": round(max(0.0, end - ready), 3)}


def rows_per_call(rows: int, workers: int, max_batch: int) -> int:
    """Rows handed to an actor per call: 4 × ``max_batch`` (whole waves while the next lines are
    planned), but never so many that a small run leaves an actor without work."""
    return max(1, min(4 * max_batch, -(-rows // workers)))


def dataset_of(ray, items: list[dict], per_call: int):
    """A Dataset of ``items`` in blocks of ``per_call`` rows: each block is one actor call, so
    the pool's actors take blocks as they free up (one block of everything would keep every row
    on the first actor ready)."""
    import inspect

    blocks = max(1, -(-len(items) // per_call))
    # a repartition step would need CPUs of its own, which the actors hold: ask from_items instead
    # (override_num_blocks since Ray 2.10, parallelism before)
    key = "override_num_blocks" if "override_num_blocks" in inspect.signature(ray.data.from_items).parameters \
        else "parallelism"
    return ray.data.from_items(items, **{key: blocks})


def map_with_actors(ds, actor_class, kwargs: dict, *, workers: int, batch_size: int, num_cpus: float,
                    num_gpus: float):
    """``ds.map_batches`` over a pool of ``workers`` actors of ``actor_class(**kwargs)``. Each
    actor holds one call at a time, so blocks go to whichever actor frees up first (Ray's default
    queues several per actor, and the first actor ready could take them all)."""
    import ray.data

    pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
    return ds.map_batches(actor_class, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                          compute=pool, num_cpus=num_cpus, num_gpus=num_gpus or None)


class EngineActor(_ActorBase):
    """One Ray actor: one model, one engine loop. Each call runs its rows concurrently through
    the engine (continuous batching up to ``max_batch`` rows) and returns their output lines in
    row order."""

    def __init__(self, model: str, *, load_options: dict | None = None, max_batch: int = 32,
                 served_name: str | None = None, threads: int | None = 1, text: bool = False,
                 defaults: dict | None = None, admit_wave: int | None = None):
        from .local import AppRunner

        super().__init__(model, load_options, threads)
        self.text, self.defaults = text, defaults or {}
        name = served_name or os.path.basename(str(model).rstrip("/"))
        self.runner = AppRunner(self.model, model_name=name, max_batch=max_batch, admit_wave=admit_wave)

    def __call__(self, batch: dict) -> dict:
        from .format import read_line
        from .local import run_lines

        lines = [str(x) for x in batch["text"]]
        linenos = [int(x) for x in batch["lineno"]] if "lineno" in batch else [0] * len(lines)
        requests = [read_line(line, n, text=self.text, defaults=self.defaults) for line, n in zip(lines, linenos)]
        out = run_lines(self.runner, requests)
        return self._stamp({"custom_id": [o["custom_id"] for o in out],
                            "output": [json.dumps(o, ensure_ascii=False, separators=(",", ":")) for o in out]},
                           len(out))

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
    return map_with_actors(ds, EngineActor, {"model": model, "load_options": load_options, "max_batch": max_batch,
                                             "served_name": served_name, "threads": threads, "text": text,
                                             "defaults": defaults, "admit_wave": admit_wave},
                           workers=workers, batch_size=batch_size or 4 * max_batch, num_cpus=num_cpus,
                           num_gpus=num_gpus)


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
    the cluster at ``--address``; each output line is written (durably) as it comes back. The
    summary's rates count from the run's start (Ray's start, the actors and their model loads
    included); ``actors`` gives the start-up and the decoding time apart."""
    from ..checkpoint import DEFAULT_MODEL
    from ..threads import resolve_threads
    from .format import parse_defaults
    from .local import Progress

    progress = Progress(len(todo), skipped, enabled=not args.no_progress)
    if not todo:
        return progress.close()
    workers = args.workers or 1
    actors = ActorStats(time.time())  # start-up counts from here: Ray's own start included
    with ray_session(args.address, workers * args.cpus_per_worker) as ray:
        per_call = args.rows_per_call or rows_per_call(len(todo), workers, args.max_batch)
        ds = dataset_of(ray, [{"text": r.line, "lineno": r.lineno} for r in todo], per_call)
        out = infill_dataset(ds, model=args.model or DEFAULT_MODEL, workers=workers, max_batch=args.max_batch,
                             batch_size=per_call, num_cpus=args.cpus_per_worker,
                             num_gpus=args.gpus_per_worker, threads=resolve_threads(args.threads) or 1,
                             served_name=args.served_name, text=args.text, defaults=parse_defaults(args.defaults),
                             load_options=cli_load_options(args), admit_wave=args.admit_wave)
        for row in out.iter_rows():
            line = json.loads(row["output"])
            writer.write(line)
            progress.update(line)
            actors.update(row)
        summary = progress.close()  # before Ray's shutdown, which is no part of the run
        summary["actors"] = actors.summary(time.time())
    return summary


def cli_load_options(args) -> dict:
    """``asarm.load_model``'s options from a command line's model arguments (each actor loads its own)."""
    return {"revision": args.revision, "device": args.device, "dtype": args.dtype, "quantize": args.quantize,
            "fast_path": False if args.no_fast_path else None}


# --- token rows (asarm.batch.rows) ----------------------------------------------------------------
class RowActor(_ActorBase):
    """One Ray actor: one model, one engine; each call decodes its ``RowTask``s (column ``task``,
    JSON) with ``asarm.batch.rows.decode_rows`` and returns their ``RowResult``s (column ``result``)."""

    def __init__(self, model, *, load_options: dict | None = None, max_batch: int = 32,
                 threads: int | None = 1, admit_wave: int | None = None):
        super().__init__(model, load_options, threads)
        self.max_batch, self.admit_wave = max_batch, admit_wave

    def __call__(self, batch: dict) -> dict:
        from .rows import RowTask, decode_rows

        tasks = [RowTask.from_json(json.loads(str(x))) for x in batch["task"]]
        results = decode_rows(self.model, tasks, max_batch=self.max_batch, admit_wave=self.admit_wave)
        return self._stamp({"result": [json.dumps(r.to_json()) for r in results]}, len(results))


def decode_rows_on_ray(tasks, *, model, load_options: dict | None = None, workers: int = 1, max_batch: int = 32,
                       admit_wave: int | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                       threads: int | None = 1, per_call: int | None = None, address: str | None = None,
                       stats: dict | None = None):
    """Yield a ``RowResult`` for every ``RowTask`` (in the order they come back) from ``workers``
    Ray actors, each holding ``model`` (a shipped name or a path every node reads, loaded with
    ``load_options``) and one engine of ``max_batch`` rows. Rows go out most hidden tokens first,
    ``per_call`` per actor call (default ``rows_per_call``). ``stats``, if given, gets the
    actors' summary (``ActorStats``) at the end."""
    from .rows import RowResult, by_hidden_count

    tasks = by_hidden_count(tasks)
    if not tasks:
        return
    actors = ActorStats(time.time())
    with ray_session(address, workers * num_cpus) as ray:
        per_call = per_call or rows_per_call(len(tasks), workers, max_batch)
        ds = dataset_of(ray, [{"task": json.dumps(t.to_json())} for t in tasks], per_call)
        out = map_with_actors(ds, RowActor, {"model": model, "load_options": load_options, "max_batch": max_batch,
                                             "threads": threads, "admit_wave": admit_wave},
                              workers=workers, batch_size=per_call, num_cpus=num_cpus,
                              num_gpus=num_gpus)
        for row in out.iter_rows():
            actors.update(row)
            yield RowResult.from_json(json.loads(row["result"]))
        if stats is not None:
            stats.update(actors.summary(time.time()))
