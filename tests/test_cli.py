"""The `asarm` command line end to end on a tiny checkpoint saved to a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import asarm
from asarm.checkpoint import save_model
from asarm.cli import main
from asarm.tokenization import train_tokenizer
from conftest import ROOT, tiny_model

CORPUS = ("The cat sat on the mat. The dog sat on the log. A bird sang in the tree. " * 40)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = train_tokenizer([CORPUS], vocab_size=300)
    model = tiny_model(seed=0, vocab_size=len(tok), d_model=32, n_head=4, d_inner=64, initializer_range=0.1)
    path = tmp_path_factory.mktemp("ckpt")
    save_model(model, path, tokenizer=tok)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_infill_keeps_the_text_around_the_hole(checkpoint, capsys):
    code, out, err = run(capsys, "infill", "The cat [MASK:4] the mat.", "--model", checkpoint, "--seed", "0", "--stats")
    assert code == 0
    # the space before the hole belongs to the hole's first token (the model writes it)
    assert out.startswith("The cat") and out.rstrip("\n").endswith(" the mat.")
    assert "nfe=" in err and "tokens/round=" in err and "tokens=4 " in err


@pytest.mark.parametrize("extra", [[], ["--method", "sequential"], ["--draft", "ngram", "-k", "3"],
                                   ["--greedy"], ["--top-k", "5", "--temperature", "0.7"], ["--order", "random"],
                                   ["--no-cache"], ["--stream"], ["--one-pass", "--adaptive-k"],
                                   ["--draft", "ngram", "--bonus"]])
def test_infill_options(checkpoint, capsys, extra):
    code, out, _ = run(capsys, "infill", "A bird [MASK:3] in the [MASK:2].", "--model", checkpoint, "--seed", "1", *extra)
    assert code == 0 and out.startswith("A bird") and " in the" in out


def test_same_seed_same_output(checkpoint, capsys):
    a = run(capsys, "infill", "[MASK:8]", "--model", checkpoint, "--seed", "3")[1]
    b = run(capsys, "infill", "[MASK:8]", "--model", checkpoint, "--seed", "3")[1]
    assert a == b


def test_stream_prints_the_same_text_as_infill(checkpoint, capsys):
    plain = run(capsys, "infill", "The dog [MASK:5] log.", "--model", checkpoint, "--seed", "2")[1]
    streamed = run(capsys, "infill", "The dog [MASK:5] log.", "--model", checkpoint, "--seed", "2", "--stream")[1]
    assert plain == streamed


def test_stdin_file_and_generate(checkpoint, capsys, tmp_path, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("The [MASK:2] sat."))
    code, out, _ = run(capsys, "infill", "-", "--model", checkpoint, "--seed", "0")
    assert code == 0 and out.startswith("The") and out.rstrip().endswith(" sat.")
    f = tmp_path / "in.txt"
    f.write_text("On the [MASK:3].")
    code, out, _ = run(capsys, "infill", "--file", str(f), "--model", checkpoint, "--seed", "0")
    assert code == 0 and out.startswith("On the")
    code, out, _ = run(capsys, "generate", "The cat", "--length", "5", "--model", checkpoint, "--seed", "0")
    assert code == 0 and out.startswith("The cat")
    code, out, _ = run(capsys, "generate", "--length", "5", "--model", checkpoint, "--seed", "0")
    assert code == 0 and out.strip()


def test_score_command(checkpoint, capsys):
    code, out, _ = run(capsys, "score", "The cat sat on the [[mat]].", "--model", checkpoint, "--tokens")
    assert code == 0 and "total NLL" in out and "perplexity" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["infill", "no holes here"], "no holes"),
        (["infill", "bad [MASK:x] hole"], "MASK"),  # [MASK] alone is a hole of unknown length
        (["infill", "x [MASK:3]", "-k", "0"], "k must be"),
        (["infill", "x [MASK:3]", "--temperature", "-1"], "--temperature must be > 0"),
        (["infill", "x [MASK:3]", "--temperature", "nan"], "--temperature must be > 0"),
        (["infill", "x [MASK:3]", "--threads", "0"], "--threads must be from 1 to 1024"),
        (["infill", "x [MASK:3]", "--revision", "nlp"], "--revision 'nlp' applies to hub ids"),
        (["score", "the [[mat]]", "--revision", "v1"], "--revision 'v1' applies to hub ids"),
        (["infill", "x [MASK:3]", "--order", "a,b"], "--order"),
        (["infill", "--file", "/nonexistent/file.txt"], "cannot read"),
        (["generate", "x", "--length", "0"], "--length"),
    ],
)
def test_user_errors_are_one_line_exit_2(checkpoint, capsys, argv, message):
    code, out, err = run(capsys, *argv, "--model", checkpoint)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "infill", "a [MASK:2]", "--model", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err


def test_subprocess_entry_point(checkpoint):
    proc = subprocess.run([sys.executable, "-m", "asarm.cli", "infill", "The [MASK:3] sat.", "--model", checkpoint,
                           "--seed", "0"], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The")
    bad = subprocess.run([sys.executable, "-m", "asarm.cli", "infill", "The [MASK:0] sat.", "--model", checkpoint],
                         capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_bench_writes_json_and_plot(tmp_path, capsys, checkpoint):
    code, out, _ = run(capsys, "bench", "--model", checkpoint, "--lengths", "16", "--settings", "95%",
                       "--batch-sizes", "2", "--window", "2", "--out", str(tmp_path))
    assert code == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    names = {r["config"] for r in data["records"]}
    assert "full-recompute sequential" in names and "batched cached ASSD B=2" in names
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in data["records"])
    assert (tmp_path / "bench.png").stat().st_size > 1000
    text = tmp_path / "text.txt"
    text.write_text(CORPUS)
    code, _, _ = run(capsys, "bench", "--model", checkpoint, "--suite", "speedups", "--lengths", "16",
                     "--settings", "50%-spans", "--window", "2", "--out", str(tmp_path / "s"), "--text-file", str(text))
    assert code == 0
    data = json.loads((tmp_path / "s" / "bench.json").read_text())
    assert {r["config"] for r in data["records"]} >= {"ASSD", "ASSD + one-pass", "ASSD + bonus"}
    assert data["meta"]["inputs"] == str(text) and "16" in data["meta"]["full_pass_seconds"]


def test_argument_errors_are_one_line_exit_2(capsys):
    for argv, message in [(["infill", "x [MASK:2]", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
                          (["infill", "-k", "x"], "argument -k: invalid int value"),
                          ([], "required: COMMAND"),
                          (["infill", "--bogus"], "unrecognized arguments: --bogus")]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        _, err = capsys.readouterr()
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_temperature_zero_is_greedy(checkpoint, capsys):
    greedy = run(capsys, "infill", "The dog [MASK:6] log.", "--model", checkpoint, "--seed", "1", "--greedy")
    zero = run(capsys, "infill", "The dog [MASK:6] log.", "--model", checkpoint, "--seed", "2", "--temperature", "0")
    assert greedy[0] == zero[0] == 0 and greedy[1] == zero[1]


def test_text_that_is_not_utf8_is_one_line_exit_2(checkpoint, capsys, tmp_path, monkeypatch):
    import io

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 [MASK:2].".encode("latin-1"))
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02abc[MASK:2]")
    for argv, message in [(["infill", "--file", str(latin1)], "is not UTF-8 text (byte 3"),
                          (["score", "--file", str(latin1)], "is not UTF-8 text"),
                          (["infill", "--file", str(binary)], "NUL bytes")]:
        code, _, err = run(capsys, *argv, "--model", checkpoint)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00bin")))
    code, _, err = run(capsys, "infill", "-", "--model", checkpoint)
    assert code == 2 and "standard input is not UTF-8 text" in err and err.count("\n") == 1
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x89PNG\x00\x00")))
    code, _, err = run(capsys, "generate", "-", "--model", checkpoint)
    assert code == 2 and "standard input" in err


def test_binary_stdin_in_a_real_process(checkpoint):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "asarm.cli", "infill", "-", "--model", checkpoint],
                          input=bytes(range(256)), capture_output=True, cwd=ROOT, env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and err.count("\n") == 1, err


def test_threads_option_and_environment(checkpoint, capsys, monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, _, _ = run(capsys, "infill", "A [MASK:2].", "--model", checkpoint, "--seed", "0", "--threads", "1")
        assert code == 0 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("ASARM_NUM_THREADS", "1")
        code, _, _ = run(capsys, "score", "A [[cat]].", "--model", checkpoint)
        assert code == 0 and torch.get_num_threads() == 1
        monkeypatch.setenv("ASARM_NUM_THREADS", "many")
        code, _, err = run(capsys, "infill", "A [MASK:2].", "--model", checkpoint)
        assert code == 2 and "ASARM_NUM_THREADS must be an integer from 1 to 1024, got 'many'" in err
        monkeypatch.delenv("ASARM_NUM_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        code, _, _ = run(capsys, "generate", "A", "--length", "2", "--model", checkpoint, "--seed", "0")
        assert code == 0 and torch.get_num_threads() == 1  # the default for the small models
    finally:
        torch.set_num_threads(before)


def test_every_model_command_takes_threads():
    from asarm.cli import build_parser

    parser = build_parser()
    for argv in (["infill", "x"], ["generate"], ["score", "x"], ["bench"], ["train"], ["eval", "wikitext"],
                 ["eval", "rocstories"], ["eval", "humaneval-infilling"]):
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3, argv


def test_help_models_and_errors_do_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from asarm.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    main(['models'])\n"
            "for argv in (['--help'], ['infill', '--help'], ['--version'], ['infill', '-k', 'x']):\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "            main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "import asarm\n"
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))\n"
            "from asarm import ASARM, sample\n"  # the lazy names still import
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "True"]


def test_version_models_and_limits_in_help(capsys):
    from asarm import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"asarm {__version__}"
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "asarm-en-small (default): 14.69 M parameters, 29.4 MB, limit 128 tokens" in out
    assert "asarm-py-small: 14.69 M parameters, 29.4 MB, limit 256 tokens" in out
    assert "3.68 M tokens: brown, abc, webtext, state_union, inaugural, wikitext-2/valid" in out
    assert "6.44 M tokens: python-stdlib, python-package:networkx, python-package:nltk" in out
    for argv in (["--help"], ["infill", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "at most 128 (asarm-en-small) or 256" in " ".join(capsys.readouterr().out.split())


def test_models_parameter_count_matches_the_loaded_model():
    from asarm.checkpoint import SHIPPED_DIR, load_model
    from asarm.cli import model_card

    for name in ("asarm-en-small", "asarm-py-small"):
        card = model_card(SHIPPED_DIR / name)
        model = load_model(name, device="cpu")
        params = {id(p): p.numel() for p in model.parameters()}
        assert card["parameters"] == sum(params.values()), name
        assert card["max_length"] == model.config.max_length


def test_lazy_subcommand_help_matches_the_real_parsers():
    from asarm.cli import LAZY_COMMANDS, build_parser

    def helps(parser):
        sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
        return {a.dest: a.help for a in sub._choices_actions}

    real, placeholders = helps(build_parser()), helps(build_parser(""))
    assert real == placeholders and set(LAZY_COMMANDS) <= set(real)


# ---------------------------------------------------------------- reliability (issue 30)

@pytest.mark.parametrize("argv, message", [
    (["infill", "--threads", "100000", "x"], "--threads must be from 1 to 1024"),
    (["infill", "--max-hole", "1000000000", "x"], "max_hole must be an integer >= 1 and <= 4096"),
    (["length-prior", "--max-hole", "1000000000", "x"], "max_hole must be an integer >= 1 and <= 4096"),
    (["length-prior", "--smoothing", "nan", "x"], "--smoothing must be a finite number"),
    (["length-prior", "--out", "/tmp", "x"], "is a directory"),
])
def test_abusive_option_values_are_one_line_errors_before_torch(argv, message):
    """--threads 100000 segfaulted; --max-hole 1e9 grew to 22 GB; --smoothing nan printed NaN
    weights with exit 0: each is now one line, exit 2, and torch is never imported."""
    import subprocess
    import sys

    code = ("import sys; from asarm.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_option_value_and_input_errors_answer_before_torch(tmp_path):
    """Option *values* (not only their syntax), the device's name and the input file are checked
    before torch loads: `-k 1000000000` tried to allocate 1.5 TB, `--file /dev/zero` grew until
    the kernel killed it, `--device meta` was a traceback, and each took seconds to import
    torch first. All cases run in one interpreter (one start-up) that must never import torch."""
    big = tmp_path / "big.txt"
    big.write_text("word " * 300_000)  # 1.5 MB: more than any model's limit, refused unread
    cases = [
        (["infill", "x[MASK]", "--temperature", "-1"], "--temperature must be > 0, got -1.0"),
        (["infill", "x[MASK]", "--temperature", "1000"], "--temperature must be >= 0 and <= 100, got 1000.0"),
        (["infill", "x[MASK]", "-k", "0"], "k must be an integer >= 1, got 0"),
        (["infill", "x[MASK]", "-k", "1000000000"], "-k must be >= 1 and <= 64, got 1000000000"),
        (["infill", "x[MASK]", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["generate", "hi", "--top-k", "0"], "top_k must be an integer >= 1"),
        (["generate", "hi", "--top-k", "2000000"], "--top-k must be >= 1 and <= 1000000, got 2000000"),
        (["generate", "hi", "--length", "0"], "--length must be >= 1"),
        (["infill", "--file", str(tmp_path / "missing.txt")], "cannot read"),
        (["infill", "--file", "/dev/zero"], "is longer than 1,000,000 bytes"),
        (["score", "--file", str(big)], "is longer than 1,000,000 bytes"),
        (["infill", "x[MASK]", "--device", "meta"], "--device 'meta': use cpu, cuda, cuda:N or mps"),
        (["score", "x", "--device", "tpu:0"], "--device 'tpu:0'"),
    ]
    code = ("import contextlib, io, json, sys\n"
            "from asarm.cli import main\n"
            "out = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        rc = main(argv)\n"
            "    out.append([rc, err.getvalue()])\n"
            "print(json.dumps([out, 'torch' in sys.modules]))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps([argv for argv, _ in cases])], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert r.returncode == 0, r.stderr
    results, torch_imported = json.loads(r.stdout)
    for (argv, message), (rc, err) in zip(cases, results):
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not torch_imported


def test_devices_asarm_cannot_run_on_are_one_line():
    import torch

    from asarm.devices import resolve_device

    for name in ("meta", "xpu"):
        with pytest.raises(asarm.InputError, match="not supported|not available"):
            resolve_device(name)
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        with pytest.raises(asarm.InputError, match="MPS .* not available"):
            resolve_device("mps")
    with pytest.raises(asarm.InputError, match="CUDA"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")


def test_the_python_api_defaults_to_one_thread_unless_the_program_chose():
    """torch's one thread per core made the quickstart 2.7x slower on a busy machine."""
    code = ("import os, torch, asarm, asarm.threads as th\n"
            "default = th.torch_default_threads()\n"
            "assert torch.get_num_threads() == default\n"
            "asarm.load_model('asarm-en-small'); out = [torch.get_num_threads()]\n"
            "th._chosen = False; os.environ['ASARM_NUM_THREADS'] = '3'\n"
            "asarm.load_model('asarm-en-small'); out.append(torch.get_num_threads())\n"
            "th._chosen = False; del os.environ['ASARM_NUM_THREADS']; torch.set_num_threads(default + 1)\n"
            "asarm.load_model('asarm-en-small'); out.append(torch.get_num_threads() - default)\n"
            "th._chosen = False; os.environ['OMP_NUM_THREADS'] = str(default); torch.set_num_threads(default)\n"
            "asarm.load_model('asarm-en-small'); out.append(torch.get_num_threads() - default)\n"
            "print(out)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ASARM_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(env, PYTHONPATH=str(ROOT / "src")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[1, 3, 1, 0]"


def test_lowercase_mask_is_a_one_line_warning_on_the_command_line():
    r = subprocess.run([sys.executable, "-m", "asarm.cli", "infill", "The [mask] sat."], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 2, r.stderr
    assert lines[0].startswith("asarm: warning: [mask] at character 4 is literal text, not a hole")
    assert lines[1].startswith("asarm infill: error: the text has no holes")


def test_a_deeply_nested_config_json_is_one_line(tmp_path, capsys):
    import shutil

    from asarm.checkpoint import SHIPPED_DIR

    folder = tmp_path / "model"
    shutil.copytree(SHIPPED_DIR / "asarm-en-small", folder)
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["infill", "The [MASK:2] sat.", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: not a model config (JSON nested too deeply)" in err


def test_a_deeply_nested_length_prior_is_one_line(tmp_path, capsys):
    from asarm.cli import length_options

    deep = tmp_path / "prior.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    import argparse

    with pytest.raises(asarm.InputError, match="nested too deeply"):
        length_options(argparse.Namespace(length_prior=str(deep)))


def test_length_prior_from_text_takes_the_model_or_its_tokenizer():
    model = asarm.load_model("asarm-en-small")
    a = asarm.length_prior_from_text(model, ["The cat sat. The dog ran far away."], max_length=8)
    b = asarm.length_prior_from_text(model.tokenizer, ["The cat sat. The dog ran far away."], max_length=8)
    assert a == b and len(a) == 8
    with pytest.raises(asarm.InputError, match="smoothing"):
        asarm.length_prior_from_text(model, ["x"], smoothing=float("nan"))
