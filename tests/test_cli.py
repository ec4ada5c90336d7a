"""The `asarm` command line end to end on a tiny checkpoint saved to a temporary directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
        (["infill", "x [MASK:3]", "--temperature", "0"], "greedy"),
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
