"""The ``asarm`` command line: infill, generate, length-prior, score, train, eval, bench, models.

User mistakes (bad markup, a missing checkpoint, bad options, input that is not text) print one
line and exit with code 2; anything else is a bug and keeps its traceback.

Start-up is kept short: this module and ``cli_args`` import no torch, and the subcommands that
live in heavier modules (train, eval, bench, quantize, serve) are imported only when they are used, so
``asarm --help``, ``asarm models`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from .cli_args import (CORPUS_BYTES, SHIPPED_DIR, THREADS_ENV, add_model_arguments, add_sampling_arguments,
                       add_threads_argument, apply_threads, check_device_name, check_sampling_bounds, json_option,
                       load_cli_model, read_text, resolve_threads, sampling_options)
from .config import QUANTIZATIONS
from .errors import ASARMError, InputError, LiteralMaskWarning

# Subcommands defined in modules that import torch. `asarm --help` lists them from this table;
# their real parsers are built only when the command is named (tests check the help texts match).
LAZY_COMMANDS = {
    "train": ("train", "train or fine-tune an AS-ARM (the paper's joint objective)"),
    "train-draft": ("train.draft", "train a draft head (draft=head) for a frozen model on its own data"),
    "eval": ("evaluation", "reproduce the paper's evaluations (wikitext, rocstories, humaneval-infilling)"),
    "bench": ("bench", "time the samplers side by side (JSON + markdown + PNG)"),
    "serve": ("serve", "OpenAI-compatible HTTP server with continuous batching and a playground"),
    "batch": ("batch", "run an OpenAI batch file (or text lines with holes) locally or on Ray"),
}


def limit_note() -> str:
    """The shipped models' length limits, from their config.json files, for --help."""
    limits = []
    for config in sorted(SHIPPED_DIR.glob("*/config.json")):
        limit = json.loads(config.read_text()).get("asarm_max_length")
        if limit:
            limits.append(f"{limit} ({config.parent.name})")
    if not limits:
        return "A model's length limit is config.json's asarm_max_length."
    return (f"The shipped models take at most {' or '.join(limits)} tokens in all, text and holes together; "
            "`asarm models` lists them.")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) instead of usage + error, like every other
    user mistake; subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    from . import __version__

    return __version__


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


def print_lengths(result) -> None:
    for i, c in enumerate(getattr(result, "lengths", None) or []):
        if c.method != "given":
            kind = "joint posterior probability of all the lengths" if c.method == "exact-joint" else "posterior probability"
            print(f"hole {i + 1}: length {c.length} ({kind} {c.probability:.3f}, "
                  f"candidates {c.candidates[0]}-{c.candidates[-1]}, {c.method})", file=sys.stderr)


def length_options(args) -> dict:
    """Options for holes of unknown length (asarm.text.infill)."""
    prior = None
    if getattr(args, "length_prior", None):
        raw = json_option(args.length_prior, "--length-prior", 'a JSON list of weights (lengths 1, 2, ...) or an '
                          'object {length: weight}, e.g. {"3": 0.5}', source="file", types=(dict, list))
        if isinstance(raw, dict):
            try:
                prior = {int(k): float(v) for k, v in raw.items()}
            except (TypeError, ValueError):
                raise InputError(f"{args.length_prior}: a length prior maps lengths to weights, e.g. {{\"3\": 0.5}}") from None
        else:
            prior = raw
    stop = getattr(args, "stop_at", None)
    if stop is not None:
        stop = {"newline": "\n", "eos": "</s>"}.get(stop, stop.replace("\\n", "\n").replace("\\t", "\t"))
    options = dict(max_hole=getattr(args, "max_hole", None), length_prior=prior,
                   factorization=getattr(args, "factorization", None), stop_at=stop,
                   allow_special=getattr(args, "allow_special", False))
    constraints = constraint_options(getattr(args, "constraint", None), getattr(args, "constraints", None))
    if constraints:
        options["constraints"] = constraints
    return options


def constraint_options(items, raw) -> dict:
    """{hole: spec} from ``--constraint HOLE:KIND:VALUE`` (repeatable) and ``--constraints JSON|FILE``."""
    out: dict = {}
    if raw is not None:
        out.update(json_option(raw, "--constraints", 'a JSON object {hole index: spec}, e.g. {"0": {"regex": "[0-9]+"}}, '
                               "or a file holding one", source="inline-or-file"))
    for item in items or ():
        hole_index, sep, rest = item.partition(":")
        kind, sep2, value = rest.partition(":")
        if not sep or not sep2 or not hole_index.strip().isdigit():
            raise InputError(f"--constraint {item!r}: write HOLE:KIND:VALUE, e.g. 0:regex:'[0-9]+' or 1:choice:'red|blue'")
        if kind == "choice":
            spec = {"choice": value.split("|")}
        elif kind in ("regex", "json_schema"):
            spec = {kind: value}
        else:
            raise InputError(f"--constraint {item!r}: KIND is regex, choice or json_schema, got {kind!r}")
        if str(int(hole_index)) in {str(k) for k in out}:
            raise InputError(f"--constraint: hole {int(hole_index)} is constrained twice")
        out[str(int(hole_index))] = spec
    return out


def run_infill(args, text: str) -> int:
    from .text import infill

    options = {**sampling_options(args), **length_options(args)}  # option errors before the model loads
    model = load_cli_model(args)
    start = time.perf_counter()
    if args.stream:
        from .text import stream_infill

        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        _, result = stream_infill(model, text, write, progress=sys.stderr.isatty(),
                                  **{k: v for k, v in options.items() if k != "stop_at"})
        sys.stdout.write("\n")
    else:
        out, result = infill(model, text, return_result=True, **options)
        print(out)
    if args.stats:
        print_stats(result, time.perf_counter() - start)
        print_lengths(result)
    return 0


def input_text(args) -> str:
    """The input text, read by ``check_option_values`` before torch loaded (or now)."""
    text = getattr(args, "input_text", None)
    return read_text(args) if text is None else text


def cmd_infill(args) -> int:
    return run_infill(args, input_text(args))


def cmd_length_prior(args) -> int:
    """Measure a length prior for [MASK] holes on text like the user's (the prior carries nearly all
    the length information with our small models: results/hole-length)."""
    from .lengths import length_counts, prior_from_counts, text_units

    texts = getattr(args, "input_texts", None) or read_corpora(args.files)
    tokenizer = getattr(load_cli_model(args), "tokenizer", None)
    if tokenizer is None:
        raise InputError(f"{args.model}: this model has no tokenizer files")
    pieces = [u for t in texts for u in text_units(t, args.unit)]
    counts, longer = length_counts(tokenizer, pieces, args.max_hole)  # counted once: the prior and the summary
    prior = prior_from_counts(counts, args.smoothing, what=f"{args.unit} of 1 to {args.max_hole} tokens")
    out = json.dumps([round(w, 8) for w in prior]) + "\n"
    if args.out:
        Path(args.out).write_text(out)
    else:
        sys.stdout.write(out)
    n = sum(counts)
    mean = sum((i + 1) * c for i, c in enumerate(counts)) / n if n else float("nan")
    mode = max(range(len(prior)), key=prior.__getitem__) + 1
    print(f"{n} {args.unit}s of 1-{args.max_hole} tokens ({longer} longer, left out), mean {mean:.1f} tokens, "
          f"mode {mode}; use it with: asarm infill --length-prior {args.out or 'FILE'} --max-hole {args.max_hole}",
          file=sys.stderr)
    return 0


def read_corpora(paths: list[str]) -> list[str]:
    return [read_text(argparse.Namespace(file=None if path == "-" else path, text=path), max_bytes=CORPUS_BYTES)
            for path in paths]


def cmd_score(args) -> int:
    import math

    import torch

    from .scoring import score
    from .text import parse_scored_text
    from .tokenization import decode

    model = load_cli_model(args)
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer files; score token ids with asarm.score() instead")
    ids, hidden = parse_scored_text(model.tokenizer, input_text(args), getattr(model.config, "max_length", None))
    if len(ids) == 0:
        raise InputError("nothing to score: the text is empty")
    order = args.order if args.order in ("left-to-right", "random") else [int(x) for x in args.order.split(",")]
    res = score(model, ids, hidden, order=order, seed=args.seed)
    n = int(res.num_tokens)
    nll = -float(res.log_prob)
    print(f"tokens scored: {n}")
    print(f"total NLL: {nll:.4f} nats ({nll / math.log(2):.4f} bits)")
    print(f"NLL per token: {nll / max(n, 1):.4f} nats; perplexity: {math.exp(nll / max(n, 1)):.3f}")
    if args.tokens:
        for pos in torch.nonzero(hidden).flatten().tolist():
            piece = decode(model.tokenizer, [int(ids[pos])])
            print(f"{pos:6d} {-float(res.token_log_probs[pos]):9.4f}  {piece!r}")
    return 0


def cmd_generate(args) -> int:
    if args.length < 1:
        raise InputError(f"--length must be >= 1, got {args.length}")
    prompt = args.prompt
    if prompt == "-" and not getattr(args, "prompt_read", False):
        prompt = read_text(argparse.Namespace(file=None, text="-"))
    escaped = (prompt or "").replace("[", "\\[")
    return run_infill(args, f"{escaped}[MASK:{args.length}]")


# --- asarm models: read from the model folders, no torch -------------------------------------
def safetensors_parameters(path: Path) -> int:
    """Number of parameters in a safetensors file, from its JSON header (no weights read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


def training_data(readme: str) -> str:
    """A one-line summary of a model card's "## Data" section: the listed sources (or its first
    sentence) and the training-token count."""
    m = re.search(r"^## Data\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if m is None:
        return "see the model's README.md"
    body = m.group(1)
    sources = re.findall(r"^\| `([^`]+)` \|", body, re.M)
    if sources:
        what = ", ".join(re.sub(r"^english/|\.(txt\.gz|zip|gz|txt)$", "", s) for s in sources)
    else:
        first = next((para for para in body.strip().split("\n\n") if para.strip()), "")
        while re.search(r"\([^()]*\)", first):  # drop parentheticals, innermost first
            first = re.sub(r"\s*\([^()]*\)", "", first)
        first = " ".join(first.replace("**", "").replace("`", "").split())
        what = re.split(r"(?<=[a-z])\.(\s|$)", first)[0]
    tokens = re.search(r"\*\*([\d.,]+ ?[KMB]) tokens\*\*", body)
    return f"{tokens.group(1)} tokens: {what}" if tokens else what


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: ``model.safetensors``, or its shards."""
    single = directory / "model.safetensors"
    return [single] if single.is_file() else sorted(directory.glob("model-*-of-*.safetensors"))


def model_card(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    weights = weight_files(directory)
    readme = directory / "README.md"
    metrics = directory / "metrics.json"
    card = {"name": directory.name, "max_length": config.get("asarm_max_length"),
            "parameters": sum(map(safetensors_parameters, weights)) if weights else None,
            "size_mb": sum(w.stat().st_size for w in weights) / 1e6 if weights else None,
            "training_data": training_data(readme.read_text()) if readme.is_file() else "unknown",
            "valid_ppl": None, "readme": str(readme)}
    if metrics.is_file():
        card["valid_ppl"] = json.loads(metrics.read_text()).get("best_valid_ppl")
    return card


def cmd_models(args) -> int:
    dirs = sorted(p for p in SHIPPED_DIR.iterdir() if (p / "config.json").is_file()) if SHIPPED_DIR.is_dir() else []
    if not dirs:
        print("no shipped models in this installation; pass a checkpoint directory with --model")
        return 0
    for d in dirs:
        c = model_card(d)
        default = " (default)" if c["name"] == "asarm-en-small" else ""
        size = []
        if c["parameters"] is not None:
            size.append(f"{c['parameters'] / 1e6:.2f} M parameters, {c['size_mb']:.1f} MB")
        size.append(f"limit {c['max_length']} tokens" if c["max_length"] else "no length limit recorded")
        if c["valid_ppl"] is not None:
            size.append(f"validation perplexity {c['valid_ppl']:.3g}")
        print(f"{c['name']}{default}: {', '.join(size)}")
        print(f"    trained on {c['training_data']}")
        print(f"    model card: {c['readme']}")
    return 0


# --- the parser ----------------------------------------------------------------------------------
def add_lazy_command(sub, name: str) -> None:
    """The real parser of a LAZY_COMMANDS entry (imports its module), with --threads added where
    the module does not define it."""
    import importlib

    module = importlib.import_module(f".{LAZY_COMMANDS[name][0]}", __package__)
    module.add_cli(sub)
    parser = sub.choices[name]
    if name in ("train", "bench") and not any("--threads" in a.option_strings for a in parser._actions):
        add_threads_argument(parser)


def cmd_quantize(args) -> int:
    from .checkpoint import load_model, save_model
    from .quantize import bytes_per_pass

    # fp32 so that biases and norms are written at full precision; int8 values + fp32 scales
    model = load_model(args.model, revision=args.revision, device="cpu", dtype="fp32", quantize=args.to)
    save_model(model, args.out)
    print(f"wrote {args.out}: {args.to} weight-only ({model.num_parameters() / 1e6:.1f}M weights, "
          f"{bytes_per_pass(model) / 2**20:.0f} MiB read per pass with fp32 norms/biases)")
    return 0


def add_quantize_parser(sub) -> None:
    """``asarm quantize MODEL OUT --to int8``: a weight-only int8 copy of a checkpoint, which
    loads with ``load_model(OUT)`` and states its format in config.json (``asarm_quantization``)."""
    p = sub.add_parser("quantize", help="write a weight-only int8 copy of a model (loads with load_model)")
    p.add_argument("model", help="shipped name, checkpoint directory or hub id")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", default="int8", choices=list(QUANTIZATIONS), help="quantization (default int8)")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_quantize)


def add_score_parser(sub) -> None:
    p = sub.add_parser("score", help="exact log-likelihood of [[marked]] spans given the rest, in one pass",
                       description="Score the spans written [[like this]] given the rest of the text (the "
                                   "whole text if none is marked): total and per-token NLL, perplexity.")
    p.add_argument("text", nargs="?", help="text, or '-' for standard input")
    p.add_argument("--file", default=None)
    p.add_argument("--order", default="left-to-right", help="left-to-right, random or comma-separated positions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", action="store_true", help="also print every scored token's NLL")
    add_model_arguments(p)
    p.set_defaults(func=cmd_score)


def add_length_prior_parser(sub) -> None:
    p = sub.add_parser("length-prior", help="measure a [MASK] length prior on your text (for --length-prior)",
                       description="Count the token lengths of the lines, sentences or paragraphs of FILEs with the "
                                   "model's tokenizer and write the prior over hole lengths 1..--max-hole as a JSON list "
                                   "(add-one smoothed) for `asarm infill --length-prior`. With small models this prior "
                                   "carries nearly all the information about a hole's length.")
    p.add_argument("files", nargs="+", help="UTF-8 text files like the text you will fill ('-' for stdin)")
    p.add_argument("--unit", default="sentence", choices=["line", "sentence", "paragraph"],
                   help="what one hole holds (default sentence; line for code)")
    p.add_argument("--max-hole", type=int, default=32, help="longest length (default 32, as infill's [MASK])")
    p.add_argument("--smoothing", type=float, default=1.0, help="added to every length's count (default 1)")
    p.add_argument("--out", default=None, help="write the JSON here (default: standard output)")
    add_model_arguments(p)
    p.set_defaults(func=cmd_length_prior)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` given, only that lazy subcommand's module is imported
    (the others get a placeholder that only lists them in --help). "" imports none."""
    note = limit_note()
    parser = Parser(prog="asarm", description="Any-subset autoregressive models and exact "
                                     "ASSD sampling. " + note)
    parser.add_argument("--version", action="version", version=f"asarm {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("infill", help="fill [MASK] / [MASK:n] holes in a text",
                       description="Fill holes written as [MASK:n] (n = hole length in tokens), [MASK:a-b] "
                                   "or [MASK] (length unknown: chosen from its posterior given the context). "
                                   "A hole at the end continues the text; '\\[' is a literal bracket. " + note)
    p.add_argument("text", nargs="?", help="text with holes, or '-' to read standard input")
    p.add_argument("--file", default=None, help="read the text from this file (UTF-8)")
    p.add_argument("--stats", action="store_true", help="print NFE, rounds and tokens per round to stderr")
    p.add_argument("--stream", action="store_true", help="print the text as it fills in")
    p.add_argument("--max-hole", type=int, default=None, help="longest length of a [MASK] hole (default 32)")
    p.add_argument("--length-prior", default=None, metavar="FILE", help="JSON prior over hole lengths: a list of "
                   "weights for lengths 1, 2, ... or an object {length: weight} (default uniform)")
    p.add_argument("--factorization", default=None, choices=["right-given-left", "left-given-right"],
                   help="length evidence for [MASK] holes (default: the model's recorded choice)")
    p.add_argument("--stop-at", default=None, help="fill a final [MASK] to its longest length and cut at this "
                   "string: newline, eos, or any text ('\\n' is a newline)")
    p.add_argument("--allow-special", action="store_true", help="let holes contain the special tokens that are not "
                   "text (<unk>, <s>, padding, ...); by default they are excluded inside the target distribution")
    p.add_argument("--constraint", action="append", default=None, metavar="HOLE:KIND:VALUE",
                   help="constrain hole HOLE (0 = first) to a regex, a choice (values separated by '|') or a "
                        "json_schema, e.g. 0:regex:' [0-9]{4}' or 1:choice:' red| blue' (repeatable)")
    p.add_argument("--constraints", default=None, metavar="JSON|FILE",
                   help="all constraints as JSON {hole: {\"regex\"|\"choice\"|\"json_schema\": ...}}, or a file of it")
    add_model_arguments(p, generation=True)
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_infill)

    add_length_prior_parser(sub)
    add_quantize_parser(sub)

    p = sub.add_parser("generate", help="continue a prompt (or generate from nothing)",
                       description="Continue a prompt by --length tokens. " + note)
    p.add_argument("prompt", nargs="?", default="", help="prompt text ('' for unconditional, '-' for stdin)")
    p.add_argument("--length", type=int, default=64, help="tokens to generate (default 64; prompt + length "
                   "must fit the model's limit)")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--stream", action="store_true")
    add_model_arguments(p, generation=True)
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_generate)

    add_score_parser(sub)

    p = sub.add_parser("models", help="list the shipped models: size, length limit, training data")
    p.set_defaults(func=cmd_models)

    for name, (_, help_text) in LAZY_COMMANDS.items():
        if command is None or command == name:
            add_lazy_command(sub, name)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_name(argv: list[str]) -> str:
    """The subcommand named in argv ("" when none): the first argument that is not an option
    (the top-level parser has no options that take a value)."""
    return next((a for a in argv if not a.startswith("-")), "")


MAX_HOLE_LIMIT = 4096  # as asarm.lengths.MAX_HOLE_LIMIT (not imported: that module loads torch)


def check_option_values(args) -> None:
    """Option values and the input text, checked before torch or a model loads (about 0.1 s)."""
    import math

    max_hole = getattr(args, "max_hole", None)
    if max_hole is not None and not 1 <= max_hole <= MAX_HOLE_LIMIT:
        raise InputError(f"--max-hole: max_hole must be an integer >= 1 and <= {MAX_HOLE_LIMIT}, got {max_hole}")
    smoothing = getattr(args, "smoothing", None)
    if smoothing is not None and not (math.isfinite(smoothing) and smoothing >= 0):
        raise InputError(f"--smoothing must be a finite number >= 0, got {smoothing}")
    out = getattr(args, "out", None) if args.command == "length-prior" else None  # (bench's --out is a folder)
    if isinstance(out, str) and os.path.isdir(out):
        raise InputError(f"--out {out} is a directory: give a file name")
    if hasattr(args, "threads") and args.command != "train":
        resolve_threads(args.threads)
    if getattr(args, "device", None) is not None:
        check_device_name(args.device)
    if args.command in ("infill", "generate"):  # every decoding option, as sampling will read it
        if args.command == "generate" and args.length < 1:
            raise InputError(f"--length must be >= 1, got {args.length}")
        sampling_options(args)  # DecodeConfig's own checks first: their messages say more (0: greedy)
        check_sampling_bounds(args)
        length_options(args)
    # the input last, so a mistyped option is reported before a long read
    if args.command in ("infill", "score"):
        args.input_text = read_text(args)
    elif args.command == "generate" and args.prompt == "-":
        args.prompt, args.prompt_read = read_text(argparse.Namespace(file=None, text="-")), True
    elif args.command == "length-prior":
        args.input_texts = read_corpora(args.files)


def one_line_warnings() -> None:
    """asarm's own warnings (``LiteralMaskWarning``) as one ``asarm: warning:`` line, like errors."""
    import warnings

    default = warnings.formatwarning
    if getattr(default, "asarm_one_line", False):  # main() already ran in this process
        return

    def formatwarning(message, category, *args, **kwargs):
        if issubclass(category, LiteralMaskWarning):
            return f"asarm: warning: {message}\n"
        return default(message, category, *args, **kwargs)

    formatwarning.asarm_one_line = True
    warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    one_line_warnings()
    parser = build_parser(command_name(argv))
    args = parser.parse_args(argv)
    args.command_line = "asarm " + " ".join(argv)  # recorded by commands that write results
    try:
        check_option_values(args)
        if hasattr(args, "threads"):
            if args.command == "train":  # training keeps its threads in its config (the default there)
                if args.threads is not None or os.environ.get(THREADS_ENV, "").strip():
                    args.overrides.append(f"threads={resolve_threads(args.threads)}")
            else:
                apply_threads(args.threads)
        return int(args.func(args) or 0)
    except ASARMError as exc:
        message = " ".join(str(exc).split())  # one line, even when a library's message has several
        print(f"asarm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
