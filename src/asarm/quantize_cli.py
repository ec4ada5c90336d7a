"""``asarm quantize MODEL OUT --to int8``: write a weight-only int8 copy of a checkpoint.

Registering the command imports no torch (``asarm --help`` stays fast); the work is in
``asarm.quantize`` and ``asarm.checkpoint``. The result loads with ``load_model(OUT)`` and
states its format in config.json (``asarm_quantization``).
"""

from __future__ import annotations

from .config import QUANTIZATIONS


def cmd_quantize(args) -> int:
    from .checkpoint import load_model, save_model
    from .quantize import bytes_per_pass

    # fp32 so that biases and norms are written at full precision; int8 values + fp32 scales
    model = load_model(args.model, revision=getattr(args, "revision", None), device="cpu", dtype="fp32",
                       quantize=args.to)
    save_model(model, args.out)
    print(f"wrote {args.out}: {args.to} weight-only ({model.num_parameters() / 1e6:.1f}M weights, "
          f"{bytes_per_pass(model) / 2**20:.0f} MiB read per pass with fp32 norms/biases)")
    return 0


def add_quantize_cli(subparsers) -> None:
    """Register ``asarm quantize`` on an argparse subparsers object (wired in cli.py)."""
    p = subparsers.add_parser("quantize", help="write a weight-only int8 copy of a model (loads with load_model)")
    p.add_argument("model", help="shipped name, checkpoint directory or hub id")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", default="int8", choices=list(QUANTIZATIONS), help="quantization (default int8)")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_quantize)


add_cli = add_quantize_cli  # the name `asarm`'s command table looks up
