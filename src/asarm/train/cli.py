"""``asarm train`` / ``python -m asarm.train`` / ``torchrun -m asarm.train``: arguments and entry."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ASARMError
from .config import load_config
from .export import export_run
from .trainer import train

DESCRIPTION = "Train or fine-tune an AS-ARM with the paper's joint objective (docs/training.md)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="JSON training config (a path, or a shipped name such as "
                   "asarm-en-small, asarm-py-small, tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (JSON value; model.d_model=256 for model fields); repeatable")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                   "(the newest readable one, with a warning, when the latest is damaged)")
    p.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    p.add_argument("--export", choices=["best", "latest"], default=None,
                   help="do not train: export the run's best (or latest) checkpoint to export_dir")


def run_train_command(args) -> int:
    cfg = load_config(args.config, args.overrides, args.out)
    if getattr(args, "export", None):
        print(json.dumps(export_run(cfg, args.export)))
        return 0
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "model_config"}))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune an AS-ARM (the paper's joint objective)",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run_train_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asarm train", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train_command(args)
    except ASARMError as exc:
        print(f"asarm train: error: {exc}", file=sys.stderr)
        return 2
