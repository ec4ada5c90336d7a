"""Weight-only int8 models: the quantized weights, checkpoints, bad input, and exact sampling of
the quantized model's own joint (reference: `transformers` with the dequantized weights)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from asarm import quantize as quant
from asarm.checkpoint import load_model, save_model
from asarm.errors import InputError
from asarm.model import ASARM
from asarm.sampling import sample
from conftest import hf_reference, random_rows, tiny_model
from exact import exact_joint, g_test, stable_seed

IDS = torch.tensor([[1, 3, 0, 7, 4, 0, 2, 5]])
RANKS = torch.tensor([[0, 0, 2, 0, 0, 1, 0, 3]])
# Float rounding between our int8 path (int8 * scale applied after the product) and
# transformers with the dequantized fp32 weights: logits agree to this (fp32 activations).
FP32_TOLERANCE = 1e-4


def quantized(seed=0, **overrides) -> ASARM:
    return quant.quantize_model(tiny_model(seed, **overrides), "int8")


def float_twin(model: ASARM) -> ASARM:
    """A float model whose weights are exactly the quantized model's dequantized weights."""
    from asarm.config import ASARMConfig
    import dataclasses

    twin = ASARM(dataclasses.replace(model.config, quantization=None)).eval()
    twin.load_state_dict(quant.dequantized_state_dict(model))
    assert isinstance(twin.config, ASARMConfig)
    return twin


def logits(model, ids=IDS, ranks=RANKS):
    with torch.no_grad():
        return model.chain_logits(ids, ranks)[0]


def test_quantize_tensor_rounds_each_row_to_half_a_step():
    w = torch.randn(40, 24) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different scale
    w[3] = 0.0
    q, scale = quant.quantize_tensor(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    assert q.abs().max() <= 127 and (q[:, :].abs().amax(1)[torch.arange(40) != 3] == 127).all()
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(q[3], torch.zeros(24, dtype=torch.int8))


def test_int8_model_matches_transformers_with_dequantized_weights():
    model = quantized(seed=1)
    hf = hf_reference(float_twin(model))
    hidden = RANKS[0] > 0
    perm = (hidden[None, :] & (RANKS[0][:, None] <= RANKS[0][None, :])).float()
    pos = torch.nonzero(hidden).flatten()
    tm = torch.zeros(len(pos), RANKS.shape[1])
    tm[torch.arange(len(pos)), pos] = 1
    with torch.no_grad():
        ref = hf(IDS, perm_mask=perm[None], target_mapping=tm[None]).logits[0]
    ours = logits(model)[0]
    assert (ours - ref).abs().max() < FP32_TOLERANCE
    # ...and it is a different model from the float one it came from (the test can fail)
    assert (logits(tiny_model(1))[0] - ours).abs().max() > 10 * FP32_TOLERANCE


def test_bf16_activations_close_to_fp32(model):
    q32 = quant.quantize_model(copy.deepcopy(model), "int8")
    q16 = copy.deepcopy(q32).to(torch.bfloat16)
    assert q16.dtype == torch.bfloat16
    assert q16.transformer.layer[0].ff.layer_1.scale.dtype == torch.float32  # scales stay fp32
    # bf16 activations: the distributions stay close (as for float models in test_model.py; the
    # tiny model's large init amplifies bf16 rounding in the logits themselves)
    p16, p32 = torch.softmax(logits(q16).float(), -1), torch.softmax(logits(q32), -1)
    assert (p16 - p32).abs().max() < 0.05


@pytest.mark.parametrize("rows", [1, 2, 3, 9])
def test_fused_and_dequantized_kernels_agree(rows):
    """Rows <= FUSED_MAX_ROWS take torch's fused int8 kernel, more rows dequantize: same numbers."""
    torch.manual_seed(rows)
    layer = quant.Int8Weight.from_float(torch.randn(48, 32), torch.randn(48))
    x = torch.randn(rows, 32).bfloat16()
    expected = (x.float() @ layer.dequantize().T + layer.bias).bfloat16()
    assert torch.allclose(layer(x).float(), expected.float(), atol=0.05, rtol=0.02)


def test_save_load_round_trip(tmp_path):
    model = quantized(seed=2)
    save_model(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["asarm_quantization"] == "int8"
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert stored["transformer.layer.0.rel_attn.q.int8"].dtype == torch.int8
    assert stored["transformer.layer.0.ff.layer_1.scale"].dtype == torch.float32
    assert "lm_loss.int8" not in stored  # tied to the embedding, stored once
    loaded = load_model(tmp_path / "q", device="cpu", dtype="fp32", fast_path=False)
    assert quant.is_quantized(loaded)
    assert torch.equal(logits(loaded), logits(model))
    # the fast pass multiplies by the dequantized weights: the same function to float rounding
    assert (logits(loaded.use_fast_path()) - logits(model)).abs().max() <= FP32_TOLERANCE
    assert load_model(tmp_path / "q", device="cpu").dtype == torch.bfloat16  # int8 default on CPU


def test_load_with_quantize_equals_quantizing(tmp_path, model):
    save_model(model, tmp_path / "f")
    loaded = load_model(tmp_path / "f", device="cpu", dtype="fp32", quantize="int8", fast_path=False)
    assert torch.equal(logits(loaded), logits(quant.quantize_model(copy.deepcopy(model), "int8")))
    assert quant.bytes_per_pass(loaded) < quant.bytes_per_pass(model) / 2


def test_bad_quantize_values(tmp_path, model):
    save_model(model, tmp_path / "f")
    for bad in ("int4", "INT8", 8, True):
        with pytest.raises(InputError, match="unknown quantize value"):
            load_model(tmp_path / "f", device="cpu", quantize=bad)
    q = quant.quantize_model(copy.deepcopy(model), "int8")
    save_model(q, tmp_path / "q")
    with pytest.raises(InputError, match="already quantized"):
        load_model(tmp_path / "q", device="cpu", quantize="int8")
    with pytest.raises(InputError, match="already quantized"):
        quant.quantize_model(q, "int8")


def test_int8_config_without_int8_weights_is_refused(tmp_path, model):
    from asarm.errors import CheckpointError

    save_model(model, tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    cfg["asarm_quantization"] = "int8"
    (tmp_path / "f" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing key"):
        load_model(tmp_path / "f", device="cpu")
    cfg["asarm_quantization"] = "int3"
    (tmp_path / "f" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="asarm_quantization 'int3' is not supported"):
        load_model(tmp_path / "f", device="cpu")


def test_quantize_cli(tmp_path, model, capsys):
    import argparse

    save_model(model, tmp_path / "f")
    parser = argparse.ArgumentParser()
    from asarm.cli import add_quantize_parser as add_quantize_cli

    add_quantize_cli(parser.add_subparsers())
    args = parser.parse_args(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--to", "int8"])
    assert args.func(args) == 0
    assert "int8" in capsys.readouterr().out
    assert json.loads((tmp_path / "q" / "config.json").read_text())["asarm_quantization"] == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--to", "int4"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_sampling_keeps_the_invariants_and_is_reproducible(model, dtype):
    q = quant.quantize_model(copy.deepcopy(model), "int8").to(dtype)
    ids, masked = random_rows(4, 20, 8, seed=3)
    for options in (dict(), dict(method="sequential"), dict(draft="ngram"), dict(cache=False)):
        res = sample(q, ids, masked, seed=0, **options)
        assert torch.equal(res.input_ids[~masked], ids[~masked])
        assert (res.input_ids != 6).all()
        assert torch.equal(res.input_ids, sample(q, ids, masked, seed=0, **options).input_ids)


# --- exactness: ASSD draws the quantized model's joint ------------------------------------------
INPUT = torch.tensor([1, 3, 0, 0, 4, 0, 2])
MASKED = torch.tensor([0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
N_SAMPLES = 3000
ALPHA = 1e-3


@pytest.mark.parametrize("method,draft,k", [("assd", "self", 3), ("assd", "ngram", 2), ("sequential", "self", 1)])
def test_assd_on_int8_model_draws_its_exact_joint(method, draft, k):
    """Reference: the chain joint enumerated from `transformers` XLNet loaded with the
    dequantized weights (fp32 activations; logits agree to FP32_TOLERANCE)."""
    model = quantized(seed=3)
    joint = exact_joint(float_twin(model), INPUT, MASKED, torch.nonzero(MASKED).flatten().tolist())
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), method=method, draft=draft,
                    k=k, seed=stable_seed("int8", method, draft, k))
    hidden = torch.nonzero(MASKED).flatten()
    _, p = g_test([tuple(r[hidden].tolist()) for r in result.input_ids], joint)
    assert p > ALPHA, f"int8 {method}/{draft}/k={k}: G-test p={p:.2e}"


def test_int8_negative_control_float_joint_is_rejected():
    """The test has power: samples of the int8 model tested against the *float* model's joint
    (before quantization; planted outliers make the two differ) must fail."""
    original = tiny_model(3)
    with torch.no_grad():  # one outlier per weight row: the other entries round coarsely
        for p in original.parameters():
            if p.dim() >= 2:
                p.flatten(1)[:, 0] = 40.0
    model = quant.quantize_model(copy.deepcopy(original), "int8")
    float_joint = exact_joint(original, INPUT, MASKED, torch.nonzero(MASKED).flatten().tolist())
    result = sample(model, INPUT.repeat(N_SAMPLES, 1), MASKED.repeat(N_SAMPLES, 1), k=3, seed=0)
    hidden = torch.nonzero(MASKED).flatten()
    _, p = g_test([tuple(r[hidden].tolist()) for r in result.input_ids], float_joint)
    assert p < 1e-6, f"int8 samples were not told apart from the float joint (p={p:.2e})"
