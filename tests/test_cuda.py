"""The same guarantees on a CUDA GPU: logits, cache, reproducibility, exactness, bf16.

These run only where CUDA is available (CI is CPU-only; run them on a GPU machine with
`python -m pytest -q tests/test_cuda.py`, see scripts/gpu_checks.sh). Everything else in the
suite runs on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from asarm.sampling import sample
from asarm.scoring import score
from conftest import random_rows, tiny_model
from exact import exact_joint, g_test
from test_exactness import ALPHA, HIDDEN, INPUT, MASKED, N_SAMPLES, draws

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 40


@pytest.fixture(scope="module")
def cpu_model():
    return tiny_model(seed=1, vocab_size=VOCAB, d_model=32, n_layer=3, n_head=4, d_inner=64, initializer_range=0.3)


@pytest.fixture(scope="module")
def gpu_model(cpu_model):
    return copy.deepcopy(cpu_model).to("cuda")


def test_chain_logits_match_the_cpu(cpu_model, gpu_model):
    ids, masked = random_rows(4, 24, VOCAB, seed=0)
    ranks = torch.zeros_like(ids)
    for b in range(len(ids)):
        hidden = torch.nonzero(masked[b]).flatten()
        ranks[b, hidden] = torch.randperm(len(hidden)) + 1
    on_cpu = cpu_model.chain_logits(ids, ranks)[0]
    on_gpu = gpu_model.chain_logits(ids.cuda(), ranks.cuda())[0]
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [dict(), dict(draft="ngram"), dict(one_pass=True, adaptive_k=True)])
def test_greedy_assd_equals_greedy_sequential_with_and_without_cache(gpu_model, options):
    ids, masked = random_rows(8, 24, VOCAB, seed=5)
    ids, masked = ids.cuda(), masked.cuda()
    reference = sample(gpu_model, ids, masked, method="sequential", greedy=True, seed=0)
    for cache in (True, False):
        res = sample(gpu_model, ids, masked, greedy=True, seed=0, cache=cache, **options)
        assert torch.equal(res.input_ids, reference.input_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_seed_same_result_and_invariants(gpu_model, dtype):
    model = copy.deepcopy(gpu_model).to(dtype)
    ids, masked = random_rows(6, 32, VOCAB, seed=2)
    ids, masked = ids.cuda(), masked.cuda()
    a = sample(model, ids, masked, seed=7)
    b = sample(model, ids, masked, seed=7)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.device.type == "cuda"
    assert torch.equal(a.input_ids[~masked], ids[~masked])
    assert (a.input_ids != model.config.mask_token_id).all()
    assert (a.nfe.cpu() <= masked.sum(1).cpu()).all()
    assert torch.isfinite(score(model, ids, masked).log_prob).all()


def test_assd_on_the_gpu_draws_the_exact_joint():
    """The CPU reference joint (transformers' XLNet) against rows sampled on the GPU."""
    small = tiny_model(seed=3)
    joint = exact_joint(small, INPUT, MASKED, HIDDEN)
    res = sample(small.to("cuda"), INPUT.repeat(N_SAMPLES, 1).cuda(), MASKED.repeat(N_SAMPLES, 1).cuda(), k=3, seed=0)
    res.input_ids = res.input_ids.cpu()
    _, p = g_test(draws(res, MASKED), joint)
    assert p > ALPHA
