"""Command-line pieces shared by every ``asarm`` subcommand that loads a model.

Nothing here imports torch at module level: ``asarm --help`` and argument errors must answer
without paying for it. ``apply_threads`` imports torch only when a command is about to run a model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import QUANTIZATIONS
from .errors import InputError
from .threads import DEFAULT_THREADS, MAX_THREADS, THREADS_ENV, apply_threads, resolve_threads  # noqa: F401

# Where the shipped models live (checkpoint.SHIPPED_DIR, without importing torch to find it).
SHIPPED_DIR = Path(__file__).parent / "shipped"


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"CPU threads for torch (default: ${THREADS_ENV} if set, else {DEFAULT_THREADS}: "
                        "fastest for the small shipped models, idle or on a busy machine)")


# The dtype of commands that generate (infill, generate, serve) when --dtype is not given: the
# fastest build measured for the device class (asarm.devices.fastest_dtype: bf16 on a CPU with
# native bf16, fp32 elsewhere; results/bench-cpu-pass). Scoring and evaluation keep fp32.
GENERATION_DTYPE = "auto"


def add_model_arguments(p: argparse.ArgumentParser, generation: bool = False) -> None:
    """--model, --revision, --device, --dtype, --quantize, --no-fast-path, --threads. Commands
    that generate (``generation``) default to the fastest dtype of the device (GENERATION_DTYPE)."""
    p.add_argument("--model", default=None, help="shipped model name (see `asarm models`), local HF-format "
                   "directory or hub id (default: asarm-en-small, 128-token limit)")
    p.add_argument("--revision", default=None, help="hub revision, e.g. nlp or code for therealgabeguo/ASARM "
                   "(hub ids only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=GENERATION_DTYPE if generation else None, choices=["fp32", "bf16", "fp16", "auto"],
                   help="activation dtype; auto: bf16 on a CPU with native bf16 (AVX-512 BF16/AMX), measured "
                        "fastest there, else fp32 (default: " + ("auto" if generation else "fp32") + ")")
    p.add_argument("--quantize", default=None, choices=list(QUANTIZATIONS),
                   help="weight-only quantization at load time (int8: per-output-channel scales)")
    p.add_argument("--no-fast-path", action="store_true", help="run the eager network pass instead of the fast "
                   "pass (prepacked weights; the default on CPUs, same logits to float rounding)")
    add_threads_argument(p)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per ``DecodeConfig`` field (``asarm.sampling.config``: help, choices and the
    flag's spelling come from there), then the order and the seed."""
    from .sampling.config import user_fields

    for f in user_fields("cli"):
        add_field_argument(p, f)
    p.add_argument("--order", default="left-to-right", help="left-to-right, random, or comma-separated positions")
    p.add_argument("--seed", type=int, default=None, help="integer seed: same seed, same output "
                   "(default: a fresh random seed)")


def add_field_argument(p: argparse.ArgumentParser, f) -> None:
    from .sampling.config import field_type

    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    help_text = f.metadata.get("help")
    if field_type(f) is bool:
        action = "store_false" if f.default else "store_true"
        p.add_argument(flag, dest=f.name, action=action, help=help_text)
        return
    choices = f.metadata.get("choices")
    p.add_argument(flag, dest=f.name, type=field_type(f), default=f.default, help=help_text,
                   choices=list(choices()) if choices else None)


def sampling_options(args) -> dict:
    """The ``sample`` arguments of a command line: one ``DecodeConfig`` plus order and seed."""
    from .sampling.config import DecodeConfig, user_fields

    order = args.order
    if order not in ("left-to-right", "random"):
        try:
            order = [int(x) for x in order.split(",")]
        except ValueError:
            raise InputError(f"--order must be left-to-right, random or comma-separated positions, got {order!r}") from None
    flags = {f.name: f.metadata.get("flag", "--" + f.name.replace("_", "-")) for f in user_fields("cli")}
    config = DecodeConfig.from_user(flag=lambda name: flags.get(name, name),
                                    **{name: getattr(args, name) for name in flags})
    return dict(config=config, order=order, seed=args.seed)


def check_sampling_bounds(args) -> None:
    """The decoding options' bounds (``ge``/``gt``/``le`` in ``DecodeConfig``'s field metadata,
    the limits the server enforces too), checked on the parsed flags before torch loads: ``-k
    1000000000`` would otherwise size a cache of terabytes."""
    from .sampling.config import user_fields

    for f in user_fields("cli"):
        value = getattr(args, f.name, None)
        if value is None or isinstance(value, bool):
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        meta = f.metadata
        if "ge" in meta and not value >= meta["ge"] or "gt" in meta and not value > meta["gt"] \
                or "le" in meta and not value <= meta["le"] or value != value:
            low = f">= {_number(meta['ge'])}" if "ge" in meta else f"> {_number(meta['gt'])}" if "gt" in meta else None
            high = f"<= {_number(meta['le'])}" if "le" in meta else None
            raise InputError(f"{flag} must be {' and '.join(b for b in (low, high) if b)}, got {value}")


def _number(bound) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)




def check_device_name(device: str) -> None:
    """A device asarm can run on, by name (torch checks it is present when the model loads):
    ``meta`` has no data and others (xpu, hpu, ...) are not supported."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?|mps", device.strip()):
        raise InputError(f"--device {device!r}: use cpu, cuda, cuda:N or mps")


def load_cli_model(args):
    from .checkpoint import DEFAULT_MODEL, load_model

    name = args.model or DEFAULT_MODEL
    if args.revision is not None:
        check_revision(name, args.revision)
    return load_model(name, revision=args.revision, device=args.device, dtype=args.dtype,
                      quantize=getattr(args, "quantize", None),
                      fast_path=False if getattr(args, "no_fast_path", False) else None)


def check_revision(name: str, revision: str) -> None:
    """A revision picks a version of a hub repository; for anything else it would be silently
    ignored, so say so instead."""
    if os.path.exists(os.path.expanduser(name)):
        what = "a local path"
    elif (SHIPPED_DIR / name / "config.json").is_file():
        what = "a model shipped with asarm"
    else:
        return  # a hub id (the revision is used) or a missing model (load_model says so)
    raise InputError(f"--revision {revision!r} applies to hub ids (owner/name) only; {name!r} is {what}: "
                     "drop --revision")


# The most input a command reads (--file, standard input). No model takes more than a few
# thousand tokens, so a text of a megabyte is already hundreds of times too long; reading at
# most this much keeps `--file /dev/zero` or a 10 GB file from filling memory before the length
# error. `length-prior` reads corpora and allows more (CORPUS_BYTES).
MAX_INPUT_BYTES = 1_000_000
CORPUS_BYTES = 64_000_000


def read_text(args, max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The command's input text: --file PATH, '-' for standard input, or the argument itself.
    Input that is not UTF-8 text, or longer than ``max_bytes``, is an InputError, not a traceback."""
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise InputError(f"cannot read {args.file}: {exc.strerror}") from None
        return _decode_text(_capped(data, args.file, max_bytes), args.file)
    if args.text is None:
        raise InputError("give the text as an argument, '-' for standard input, or --file PATH")
    if args.text == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        if stdin is None:  # a text stream (tests, embedding): nothing to decode
            return _check_text(_capped(sys.stdin.read(max_bytes + 1), "standard input", max_bytes), "standard input")
        return _decode_text(_capped(stdin.read(max_bytes + 1), "standard input", max_bytes), "standard input")
    return _capped(args.text, "the text", max_bytes)


def _capped(data, where: str, max_bytes: int):
    if len(data) > max_bytes:
        raise InputError(f"{where} is longer than {max_bytes:,} bytes, far more than any model's length limit")
    return data


def _decode_text(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                         "convert it, e.g. iconv -t UTF-8") from None
    return _check_text(text, where)


def _check_text(text: str, where: str) -> str:
    if "\x00" in text:
        raise InputError(f"{where} contains NUL bytes: it looks like a binary file, not text")
    return text


def json_option(value: str, option: str, expected: str, *, source: str = "inline", types: tuple = (dict,)):
    """The JSON value of a command-line option, one error per way it can be wrong, each naming
    the option and what to give (``expected``, e.g. 'a JSON object {hole index: spec}').

    source: "inline" (the option's value is the JSON), "file" (it names a file holding the JSON)
    or "inline-or-file" (a value that does not start with '{' or '[' and names a file is read).
    types: the JSON types accepted (dict, list)."""
    import json

    where, text = option, value
    is_file = source == "file" or (source == "inline-or-file" and not value.lstrip().startswith(("{", "["))
                                   and Path(value).is_file())
    if is_file:
        where = f"{option} {value}"
        try:
            with open(value, "rb") as f:
                text = _decode_text(_capped(f.read(MAX_INPUT_BYTES + 1), value, MAX_INPUT_BYTES), value)
        except OSError as exc:
            raise InputError(f"{option}: cannot read {value}: {exc.strerror or exc}") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); "
                         f"give {expected}") from None
    except RecursionError:  # JSON nested thousands deep
        raise InputError(f"{where}: the JSON is nested too deeply; give {expected}") from None
    if not isinstance(parsed, types):
        raise InputError(f"{where} must be {expected}, got a JSON {type(parsed).__name__}")
    return parsed
