"""Weight-only int8 quantization (per output channel), as in gpt-fast's ``quantize.py``.

Every weight matrix a pass multiplies by (attention q/k/v/o/r, both feed-forward matrices and the
tied embedding / LM head) becomes int8 values with one float32 scale per output channel:
``W ~= int8 * scale[:, None]``. Activations stay in the model's dtype (bf16 by default for an int8
model; fp32 also works and is what the exactness tests use). Biases, layer norms, the attention
biases and ``mask_emb`` stay in floating point. Because only the weights are rounded, an int8
model *is* a float model whose weights are ``dequantize()``-d: `transformers`' XLNet loaded with
those weights computes the same function up to float rounding, which is how it is tested.

A quantized checkpoint states its format in ``config.json`` (``asarm_quantization: "int8"``) and
stores, per quantized matrix ``NAME``, ``NAME.int8`` ([out, in] int8) and ``NAME.scale`` ([out]
float32), where ``NAME`` is the `transformers` parameter name without ``.weight``.

This module knows the network only by attribute names (it does not import ``model.py``), so
``model.py`` can build quantized models when it loads a checkpoint.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import QUANTIZATIONS as METHODS
from .errors import CheckpointError, InputError

# ``torch.ops.aten._weight_int8pack_mm`` (PyTorch's fused weight-only int8 matmul on CPU) reads
# the int8 weights once, but its cost grows linearly with the number of rows (it is compute
# bound: 768x3072, one thread, best of 15: 172 us at 1 row, 317 at 4, 889 at 11, 1258 at 16,
# against 900-1030 us to dequantize to bf16 and multiply; bf16 weights take 370-450 us at any of
# these row counts). Measured with scripts/profile_cached_pass.py --int8-rows; above this many
# rows the weights are dequantized per call instead.
FUSED_MAX_ROWS = 12
ATTENTION_MATRICES = ("q", "k", "v", "o", "r")


def check_method(quantize) -> str | None:
    """None (no quantization) or a supported method name; anything else is an InputError."""
    if quantize is None or quantize in METHODS:
        return quantize
    raise InputError(f"unknown quantize value {quantize!r}: use one of {', '.join(METHODS)} (or None)")


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], float32 scale [out]) with symmetric per-row scales."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # an all-zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Weight(nn.Module):
    """y = x @ (int8 * scale[:, None]).T (+ bias): a weight-only int8 linear map [in] -> [out]."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Weight":
        """From an [out, in] float weight."""
        module = cls(weight.shape[0], weight.shape[1], bias)
        module.int8, module.scale = quantize_tensor(weight)
        module.to(weight.device)
        return module

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.int8, self.scale

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] weight this module multiplies by."""
        q, scale = self.weights()
        return q.float() * scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.weights()
        rows = x.reshape(-1, x.shape[-1])
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows.shape[0] <= FUSED_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), q, scale.to(x.dtype))
        else:
            y = F.linear(rows, q.to(x.dtype)) * scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _apply(self, fn, recurse=True):
        # model.to(dtype) converts float buffers; the scales stay float32 (only devices change),
        # so a bf16 model multiplies by exactly the weights its checkpoint stores.
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.int8.device)
        return self


class Int8Embedding(Int8Weight):
    """The tied word embedding: looking up a row is dequantizing it."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.int8[ids].float() * self.scale[ids, None]


class Int8TiedHead(Int8Weight):
    """The LM head, tied to an ``Int8Embedding``: its own bias, the embedding's int8/scale (not
    stored twice in the state dict, like ``lm_loss.weight`` in XLNet checkpoints)."""

    def __init__(self, embedding: Int8Embedding, bias: torch.Tensor):
        nn.Module.__init__(self)
        self._embedding = [embedding]  # a list: not a submodule, so not saved twice
        self.bias = nn.Parameter(bias.detach().clone())

    def weights(self):
        return self._embedding[0].weights()

    def _apply(self, fn, recurse=True):
        return nn.Module._apply(self, fn, recurse)


def _attention_weight(attn, name: str) -> torch.Tensor:
    """q/k/v/r are stored [d_model(in), n, dh(out)]; o is [d_model(out), n, dh(in)]: as [out, in]."""
    w = getattr(attn, name).detach().flatten(1)
    return w if name == "o" else w.T


@torch.no_grad()
def quantize_model(model, method: str = "int8", empty: bool = False):
    """Replace ``model``'s weight matrices by int8 ones in place; returns the model.

    ``empty=True`` builds the quantized structure only (zeros), for loading a quantized checkpoint.
    """
    if check_method(method) is None:
        return model
    if getattr(model.config, "quantization", None) is not None and not empty:
        raise InputError(f"the model is already quantized ({model.config.quantization}); "
                         "quantize the float checkpoint it came from instead")

    def make(weight, bias=None, cls=Int8Weight):
        if empty:
            module = cls(weight.shape[0], weight.shape[1], bias)
            return module.to(weight.device)
        return cls.from_float(weight, bias)

    for layer in model.transformer.layer:
        attn = layer.rel_attn
        for name in ATTENTION_MATRICES:
            module = make(_attention_weight(attn, name))
            delattr(attn, name)
            setattr(attn, name, module)
        for name in ("layer_1", "layer_2"):
            linear = getattr(layer.ff, name)
            setattr(layer.ff, name, make(linear.weight, linear.bias))
    embedding = make(model.transformer.word_embedding.weight, cls=Int8Embedding)
    model.transformer.word_embedding = embedding
    model.lm_loss = Int8TiedHead(embedding, model.lm_loss.bias)
    model.config = dataclasses.replace(model.config, quantization=method)
    return model


def is_quantized(model) -> bool:
    return getattr(model.config, "quantization", None) is not None


@torch.no_grad()
def dequantized_state_dict(model) -> dict[str, torch.Tensor]:
    """A float32 state dict in `transformers`' XLNet names and shapes with the weights the
    quantized model multiplies by (the independent reference of the exactness tests)."""
    state = {k: v.float() for k, v in model.state_dict().items() if v.is_floating_point()}
    for name, module in model.named_modules():
        if isinstance(module, Int8TiedHead) or not isinstance(module, Int8Weight):
            continue
        for key in (f"{name}.int8", f"{name}.scale"):
            state.pop(key, None)
        w = module.dequantize()  # [out, in]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ATTENTION_MATRICES:
            n, dh = model.config.n_head, model.config.d_head
            state[name] = (w if leaf == "o" else w.T).reshape(-1, n, dh).contiguous()
        else:
            state[f"{name}.weight"] = w
    state["lm_loss.weight"] = state["transformer.word_embedding.weight"]
    return state


def bytes_per_pass(model) -> int:
    """Bytes of weights a cached pass reads: every matrix and vector of every layer, and the LM
    head (the embedding is tied to it; a pass looks up only a few of its rows). Not counted: the
    relative-position matrices ``r``, used once per run to build the position table."""
    skip_suffixes = (".r", ".r.int8", ".r.scale", "seg_embed", "r_s_bias")
    total = 0
    for name, tensor in model.state_dict().items():
        if name == "lm_loss.weight" or name.endswith(skip_suffixes):
            continue
        total += tensor.numel() * tensor.element_size()
    return total


def check_loadable(config, found_keys) -> None:
    """A checkpoint whose config says int8 must store int8 tensors, and the other way round."""
    has_int8 = any(k.endswith(".int8") for k in found_keys)
    if has_int8 and getattr(config, "quantization", None) is None:
        raise CheckpointError("the weight file stores int8 tensors but config.json has no "
                              "asarm_quantization field")


# --- measuring against the memory floor (used by scripts/bench_quantized.py and `asarm bench`) ---
def copy_bandwidth(nbytes: int = 2**30, repeats: int = 3) -> float:
    """Bytes per second of a plain copy of a buffer far larger than the CPU caches (each byte
    read once and written once, counted once), best of ``repeats``."""
    import time

    a = torch.ones(nbytes // 4)
    b = torch.zeros_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def floor_columns(model, seconds_per_pass: float, bandwidth: float) -> dict:
    """Per configuration: bytes of weights read per pass, the floor (bytes / bandwidth) and the
    pass time as a multiple of it."""
    nbytes = bytes_per_pass(model)
    floor = nbytes / bandwidth
    return dict(weight_bytes_per_pass=nbytes, copy_bandwidth=bandwidth, floor_s=floor,
                floor_multiple=seconds_per_pass / floor)


# `asarm quantize MODEL OUT --to int8` is defined in cli.py (its parser imports no torch: fast --help).
