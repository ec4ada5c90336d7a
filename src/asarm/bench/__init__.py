"""``asarm bench``: benchmarks, each measured side by side in one process.

- ``samplers`` — ``--suite cache`` (full recompute vs the exact cache vs batches) and
  ``--suite speedups`` (plain ASSD vs its exact faster variants);
- ``passes`` — ``--suite pass``: ms per cached pass against its rows per build (eager/fast,
  fp32/bf16/int8) and every sampler's tokens/s;
- ``loadtest`` — ``asarm bench serve`` (also ``python -m asarm.bench.loadtest``): concurrent
  clients against ``asarm serve`` over HTTP (the standard library and httpx only).

This module holds the command line only and imports no torch, so the load test stays light.
"""

from __future__ import annotations


def add_cli(sub) -> None:
    p = sub.add_parser("bench", help="time the samplers side by side (JSON + markdown + PNG)")
    p.add_argument("--model", default="random-base", help="'random-base' (XLNet-base-sized random weights) or a model")
    p.add_argument("--lengths", default="128,256,512,1024")
    p.add_argument("--settings", default="95%,50%-spans", help="95%% (paper) and/or 50%%-spans")
    p.add_argument("--batch-sizes", default="8,32", help="batched cached ASSD sizes ('' for none)")
    p.add_argument("--suite", default="cache", choices=["cache", "speedups", "pass"],
                   help="cache: full recompute vs cache vs batches; speedups: plain ASSD vs bonus/one-pass/adaptive k; "
                        "pass: ms per cached pass against its rows and every sampler's tokens/s, per build "
                        "(eager/fast, fp32/bf16/int8; --model takes a comma-separated list there)")
    p.add_argument("--builds", default="all",
                   help="--suite pass: comma-separated builds to compare, from eager/fast x fp32/bf16/int8, "
                        "e.g. 'fast bf16,fast int8' (default all; eager fp32, the reference, is always included)")
    p.add_argument("--thread-counts", dest="threads_axis", default="1,2", help="--suite pass: torch thread counts")
    p.add_argument("--rounds", type=int, default=5, help="--suite pass: rounds of passes per build")
    p.add_argument("--seeds", type=int, default=3, help="--suite pass: seeded runs per sampler (shipped models)")
    p.add_argument("--no-fast-path", action="store_true", help="run the eager pass (default: the fast pass on CPUs)")
    p.add_argument("--only", default=None, help="comma-separated substrings of configuration names to run")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--text-file", default=None, help="take visible tokens from this text (.txt or .gz) "
                   "instead of random tokens; needs a model with a tokenizer")
    p.add_argument("--window", type=int, default=6, help="timed passes per window")
    p.add_argument("--full", action="store_true", help="time whole runs instead of windows")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--quantize", default="none", help="comma-separated axis of weight quantizations: none, int8 "
                   "(int8 runs bf16 activations unless --dtype says otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench")
    p.set_defaults(func=cmd_bench)
    from . import loadtest  # the standard library and httpx only: no server stack

    targets = p.add_subparsers(dest="bench_target", metavar="serve", required=False,
                               help="'asarm bench serve ...': load-test the server instead (asarm bench serve --help)")
    q = targets.add_parser("serve", help="load-test asarm serve on loopback: N concurrent clients vs one at a time",
                           description=loadtest.__doc__.split("\n\n")[0])
    loadtest.add_arguments(q)
    q.set_defaults(func=cmd_bench_serve)


def cmd_bench(args) -> int:
    if args.suite == "pass":
        from . import passes

        return passes.run(args)
    from . import samplers

    return samplers.run(args)


def cmd_bench_serve(args) -> int:
    from . import loadtest

    return loadtest.run(args, args.command_line)
