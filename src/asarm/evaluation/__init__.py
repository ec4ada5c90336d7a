"""Evaluation harnesses that reproduce the paper's tables (docs/design.md, "Paper results").

    asarm eval wikitext              speed/quality: sequential vs ASSD self vs ASSD n-gram
    asarm eval rocstories            story infilling, ROUGE-1/2/L
    asarm eval humaneval-infilling   code infilling, pass@1 (sandboxed execution)
    asarm eval merge DIR             combine the shards of a run

Every run writes to ``--output`` (default ``eval-results/<task>-<model>``): ``meta.json`` (the
settings), ``records*.jsonl`` (one record per example and decoding configuration; a rerun resumes),
``summary.json``, ``summary.md`` (our numbers beside the paper's) and, with ``--sweep-k``,
``sweep_k.png``. Python API: ``run_task(task, model, configs=..., out_dir=...)`` with a task from
``WikiTextTask``, ``RocStoriesTask`` or ``HumanEvalInfillingTask``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from ..errors import InputError
from .common import ASSD_VARIANTS, DecodeConfig, decode_configs, parse_shard, parse_sweep, speedup_configs
from .runner import run_task

__all__ = ["add_cli", "run_task", "DecodeConfig", "decode_configs", "TASKS", "run_from_args"]

TASKS = ("wikitext", "rocstories", "humaneval-infilling")
HELP = {
    "wikitext": "WikiText-2 test, 95%% hidden: NFE, tokens/round, time, entropy, generative perplexity",
    "rocstories": "ROCStories sentence-3 infilling: ROUGE-1/2/L",
    "humaneval-infilling": "HumanEval infilling (single-line, multi-line, random-span): pass@1, sandboxed",
}


def _task_module(name: str):
    from . import humaneval, rocstories, wikitext

    return {"wikitext": wikitext, "rocstories": rocstories, "humaneval-infilling": humaneval}[name]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "model"


def default_output(args) -> Path:
    model = Path(args.model).name if args.model else "asarm-en-small"
    name = args.eval_task if args.eval_task != "humaneval-infilling" else f"humaneval-{args.variant}"
    if getattr(args, "revision", None):
        model += f"-{args.revision}"
    return Path("eval-results") / f"{name}-{_slug(model)}"


def run_from_args(args, model=None) -> dict:
    """Run the evaluation an ``asarm eval <task>`` command line describes (``model`` given: use
    it instead of loading ``--model``). Returns the summary."""
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.temperature > 0:
        raise InputError(f"--temperature must be > 0, got {args.temperature}")
    method = args.method or ("all" if args.eval_task == "wikitext" else "assd")
    variants = {name: getattr(args, name) for name in ASSD_VARIANTS}
    if args.speedups:
        changed = [name for name, value in variants.items() if value != DecodeConfig.__dataclass_fields__[name].default]
        if args.sweep_k or args.method or changed:
            raise InputError("--speedups chooses its own configurations; drop --method, --sweep-k and "
                             + ", ".join("--" + name.replace("_", "-") for name in ASSD_VARIANTS))
        configs = speedup_configs(args.k)
    else:
        configs = decode_configs(method, args.draft, args.k, parse_sweep(args.sweep_k), **variants)
    shard = parse_shard(args.shard)
    rows = row_runner(args)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if rows is not None and model is not None and args.model is None:
        rows.model_ref = None  # the caller's model object: the actors get a copy of it, not --model's default
    if model is None:
        from ..cli_args import load_cli_model

        local_rank = os.environ.get("LOCAL_RANK")
        if args.shard is None and args.device is None and local_rank is not None and torch.cuda.is_available():
            args.device = f"cuda:{int(local_rank) % torch.cuda.device_count()}"  # torchrun: a GPU per process
        model = load_cli_model(args)
    if args.speedups and getattr(model, "draft_head", None) is None:  # draft="head" needs `asarm train-draft`
        configs = [c for c in configs if c.draft != "head"]
    task = _task_module(args.eval_task).build_task(model, args)
    out = Path(args.output) if args.output else default_output(args)
    if getattr(args, "hole_length", "oracle") != "oracle":  # holes of unknown length: evaluation/hole_length.py
        if rows is not None:
            raise InputError("--max-batch and --ray decode with the true hole lengths; drop them for --hole-length")
        from .hole_length import run
        from .hole_length_report import write_report

        out = Path(args.output) if args.output else Path(f"{default_output(args)}-hole-length")
        run(task, model, out_dir=out, limit=args.limit, seed=args.seed, progress=not args.no_progress,
            model_name=args.model or "asarm-en-small", shard=shard)
        summary = write_report(out)
        print((out / "summary.md").read_text())
        return summary
    summary = run_task(task, model, configs=configs, out_dir=out, batch_size=args.batch_size, seed=args.seed,
                       shard=shard, limit=args.limit, temperature=args.temperature, overwrite=args.overwrite,
                       progress=not args.no_progress, model_name=args.model or "asarm-en-small",
                       revision=args.revision, rows=rows)
    suffix = "" if shard[1] == 1 else f".shard-{shard[0]}-of-{shard[1]}"
    print((out / f"summary{suffix}.md").read_text())
    print(f"results in {out}/", file=sys.stderr)
    return summary


def row_runner(args):
    """The batch path the options ask for (``asarm.batch.runner.RowRunner``), or None: one
    ``sample`` call per batch, the sequential harness."""
    from ..batch import DEFAULT_MAX_BATCH, check_engine_options
    from ..checkpoint import DEFAULT_MODEL

    check_engine_options(args.max_batch, args.admit_wave, args.ray_workers, args.ray, args.address,
                         args.cpus_per_worker, args.gpus_per_worker, workers_flag="--ray-workers")
    if args.max_batch is None and args.admit_wave is None and not args.ray:
        return None
    from ..batch.runner import RowRunner
    from ..threads import resolve_threads

    runner = RowRunner(max_batch=args.max_batch or DEFAULT_MAX_BATCH, admit_wave=args.admit_wave, ray=args.ray)
    if args.ray:
        from ..batch.ray_runner import cli_load_options, require_ray

        require_ray()  # one line before anything loads
        runner.workers, runner.address = args.ray_workers or 1, args.address
        runner.num_cpus, runner.num_gpus = args.cpus_per_worker, args.gpus_per_worker
        runner.threads = resolve_threads(args.threads) or 1
        runner.model_ref, runner.load_options = args.model or DEFAULT_MODEL, cli_load_options(args)
    return runner


def cmd_eval(args) -> int:
    run_from_args(args)
    return 0


def cmd_merge(args) -> int:
    from .report import merge

    for folder in args.folders:
        merge(folder)
        print((Path(folder) / "summary.md").read_text())
    return 0


def _common_arguments(p) -> None:
    from ..cli_args import add_field_argument, add_model_arguments
    from ..sampling.config import METHODS, draft_names, user_fields

    add_model_arguments(p)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--seed", type=int, default=0, help="seed of the protocol and the samplers (default 0)")
    p.add_argument("--method", default=None, choices=["all", *METHODS],
                   help="decoding: all = sequential + ASSD self + ASSD n-gram (default for wikitext), "
                        "sequential, or assd (default otherwise)")
    p.add_argument("--draft", default="self", choices=[*draft_names(), "both"],
                   help="ASSD draft (default self; both: every listed draft)")
    p.add_argument("-k", type=int, default=5, help="ASSD draft block size (default 5, as the paper)")
    p.add_argument("--sweep-k", nargs="?", const="1,2,3,5,8", default=None, metavar="K,K,...",
                   help="run sequential + ASSD at each k (default list 1,2,3,5,8) and plot quality and "
                        "passes per token against k")
    for f in user_fields("cli"):  # the ASSD variants, as `asarm infill` offers them
        if f.name in ASSD_VARIANTS:
            add_field_argument(p, f)
    p.add_argument("--speedups", action="store_true", help="run sequential, plain ASSD and each faster exact "
                   "variant (bonus, one-pass, adaptive k, combined; n-gram with bonus) side by side")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=1, help="examples per batch: a batch's rows share its seed and, "
                   "without --max-batch / --ray, one sample call (default 1: per-example timings)")
    from ..batch import add_engine_arguments, add_ray_arguments

    add_engine_arguments(p, max_batch_default=None, what=" (the batch path, as `asarm batch`: the same records "
                         "as without it)")
    add_ray_arguments(p, workers_flag="--ray-workers")
    p.add_argument("--shard", default=None, metavar="I/N", help="run shard I of N (0-based; default: torchrun's "
                   "RANK/WORLD_SIZE if set); combine the shards with `asarm eval merge DIR`")
    p.add_argument("--output", default=None, help="output folder (default eval-results/<task>-<model>)")
    p.add_argument("--overwrite", action="store_true", help="discard the folder's earlier records instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="reproduce the paper's evaluations (wikitext, rocstories, humaneval-infilling)",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="eval_task", required=True)
    for name in TASKS:
        module = _task_module(name)
        q = sub.add_parser(name, help=HELP[name], description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(q)
        _common_arguments(q)
        if name != "humaneval-infilling":
            q.set_defaults(variant=None)
        if name != "wikitext":
            q.add_argument("--hole-length", default="oracle", choices=["oracle", "posterior", "fixed"],
                           help="oracle: the sampler is given the true hole length (default); posterior / fixed: "
                                "compare oracle, fixed (mean answer length), learned-prior and posterior lengths "
                                "(both factorizations, uniform and learned prior), greedy decoding")
        q.set_defaults(func=cmd_eval)
    q = sub.add_parser("merge", help="combine the shards of a run: records, summary, table, plots")
    q.add_argument("folders", nargs="+", help="output folder(s) of sharded runs")
    q.set_defaults(func=cmd_merge)
