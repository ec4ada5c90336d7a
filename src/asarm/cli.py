"""The ``asarm`` command line: infill, generate, score, train, eval, bench.

User mistakes (bad markup, a missing checkpoint, bad options) print one line and exit with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import ASARMError, InputError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="shipped model name, local HF-format directory or hub id "
                   "(default: asarm-en-small)")
    p.add_argument("--revision", default=None, help="hub revision, e.g. nlp or code for therealgabeguo/ASARM")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="assd", choices=["assd", "sequential"])
    p.add_argument("--draft", default="self", choices=["self", "ngram"], help="ASSD draft (default self)")
    p.add_argument("-k", type=int, default=5, help="ASSD draft block size (default 5)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (exact for ASSD too)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--order", default="left-to-right", help="left-to-right, random, or comma-separated positions")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="full recompute every pass (reference baseline)")
    p.add_argument("--bonus", action="store_true", help="ASSD: a bonus token when every draft of a round is accepted")
    p.add_argument("--one-pass", action="store_true", help="ASSD self-draft: the oracle pass also drafts the "
                   "next block, one pass per round (implies --bonus)")
    p.add_argument("--adaptive-k", action="store_true", help="ASSD: grow k after accepted rounds, shrink it after rejections")


def sampling_options(args) -> dict:
    order = args.order
    if order not in ("left-to-right", "random"):
        try:
            order = [int(x) for x in order.split(",")]
        except ValueError:
            raise InputError(f"--order must be left-to-right, random or comma-separated positions, got {order!r}") from None
    return dict(method=args.method, draft=args.draft, k=args.k, temperature=args.temperature,
                greedy=args.greedy, top_k=args.top_k, top_p=args.top_p, order=order, seed=args.seed,
                cache=not args.no_cache, bonus=args.bonus, one_pass=args.one_pass, adaptive_k=args.adaptive_k)


def load_cli_model(args):
    from .checkpoint import DEFAULT_MODEL, load_model

    return load_model(args.model or DEFAULT_MODEL, revision=args.revision, device=args.device, dtype=args.dtype)


def read_text(args) -> str:
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise InputError(f"cannot read {args.file}: {exc.strerror}") from None
    if args.text is None:
        raise InputError("give the text as an argument, '-' for standard input, or --file PATH")
    if args.text == "-":
        return sys.stdin.read()
    return args.text


def print_stats(result, elapsed: float) -> None:
    nfe, rounds = int(result.nfe), int(result.rounds)
    tokens = sum(result.accepted)
    per_round = tokens / rounds if rounds else 0.0
    print(
        f"tokens={tokens} nfe={nfe} draft_calls={int(result.draft_calls)} rounds={rounds} "
        f"tokens/round={per_round:.2f} passes/token={nfe / max(tokens, 1):.3f} "
        f"time={elapsed:.2f}s tokens/s={tokens / max(elapsed, 1e-9):.1f}",
        file=sys.stderr,
    )


def run_infill(args, text: str) -> int:
    from .text import infill

    model = load_cli_model(args)
    options = sampling_options(args)
    start = time.perf_counter()
    if args.stream:
        from .text import stream_infill

        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        _, result = stream_infill(model, text, write, progress=sys.stderr.isatty(), **options)
        sys.stdout.write("\n")
    else:
        out, result = infill(model, text, return_result=True, **options)
        print(out)
    if args.stats:
        print_stats(result, time.perf_counter() - start)
    return 0


def cmd_infill(args) -> int:
    return run_infill(args, read_text(args))


def cmd_generate(args) -> int:
    if args.length < 1:
        raise InputError(f"--length must be >= 1, got {args.length}")
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    escaped = (prompt or "").replace("[", "\\[")
    return run_infill(args, f"{escaped}[MASK:{args.length}]")


def cmd_models(args) -> int:
    from .checkpoint import shipped_models

    for name in shipped_models():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asarm", description="Any-subset autoregressive models and exact ASSD sampling.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infill", help="fill [MASK:n] holes in a text",
                       description="Fill holes written as [MASK:n] (n = hole length in tokens). "
                                   "A hole at the end continues the text; '\\[' is a literal bracket.")
    p.add_argument("text", nargs="?", help="text with holes, or '-' to read standard input")
    p.add_argument("--file", default=None, help="read the text from this file")
    p.add_argument("--stats", action="store_true", help="print NFE, rounds and tokens per round to stderr")
    p.add_argument("--stream", action="store_true", help="print the text as it fills in")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("generate", help="continue a prompt (or generate from nothing)")
    p.add_argument("prompt", nargs="?", default="", help="prompt text ('' for unconditional, '-' for stdin)")
    p.add_argument("--length", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--stream", action="store_true")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", help="list the shipped models")
    p.set_defaults(func=cmd_models)

    from . import bench, evaluation, scoring, serve, train

    for part in (scoring, train, evaluation, bench, serve):
        part.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ASARMError as exc:
        print(f"asarm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
