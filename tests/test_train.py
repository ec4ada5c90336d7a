"""Training: the loss falls, --resume continues exactly after a SIGKILL, 2-process DDP (gloo),
exports load, clear errors. Tiny models and corpora: seconds each."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asarm.errors import CheckpointError, InputError
from asarm.train import TrainConfig, evaluate, evaluate_sources, export_run, load_config, main, mask_range, train

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("the cat dog bird sat ran on under a mat log tree and then it saw red big small").split()


def corpus_text(n_docs: int = 120, seed: int = 0) -> str:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(2, 5)):
            sents.append(f"the {rng.choice(WORDS[1:4])} sat on the {rng.choice(WORDS[8:12])} and then it "
                         f"saw a {rng.choice(WORDS[15:17])} {rng.choice(WORDS[1:4])}.")
        docs.append(" ".join(sents))
    return "\n\n".join(docs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(data folder of small documents, tokenizer directory) shared by the module."""
    from asarm.data import load_documents
    from asarm.tokenization import train_tokenizer

    base = tmp_path_factory.mktemp("corpus")
    data = base / "docs"
    data.mkdir()
    for i, doc in enumerate(corpus_text().split("\n\n")):
        (data / f"{i:03d}.txt").write_text(doc + "\n")
    tok = train_tokenizer(load_documents(data), 300, kind="text")
    tok.save_pretrained(str(base / "tok"))
    return data, base / "tok"


def tiny_cfg(corpus, out, **overrides) -> dict:
    data, tok = corpus
    cfg = dict(model={"d_model": 32, "n_layer": 2, "n_head": 2, "d_inner": 64, "dropout": 0.1},
               tokenizer=str(tok), data=[str(data)], valid_fraction=0.1, seq_len=32, batch_size=4,
               max_steps=40, lr=3e-3, warmup_steps=2, mask_warmup_steps=0, eval_every=10, eval_chunks=8,
               eval_batch_size=4, log_every=1, save_every=5, threads=1, out_dir=str(out))
    cfg.update(overrides)
    return cfg


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def losses(out: Path) -> list[str]:
    with open(out / "train_log.csv", newline="") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    e.pop("WORLD_SIZE", None)
    return e


def test_loss_falls_and_export_loads(corpus, tmp_path):
    from asarm.checkpoint import load_model
    from asarm.tokenization import decode, encode

    cfg = TrainConfig(**tiny_cfg(corpus, tmp_path / "run"))
    cfg.validate()
    result = train(cfg)
    rows = losses(tmp_path / "run")
    first = sum(float(l) for _, l in rows[:5]) / 5
    last = sum(float(l) for _, l in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert math.isfinite(result["best_valid_loss"]) and result["export_step"] in (10, 20, 30, 40)
    with open(tmp_path / "run" / "valid_log.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["10", "20", "30", "40"]
    assert (tmp_path / "run" / "loss.png").is_file()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert 1 <= len(ckpts) <= 2  # last + best only
    model = load_model(tmp_path / "run" / "model", device="cpu")
    text = "the cat sat on the mat."
    assert decode(model.tokenizer, encode(model.tokenizer, text)) == text
    assert model.config.vocab_size == len(model.tokenizer) and model.config.mask_token_id == 6
    assert model.config.max_length == 32  # the training length, recorded for samplers and harnesses
    # fixed validation masks: the same number every time
    chunks = torch.load(tmp_path / "run" / "prepared" / "chunks.pt")["valid"]
    a, b = evaluate(model, chunks, seed=5, batch_size=4), evaluate(model, chunks, seed=5, batch_size=4)
    assert a == b and a["tokens"] > 0
    # exporting a run's best checkpoint without training (the CLI's --export)
    exported = export_run(cfg, "best", export_dir=str(tmp_path / "exp"))
    assert exported["export_step"] == result["export_step"]
    assert load_model(tmp_path / "exp", device="cpu").config.vocab_size == model.config.vocab_size
    # fine-tuning a local HF checkpoint (its tokenizer comes along)
    ft = tiny_cfg(corpus, tmp_path / "ft", model={}, tokenizer=None, init_from=str(tmp_path / "run" / "model"),
                  max_steps=3, eval_every=3, save_every=3, grad_accum=2, random_order=0.5)
    ft_result = train(TrainConfig(**ft))
    assert ft_result["step"] == 3 and ft_result["best_valid_loss"] < 4.0  # starts from the trained weights
    recorded = json.loads((tmp_path / "ft" / "model" / "training_metrics.json").read_text())["train_config"]
    assert recorded["random_order"] == 0.5 and recorded["init_from"] == str(tmp_path / "run" / "model")
    held = evaluate_sources(tmp_path / "run" / "model", [str(corpus[0])], seq_len=32, max_chunks=4, batch_size=4)
    assert held["chunks"] == 4 and math.isfinite(held["loss"])


def test_resume_after_sigkill_continues_exactly(corpus, tmp_path):
    cfg = write_cfg(tmp_path / "cfg.json", tiny_cfg(corpus, tmp_path / "x", max_steps=40, save_every=5, eval_every=20))
    cmd = [sys.executable, "-m", "asarm.train", "--config", str(cfg)]
    full = subprocess.run(cmd + ["--out", str(tmp_path / "full")], env=env(), capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "LATEST").is_file():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed"
    step = int((out / "checkpoints" / "LATEST").read_text().split("-")[1])
    assert step < 40
    again = subprocess.run(cmd + ["--out", str(out), "--resume"], env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(out) == losses(tmp_path / "full")
    assert (out / "valid_log.csv").read_text() == (tmp_path / "full" / "valid_log.csv").read_text()


def test_ddp_two_processes_gloo_disjoint_shards(corpus, tmp_path):
    out = tmp_path / "ddp"
    cfg = write_cfg(tmp_path / "cfg.json", tiny_cfg(corpus, out, max_steps=6, eval_every=3, save_every=3,
                                                   trace_chunks=True))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "asarm.train", "--config", str(cfg)]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = losses(out)
    assert [s for s, _ in rows] == [str(i) for i in range(1, 7)]  # logged once (rank 0 only)
    assert all(math.isfinite(float(l)) for _, l in rows)
    shards = []
    for r in range(2):
        lines = (out / f"chunks-rank{r}.txt").read_text().split("\n")
        shards.append([set(map(int, l.split()[1:])) for l in lines if l])
    seen = set()
    for a, b in zip(*shards):
        assert len(a) == len(b) == 4 and not a & b
        assert not (a | b) & seen  # no chunk twice within the epoch
        seen |= a | b
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 6


def test_config_errors_and_cli(corpus, tmp_path, capsys):
    with pytest.raises(InputError, match="unknown training config key"):
        load_config(str(write_cfg(tmp_path / "a.json", {"dataa": ["x"]})))
    with pytest.raises(InputError, match="unknown model config key"):
        load_config(None, ["data=[\"x\"]", "model.d_modle=3"])
    with pytest.raises(InputError, match="does not exist"):
        load_config(str(tmp_path / "nope.json"))
    for bad in ("1.5", "-0.1", '"half"'):
        with pytest.raises(InputError, match="random_order must be true, false or a probability"):
            load_config(str(write_cfg(tmp_path / "r.json", tiny_cfg(corpus, tmp_path / "r"))), [f"random_order={bad}"])
    assert load_config(str(write_cfg(tmp_path / "r.json", tiny_cfg(corpus, tmp_path / "r"))),
                       ["random_order=0.5"]).random_order == 0.5
    bad = write_cfg(tmp_path / "m.json", tiny_cfg(corpus, tmp_path / "m", data=[str(tmp_path / "missing")]))
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "data source" in err and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty.txt").write_text("")
    empty = write_cfg(tmp_path / "e.json", tiny_cfg(corpus, tmp_path / "e", data=[str(tmp_path / "empty.txt")]))
    with pytest.raises(InputError, match="empty corpus"):
        train(load_config(str(empty)))
    with pytest.raises(CheckpointError, match="--resume"):
        train(load_config(str(empty), ["out_dir=" + str(tmp_path / "fresh")]), resume=True)
    # the CLI subcommand is registered with the shared parser
    from asarm.cli import build_parser
    from asarm.train import run_train_command

    args = build_parser().parse_args(["train", "--config", "tiny", "--set", "max_steps=3", "--out", "o"])
    assert args.func is run_train_command and args.overrides == ["max_steps=3"]


def test_mask_warmup_and_shipped_configs():
    cfg = TrainConfig(data=["x"], model={"d_model": 8}, mask_warmup_steps=100)
    assert mask_range(cfg, 0) == (0.15, 0.15)
    low, high = mask_range(cfg, 50)
    assert abs(low - 0.5) < 1e-9 and abs(high - 0.57) < 1e-9
    assert mask_range(cfg, 100) == (0.85, 0.99) == mask_range(cfg, 10**6)
    for name in ("asarm-en-small", "asarm-py-small", "asarm-en-small-gpu", "asarm-py-small-gpu", "tiny"):
        cfg = load_config(name)
        assert cfg.mask_low == 0.85 and cfg.mask_high == 0.99
        text = json.dumps(cfg.data)
        assert "test.txt" not in text and "humaneval" not in text.lower()


@pytest.mark.parametrize("name,kind", [("asarm-en-small", "text"), ("asarm-py-small", "code")])
def test_shipped_models(name, kind):
    from asarm.checkpoint import SHIPPED_DIR, load_model
    from asarm.tokenization import decode, encode

    directory = SHIPPED_DIR / name
    if not (directory / "config.json").is_file():
        pytest.skip(f"{name} is not in this checkout")
    weights = sorted(directory.glob("*.safetensors"))  # one file or shards, each <= 16 MiB, <= 32 MiB in all
    assert weights and all(w.stat().st_size <= 16 * 2**20 for w in weights)
    assert sum(w.stat().st_size for w in weights) <= 32 * 2**20
    assert (directory / "README.md").is_file()
    model = load_model(name, device="cpu")
    assert model.config.mask_token_id == 6 and model.config.max_length in (128, 256)
    text = "def f(x):\n\treturn x  # caf\u00e9\n" if kind == "code" else "The jury said \"no\" -- twice."
    assert decode(model.tokenizer, encode(model.tokenizer, text)) == text
    ids = torch.tensor([encode(model.tokenizer, text)[:16]])
    ranks = torch.zeros_like(ids)
    ranks[0, 4:8] = torch.arange(1, 5)
    with torch.no_grad():
        logits, _, valid = model.chain_logits(ids, ranks)
    assert torch.isfinite(logits).all() and int(valid.sum()) == 4
