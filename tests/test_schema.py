"""The decoding schema is declared once (asarm.sampling.config): a new proposer is one class plus
one registry line, and a new DecodeConfig field reaches `asarm infill --help` and the server's
request bodies with no other edit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
import torch

from asarm.checkpoint import save_model
from asarm.cli import main
from asarm.sampling import Block, Proposer, draw, sample
from asarm.sampling.config import PROPOSERS, DecodeConfig, ProposerInfo
from asarm.tokenization import train_tokenizer
from conftest import ROOT, tiny_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from serve_util import running_server  # noqa: E402

CORPUS = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree. " * 40


class UniformDraft(Proposer):
    """A throw-away proposer: every draft uniform over the vocabulary (no pass). Poor drafts,
    but ASSD corrects any proposal, so it must still draw the exact chain."""

    def propose(self, view, block, drawn):
        p = torch.ones(view.vocab_size, dtype=torch.float64)
        p[view.target.mask_token_id] = 0
        p /= p.sum()
        tokens = [int(draw(p, torch.rand((), generator=view.generator, dtype=torch.float64))) for _ in range(block)]
        return Block(tokens, p.expand(block, -1).to(view.device))


@pytest.fixture
def uniform_draft(monkeypatch):
    monkeypatch.setitem(PROPOSERS, "uniform", ProposerInfo(UniformDraft, "uniform draft", needs_pass=False))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    tok = train_tokenizer([CORPUS], vocab_size=300)
    model = tiny_model(seed=0, vocab_size=len(tok), d_model=32, n_head=4, d_inner=64, initializer_range=0.1)
    path = tmp_path_factory.mktemp("ckpt")
    save_model(model, path, tokenizer=tok)
    model.tokenizer = tok
    return model, str(path)


def test_a_new_proposer_runs_through_sample(uniform_draft):
    model = tiny_model(seed=2, vocab_size=12)
    ids = torch.randint(0, 6, (3, 10), generator=torch.Generator().manual_seed(0))
    masked = torch.rand(3, 10, generator=torch.Generator().manual_seed(1)) < 0.7
    res = sample(model, ids, masked, draft="uniform", k=3, seed=0)
    assert torch.equal(res.draft_calls, res.rounds) and bool((res.nfe == res.rounds).all())  # no draft pass
    # greedy ASSD equals greedy sequential token for token, whatever the proposal
    greedy = sample(model, ids, masked, draft="uniform", k=3, greedy=True, seed=0)
    assert torch.equal(greedy.input_ids, sample(model, ids, masked, method="sequential", greedy=True).input_ids)
    assert DecodeConfig(draft="uniform").label == "ASSD uniform draft, k=5"


def test_a_new_proposer_runs_through_the_cli_and_the_server(uniform_draft, text_model, capsys):
    model, path = text_model
    code = main(["infill", "The cat [MASK:4] mat.", "--draft", "uniform", "--model", path, "--seed", "0", "--stats"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("The cat") and "draft_calls=" in err
    with pytest.raises(SystemExit):
        main(["infill", "--help"])
    assert "uniform" in capsys.readouterr().out
    with running_server(model) as (url, _):
        r = httpx.post(url + "/v1/completions", json={"prompt": "The cat", "max_tokens": 4, "draft": "uniform",
                                                      "seed": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["asarm"]["tokens"] == 4
        r = httpx.post(url + "/v1/completions", json={"prompt": "The cat", "draft": "nope"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "draft"


NEW_FIELD = '''    spice: int = option(0, "a throw-away option added by tests/test_schema.py", ge=0, le=9)
'''

CHECK_NEW_FIELD = r'''
import contextlib, io, json, sys
import httpx, torch
from asarm.cli import main
from asarm.serve.engine import EngineAdapter
from asarm.tokenization import train_tokenizer
from conftest import tiny_model
from serve_util import running_server

out = {}
with contextlib.redirect_stdout(io.StringIO()) as help_text:
    try:
        main(["infill", "--help"])
    except SystemExit:
        pass
out["help"] = help_text.getvalue()
seen = []
add = EngineAdapter.add
EngineAdapter.add = lambda self, ids, masked, config, **kw: seen.append(config.spice) or add(self, ids, masked, config, **kw)
model = tiny_model(seed=0, vocab_size=300)
model.tokenizer = train_tokenizer([sys.argv[1]], vocab_size=300)
with running_server(model) as (url, _):
    good = httpx.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 2, "spice": 3, "seed": 0})
    bad = httpx.post(url + "/v1/completions", json={"prompt": "The", "spice": 10})
out.update(good=good.status_code, bad=bad.status_code, param=bad.json()["error"]["param"], seen=seen)
print(json.dumps(out))
'''


def test_a_new_field_reaches_the_cli_and_the_server(tmp_path):
    """Adds a field to a copy of DecodeConfig (the one edit) and runs the copy in a fresh process."""
    copy = tmp_path / "asarm"
    shutil.copytree(ROOT / "src" / "asarm", copy, ignore=shutil.ignore_patterns("shipped", "__pycache__"))
    config = copy / "sampling" / "config.py"
    text = config.read_text()
    anchor = "    suppress: tuple[int, ...] = option("
    assert anchor in text
    config.write_text(text.replace(anchor, NEW_FIELD + anchor))
    proc = subprocess.run([sys.executable, "-c", CHECK_NEW_FIELD, CORPUS], capture_output=True, text=True,
                          env={"PYTHONPATH": f"{tmp_path}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "--spice" in out["help"] and "a throw-away option" in " ".join(out["help"].split())
    assert out["good"] == 200 and out["seen"] == [3]
    assert out["bad"] == 400 and out["param"] == "spice"
