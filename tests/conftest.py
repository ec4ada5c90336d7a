"""Shared fixtures: tiny random XLNet-format models, made locally (tests never touch a hub)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing, too

from asarm.config import ASARMConfig  # noqa: E402
from asarm.model import ASARM  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides) -> ASARMConfig:
    base = dict(vocab_size=8, d_model=16, n_layer=2, n_head=2, d_inner=32, dropout=0.0,
                initializer_range=0.6, mask_token_id=6, pad_token_id=5, eos_token_id=2)
    base.update(overrides)
    return ASARMConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> ASARM:
    torch.manual_seed(seed)
    return ASARM(tiny_config(**overrides)).eval()


def random_rows(B: int, L: int, vocab: int, seed: int = 0, max_hidden: float = 0.95):
    """[B, L] random token ids (never the mask id 6) and hidden masks whose hidden fraction rises
    from 0.3 in the first row to ``max_hidden`` in the last."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    ids[ids == 6] = 7
    masked = torch.rand(B, L, generator=g) < torch.linspace(0.3, max_hidden, B)[:, None]
    return ids, masked


def hf_reference(model: ASARM):
    """`transformers`' XLNetLMHeadModel with our weights: the independent numerical reference."""
    from transformers import XLNetConfig, XLNetLMHeadModel

    cfg = {k: v for k, v in model.config.to_dict().items() if k != "architectures"}
    hf = XLNetLMHeadModel(XLNetConfig(**cfg)).eval()
    hf.load_state_dict(model.state_dict())
    return hf.to(model.dtype)


# A byte-level tokenizer of 300 ids trained on a tiny corpus (prose, code, numbers and colours,
# so text and constraint tests find words, digits and indentation in it), and a tiny random
# model of its vocabulary: the text-level tests' pair (tests/test_text.py, test_constraints.py).
TINY_CORPUS = (
    "Once upon a time there was a small cat. The cat sat on the warm mat and purred.\n"
    "def add(a, b):\n    return a + b\n\n"
    "The year 1984 was cold. Colors: red, blue, green. id = foo_bar2; x = 42\n"
) * 10


@pytest.fixture(scope="module")
def tok():
    from asarm.tokenization import train_tokenizer

    return train_tokenizer([TINY_CORPUS], vocab_size=300)


@pytest.fixture(scope="module")
def model300() -> ASARM:
    return tiny_model(seed=7, vocab_size=300)


@pytest.fixture
def model() -> ASARM:
    return tiny_model()


def pytest_terminal_summary(terminalreporter):
    """The exactness suite's p-values: the smallest among the tests that must pass and each
    negative control's (which must fail), so a run shows how far it is from its thresholds."""
    try:
        from exact import P_VALUES
    except ImportError:
        return
    if not P_VALUES:
        return
    controls = [(t, p) for t, p in P_VALUES if "negative_control" in t]
    exact = [(t, p) for t, p in P_VALUES if "negative_control" not in t]
    tr = terminalreporter
    tr.section("exactness G-tests")
    if exact:
        ps = sorted(p for _, p in exact)
        t_min, p_min = min(exact, key=lambda tp: tp[1])
        tr.write_line(f"{len(exact)} G-tests of samplers against exact joints: smallest p = {p_min:.2e} "
                      f"({t_min}), median p = {ps[len(ps) // 2]:.3f}")
    for t, p in controls:
        tr.write_line(f"negative control {t}: p = {p:.2e}")
