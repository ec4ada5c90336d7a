"""Our network against `transformers`' XLNetLMHeadModel, the independent numerical reference."""

from __future__ import annotations

import pytest
import torch

from asarm.config import ASARMConfig
from asarm.errors import CheckpointError
from asarm.model import ASARM
from conftest import hf_reference

CONFIGS = [
    dict(vocab_size=11, d_model=16, n_layer=2, n_head=2, d_inner=32),
    dict(vocab_size=30, d_model=24, n_layer=3, n_head=3, d_inner=40, ff_activation="relu"),
    dict(vocab_size=17, d_model=32, n_layer=1, n_head=4, d_inner=16, ff_activation="gelu_new", clamp_len=3),
]


def make(cfg, seed):
    torch.manual_seed(seed)
    return ASARM(ASARMConfig(dropout=0.0, initializer_range=0.3, mask_token_id=6, **cfg)).eval()


def structure(kind, L, g):
    ranks = torch.zeros(L, dtype=torch.long)
    if kind == "random":
        hidden = torch.randperm(L, generator=g)[: int(torch.randint(1, L, (1,), generator=g))]
        ranks[hidden] = torch.randperm(len(hidden), generator=g) + 1
    elif kind == "fully-hidden":
        ranks[:] = torch.randperm(L, generator=g) + 1
    elif kind == "prefix-only":  # visible prefix, hidden suffix left to right
        cut = L // 3
        ranks[cut:] = torch.arange(1, L - cut + 1)
    return ranks


def reference_logits(hf, ids, ranks):
    hidden = ranks > 0
    perm = (hidden[None, :] & (ranks[:, None] <= ranks[None, :])).float()
    pos = torch.nonzero(hidden).flatten()
    tm = torch.zeros(len(pos), len(ranks))
    tm[torch.arange(len(pos)), pos] = 1
    return hf(ids[None], perm_mask=perm[None], target_mapping=tm[None]).logits[0], pos


@pytest.mark.parametrize("kind", ["random", "fully-hidden", "prefix-only"])
@pytest.mark.parametrize("cfg_index", range(len(CONFIGS)))
def test_logits_match_transformers(cfg_index, kind):
    model = make(CONFIGS[cfg_index], seed=cfg_index)
    hf = hf_reference(model)
    g = torch.Generator().manual_seed(cfg_index)
    for trial in range(4):
        L = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(0, model.config.vocab_size, (L,), generator=g)
        ranks = structure(kind, L, g)
        with torch.no_grad():
            ours, qpos, valid = model.chain_logits(ids[None], ranks[None])
            ref, pos = reference_logits(hf, ids, ranks)
        assert torch.equal(qpos[0][valid[0]], pos)
        ours = ours[0][valid[0]]
        if kind == "fully-hidden":
            # The rank-1 query sees no key: we define its attention output as zero, where
            # `transformers` averages over every (invisible) position. All other factors match.
            first = int((ranks[pos] == 1).nonzero())
            keep = torch.arange(len(pos)) != first
            ours, ref = ours[keep], ref[keep]
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()


def test_query_with_no_key_ignores_every_token():
    model = make(CONFIGS[0], seed=5)
    L = 6
    ranks = torch.arange(1, L + 1)[None]
    a, _, _ = model.chain_logits(torch.randint(0, 11, (1, L)), ranks)
    b, _, _ = model.chain_logits(torch.randint(0, 11, (1, L)), ranks)
    assert torch.equal(a[0, 0], b[0, 0])  # position 0 has rank 1: depends on nothing
    assert not torch.allclose(a[0, 1], b[0, 1])


def test_batched_rows_with_padding_match_single_rows():
    model = make(CONFIGS[1], seed=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (3, 10), generator=g)
    ranks = torch.stack([structure("random", 10, g) for _ in range(3)])
    ranks[2, 7:] = -1  # padding
    batch, qpos, valid = model.chain_logits(ids, ranks)
    for b in range(3):
        n = 7 if b == 2 else 10
        single, _, v = model.chain_logits(ids[b : b + 1, :n], ranks[b : b + 1, :n])
        assert torch.allclose(batch[b][valid[b]], single[0][v[0]], atol=1e-5)


def test_bf16_runs_and_is_close_to_fp32():
    model = make(CONFIGS[1], seed=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (2, 12), generator=g)
    ranks = torch.stack([structure("random", 12, g) for _ in range(2)])
    ref, _, valid = model.chain_logits(ids, ranks)
    low, _, _ = model.to(torch.bfloat16).chain_logits(ids, ranks)
    assert low.dtype == torch.bfloat16
    p_ref = torch.softmax(ref[valid], -1)
    p_low = torch.softmax(low[valid].float(), -1)
    assert (p_ref - p_low).abs().max() < 0.05


def test_gradients_flow_for_training():
    model = make(CONFIGS[0], seed=4).train()
    ids = torch.randint(0, 11, (2, 8))
    ranks = torch.stack([structure("random", 8, torch.Generator().manual_seed(i)) for i in range(2)])
    logits, qpos, valid = model.chain_logits(ids, ranks)
    loss = torch.nn.functional.cross_entropy(logits[valid], ids.gather(1, qpos)[valid])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"model_type": "xlnet", "d_model": 10, "n_head": 3}, "multiple of n_head"),
        ({"model_type": "xlnet", "attn_type": "uni"}, "attn_type"),
        ({"model_type": "xlnet", "ff_activation": "mystery"}, "ff_activation"),
    ],
)
def test_config_errors(data, message):
    with pytest.raises(CheckpointError, match=message):
        ASARMConfig.from_dict(data)


def test_config_round_trip_keeps_unknown_keys():
    cfg = ASARMConfig.from_dict({"model_type": "xlnet", "vocab_size": 50, "d_model": 8, "n_head": 2,
                                 "n_layer": 1, "d_inner": 8, "summary_type": "last", "task_specific_params": {"a": 1}})
    again = ASARMConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.extra["summary_type"] == "last"


# --- fp16 (issue 15: the -1e30 mask fill used to overflow half) -----------------------------------
def test_fp16_runs_and_is_close_to_fp32():
    model = make(CONFIGS[1], seed=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (2, 12), generator=g)
    ranks = torch.stack([structure("fully-hidden", 12, g), structure("random", 12, g)])
    ref, _, valid = model.chain_logits(ids, ranks)
    half, _, _ = model.to(torch.float16).chain_logits(ids, ranks)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()  # incl. the query that sees no key
    p_ref = torch.softmax(ref[valid], -1)
    p_half = torch.softmax(half[valid].float(), -1)
    assert (p_ref - p_half).abs().max() < 0.01


@pytest.mark.parametrize("options", [dict(method="sequential"), dict(), dict(draft="ngram"), dict(cache=False)])
def test_fp16_sampling_keeps_the_invariants(options):
    """Like the bf16 tests: visible tokens kept, no mask token, within one pass per token, same
    seed same result."""
    from asarm.sampling import sample
    from conftest import random_rows, tiny_model

    half = tiny_model(seed=1).to(torch.float16)
    ids, masked = random_rows(4, 16, 8, seed=5)
    res = sample(half, ids, masked, seed=0, **options)
    assert torch.equal(res.input_ids[~masked], ids[~masked])
    assert (res.input_ids != half.config.mask_token_id).all() and (res.input_ids < 8).all()
    assert (res.nfe <= masked.sum(1)).all()
    assert torch.equal(res.input_ids, sample(half, ids, masked, seed=0, **options).input_ids)


def test_masked_score_fits_every_dtype():
    from asarm.model import MASKED_SCORE, masked_score

    assert masked_score(torch.float32) == MASKED_SCORE == masked_score(torch.bfloat16)
    assert torch.isfinite(torch.tensor(masked_score(torch.float16), dtype=torch.float16))


# --- weight layout for inference: strides only, never values --------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_layout_changes_strides_not_results(dtype):
    model = make(CONFIGS[1], seed=6).to(dtype)
    ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    ranks = torch.stack([structure("random", 9, torch.Generator().manual_seed(i)) for i in range(2)])
    w1 = model.transformer.layer[0].ff.layer_1.weight
    q = model.transformer.layer[0].rel_attn.q
    if dtype == torch.float32:  # fp32: [in, out] storage (x @ W.T reads rows of W.T)
        assert w1.stride() == (1, w1.shape[0]) and q.is_contiguous()
    else:  # bf16: plain layout (no measured gain from another)
        assert w1.is_contiguous() and q.is_contiguous()
    assert model.lm_loss.weight is model.transformer.word_embedding.weight  # still tied
    fast = model.chain_logits(ids, ranks)[0]
    model.fast_layout = False
    model.eval()
    assert w1.is_contiguous() and q.is_contiguous()
    plain = model.chain_logits(ids, ranks)[0]
    assert torch.allclose(fast.float(), plain.float(), atol=1e-5 if dtype == torch.float32 else 0.05)
    model.fast_layout = True
    model.train()  # training always uses plain contiguous tensors
    assert all(p.is_contiguous() for p in model.parameters())


def test_plain_attention_equals_sdpa_with_fully_masked_rows():
    """The written-out attention CUDA training uses (the fused kernel's backward gives NaN
    gradients for rows with every key masked) computes what SDPA does, with finite gradients."""
    import torch.nn.functional as F

    from asarm.model import MASKED_SCORE, plain_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, requires_grad=True) for n in (5, 7, 7))
    mask = torch.randn(2, 3, 5, 7, generator=g)
    mask[0, :, 1] = MASKED_SCORE  # a row that sees no key
    mask[1, :, :, 2] = MASKED_SCORE  # a key nobody sees
    ours = plain_attention(q, k, v, mask, 0.0, 0.35)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.35)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    ours.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    # dropout zeroes probabilities (and rescales the rest) only when asked
    torch.manual_seed(0)
    dropped = plain_attention(q, k, v, mask, 0.5, 0.35)
    assert not torch.allclose(dropped, ours)
