"""Write docs/cli.md, the command-line reference, from the argparse parsers themselves.

    python scripts/gen_cli_reference.py            # rewrite docs/cli.md
    python scripts/gen_cli_reference.py --check    # exit 1 if docs/cli.md is not current

tests/test_docs.py runs the check, so the reference always matches `asarm ... --help`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"
WIDTH = "100"  # argparse wraps at the terminal's width: fixed, so the file does not depend on it


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def reference() -> str:
    os.environ["COLUMNS"] = WIDTH
    sys.path.insert(0, str(ROOT / "src"))
    from asarm.cli import build_parser

    parser = build_parser()
    parts = ["# The `asarm` command line", "",
             "Generated from the argparse parsers by `python scripts/gen_cli_reference.py` (do not edit by hand; "
             "`tests/test_docs.py` checks it is current). The decoding flags (`--method` … `--no-cache`) are "
             "`DecodeConfig`'s fields (`asarm.sampling.config`). Back to the [README](../README.md).", "",
             "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in subparsers(parser).items():
        nested = subparsers(sub)
        for title, p in [(f"asarm {name}", sub)] + [(f"asarm {name} {n}", q) for n, q in nested.items()]:
            parts += [f"## `{title}`", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args()
    text = reference()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is not current: run python scripts/gen_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
