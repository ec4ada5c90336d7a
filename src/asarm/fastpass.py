"""The fast inference pass: the same function as ``ASARM.forward_rows``, in fewer, faster ops.

A cached ASSD pass carries 1-16 rows. On a CPU such a pass is bound by reading the weights, so a
pass with 11 rows should cost what a pass with 1 row costs; eager PyTorch misses that twice
(docs/performance.md, "The fast pass"):

- fp32 GEMMs at 6-16 rows run at a fraction of their 1-row weight bandwidth, and eager bf16
  (``F.linear``) reads weights at about half the speed of a plain copy;
- about 40% of an eager pass is op dispatch: ~150 small ops per layer (gathers and scatters
  around every matmul for padding rows, three projections instead of one, masks rebuilt per layer).

``FastPass`` keeps the model's numbers and changes how they are computed:

1. **Prepacked weights.** Each matrix is stored once in the layout its kernel reads fastest: for
   bf16 on a CPU with native bf16 support, oneDNN's blocked layout (``torch.ops.mkldnn`` — what
   inductor's ``freezing`` lowers a linear to; flat from 1 to 32 rows and near the copy bandwidth,
   with no compilation at all); for fp32, a plain [in, out] matrix through ``addmm``. The choice
   is per dtype, fixed in code, from ``asarm bench --suite pass``.
2. **Fused work.** q, k and v are one matrix (content and query rows go through it together: a
   row costs nearly nothing once the weights are read); gelu and the residual add run as oneDNN
   post-ops of their matmul.
3. **Packed rows for a whole layer.** Padding rows (a batch whose rows are in different ASSD
   phases) are dropped once per pass, not around each matmul; the attention mask, relative index
   and "has a key" column are built once per pass, not per layer.

Everything else — the rank structure, the exact cache, the relative-position table — is the
model's own (``cache.ContentCache``, ``ASARM.relative_table``). The weights are read from the
model when the pass is built: ``ASARM`` rebuilds it whenever its parameters change
(``load_state_dict``, ``.to``) and drops it in training mode (see ``ASARM.use_fast_path``).
Logits equal eager's to float rounding (tests/test_fastpass.py: 1e-4 in fp32).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


from .devices import native_bf16_cpu
from .ranks import pass_geometry

# Activations oneDNN applies as a post-op of the matmul: our name -> (attr, algorithm).
_ONEDNN_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "relu": ("relu", "")}


def onednn_bf16_available() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX-512 BF16 / AMX), so bf16 packed weights
    are fast. Elsewhere bf16 would be emulated: the fast pass then uses ``addmm``."""
    return native_bf16_cpu()


def choose_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The matmul kernel of the fast pass for a device and dtype, fixed in code (never calibrated
    at run time, so the same seed keeps giving the same tokens): "onednn" (prepacked) for bf16 on
    a CPU with native bf16, "addmm" (plain [in, out] weights) otherwise. fp32 prepacked through
    oneDNN measured no faster than ``addmm`` at 1-16 rows (results/bench-cpu-pass)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and onednn_bf16_available():
        return "onednn"
    return "addmm"


class PackedLinear:
    """y = activation(x @ W.T + b) (+ residual), W given [out, in], stored for ``kernel``.

    ``activation``: None, or (config name, function); oneDNN applies the ones it knows as a
    post-op of the matmul, anything else runs after it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str, activation=None):
        self.kernel = kernel
        self.bias = None if bias is None else bias.detach().contiguous()
        weight = weight.detach()
        name, self.post_activation = activation if activation is not None else (None, None)
        if kernel == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
            self.attr, self.algorithm = _ONEDNN_ACTIVATIONS.get(name, ("none", ""))
            if name in _ONEDNN_ACTIVATIONS:
                self.post_activation = None
        else:
            self.weight = weight.T.contiguous()  # [in, out]: fp32 multiplies fastest by it on CPUs

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel == "onednn":
            if residual is not None and self.post_activation is None and self.attr == "none":
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)
        elif self.bias is not None:
            y = torch.addmm(self.bias, x, self.weight)
        else:
            y = x @ self.weight
        if self.post_activation is not None:
            y = self.post_activation(y)
        return y if residual is None else y + residual


def _weight(module_or_param, dtype: torch.dtype, out_in: bool = True) -> torch.Tensor:
    """A weight as a float [out, in] matrix: int8 modules are dequantized (the float weights an
    int8 model multiplies by, see ``quantize.py``)."""
    if isinstance(module_or_param, nn.Module) and hasattr(module_or_param, "dequantize"):
        return module_or_param.dequantize().to(dtype)
    if isinstance(module_or_param, (nn.Linear, nn.Embedding)):
        return module_or_param.weight.detach().to(dtype)
    flat = module_or_param.detach().flatten(1).to(dtype)
    return flat if out_in else flat.T


class FastLayer:
    def __init__(self, layer, kernel: str, dtype: torch.dtype, activation_name: str):
        attn, ff = layer.rel_attn, layer.ff
        # q, k, v are stored [d_model(in), n, dh(out)]; o is [d_model(out), n, dh(in)].
        qkv = torch.cat([_weight(getattr(attn, name), dtype, out_in=False) for name in ("q", "k", "v")])
        self.qkv = PackedLinear(qkv, None, kernel, None)
        self.o = PackedLinear(_weight(attn.o, dtype), None, kernel, None)
        self.ff_in = PackedLinear(_weight(ff.layer_1, dtype), ff.layer_1.bias.to(dtype), kernel,
                                  (activation_name, ff.activation))
        self.ff_out = PackedLinear(_weight(ff.layer_2, dtype), ff.layer_2.bias.to(dtype), kernel, None)
        self.attn_norm = (attn.layer_norm.weight.detach(), attn.layer_norm.bias.detach(), attn.layer_norm.eps)
        self.ff_norm = (ff.layer_norm.weight.detach(), ff.layer_norm.bias.detach(), ff.layer_norm.eps)
        self.r_w_bias = attn.r_w_bias.detach()[:, None]  # [n, 1, dh]: broadcast over rows
        self.r_r_bias = attn.r_r_bias.detach()[:, None]


class FastPass:
    """``forward_rows`` of an eval-mode ``ASARM`` with prepacked weights (module docstring)."""

    def __init__(self, model, masked_value: float):
        cfg = model.config
        self.masked_value = masked_value  # the model's additive score for keys a row may not see
        self.model, self.config = model, cfg
        self.dtype, self.device = model.dtype, model.device
        self.kernel = choose_kernel(self.device, self.dtype)
        with torch.no_grad():
            self.layers = [FastLayer(layer, self.kernel, self.dtype, cfg.ff_activation) for layer in model.transformer.layer]
            self.head = PackedLinear(_weight(model.transformer.word_embedding, self.dtype),
                                     model.lm_loss.bias.detach(), self.kernel, None)
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.scale = 1 / math.sqrt(cfg.d_head)

    def describe(self) -> str:
        return f"fast pass ({self.kernel}, {str(self.dtype).removeprefix('torch.')})"

    @torch.no_grad()
    def forward_rows(self, content_ids, content_pos, content_rank, query_pos, query_rank, cache=None, rel_table=None,
                     return_hidden=False, branches=None):
        """Same arguments and result as ``ASARM.forward_rows`` (see there)."""
        model, n, dh = self.model, self.n_head, self.d_head
        geo = pass_geometry(content_ids, content_pos, content_rank, query_pos, query_rank, cache, rel_table,
                            model.relative_table, branches)
        B, N = geo.content_ids.shape
        Q = query_pos.shape[1]
        T = N + Q
        K = geo.allowed.shape[-1]
        # Built once per pass, shared by every layer: the additive mask and each (row, key)
        # pair's relative-distance column, broadcast over heads.
        additive_mask = torch.zeros(geo.allowed.shape, dtype=self.dtype, device=geo.allowed.device)
        additive_mask.masked_fill_(~geo.allowed, self.masked_value)
        additive_mask = additive_mask[:, None]  # [B, 1, T, K]
        rel_index = geo.rel_index[:, None].expand(B, n, T, K)

        rows = _Rows(geo.real_rows, N)
        has_key = geo.allowed.any(-1)
        # Rows that see no key at all (the first query when nothing is visible) get a zero
        # attention output (see model.py); most passes have none, and skip the multiply.
        keyless = None if bool(has_key.all()) else rows.pack(has_key.reshape(B * T, 1).to(self.dtype))
        x = torch.cat([model.transformer.word_embedding(geo.content_ids).to(self.dtype),
                       model.transformer.mask_emb.expand(B, Q, -1)], dim=1)
        x = rows.pack(x.reshape(B * T, -1))  # [R, d]: real rows only, for the whole pass
        nd = n * dh
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x).split(nd, dim=1)
            k_new, v_new = rows.contents(k, B).view(B, N, n, dh), rows.contents(v, B).view(B, N, n, dh)
            if cache is None:
                keys, values = k_new, v_new
            else:
                keys, values = cache.write_layer(i, k_new, v_new)
            q = rows.unpack(q, B * T).view(B, T, n, dh).transpose(1, 2)  # [B, n, T, dh]
            # Position term as in ``RelativeAttention``: every row against the relative table,
            # then each (row, key) pair's distance picked out.
            if B == 1:  # a plain batched matmul over heads: about half the time of einsum's path
                pos_scores = torch.matmul(q[0] + layer.r_r_bias, geo.rel_table[i])[None]
            else:
                pos_scores = torch.einsum("bntd,ndr->bntr", q + layer.r_r_bias, geo.rel_table[i])
            bias = torch.add(additive_mask, pos_scores.gather(-1, rel_index), alpha=self.scale)
            attn = F.scaled_dot_product_attention(q + layer.r_w_bias, keys.transpose(1, 2), values.transpose(1, 2),
                                                  attn_mask=bias, scale=self.scale)
            attn = rows.pack(attn.transpose(1, 2).reshape(B * T, nd))
            if keyless is not None:
                attn = attn * keyless
            x = F.layer_norm(layer.o(attn, residual=x), (x.shape[-1],), *layer.attn_norm)
            x = F.layer_norm(layer.ff_out(layer.ff_in(x), residual=x), (x.shape[-1],), *layer.ff_norm)
        hidden = rows.queries(x)
        logits = rows.unpack_queries(self.head(hidden), B, Q)
        return (logits, rows.unpack_queries(hidden, B, Q)) if return_hidden else logits


class _Rows:
    """The real rows of a pass ([B, T] mask, content rows first in each batch row), packed.

    With no padding (every single-row pass) packing is the identity and content / query rows
    are slices; otherwise index lists map between the packed [R, ...] and padded [B*T, ...]
    layouts."""

    def __init__(self, real: torch.Tensor, n_content: int):
        self.N, self.T = n_content, real.shape[1]
        self.all_real = bool(real.all())
        if self.all_real:
            return
        flat = real.reshape(-1)
        self.index = flat.nonzero().squeeze(1)  # packed row -> padded row
        is_content = (self.index % self.T) < self.N
        self.content_rows = is_content.nonzero().squeeze(1)
        self.query_rows = (~is_content).nonzero().squeeze(1)
        b, t = self.index // self.T, self.index % self.T
        self.content_slots = (b * self.N + t)[self.content_rows]  # in [B*N]
        self.query_slots = (b * (self.T - self.N) + t - self.N)[self.query_rows]  # in [B*Q]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return padded if self.all_real else padded.index_select(0, self.index)

    def unpack(self, packed: torch.Tensor, total: int) -> torch.Tensor:
        if self.all_real:
            return packed
        return packed.new_zeros(total, packed.shape[1]).index_copy_(0, self.index, packed)

    def contents(self, packed: torch.Tensor, B: int) -> torch.Tensor:
        """[B*N, c] content rows of a packed tensor, zeros for padding."""
        if self.all_real:
            return packed.view(B, self.T, -1)[:, : self.N]
        rows = packed.index_select(0, self.content_rows)
        return packed.new_zeros(B * self.N, packed.shape[1]).index_copy_(0, self.content_slots, rows)

    def queries(self, packed: torch.Tensor) -> torch.Tensor:
        if self.all_real:
            B = packed.shape[0] // self.T
            return packed.view(B, self.T, -1)[:, self.N :].reshape(-1, packed.shape[1])
        return packed.index_select(0, self.query_rows)

    def unpack_queries(self, logits: torch.Tensor, B: int, Q: int) -> torch.Tensor:
        if self.all_real:
            return logits.view(B, Q, -1)
        out = logits.new_zeros(B * Q, logits.shape[1])
        return out.index_copy_(0, self.query_slots, logits).view(B, Q, -1)


def build(model, masked_value: float, warn: bool = True) -> FastPass | None:
    """A ``FastPass`` for ``model``, or None (with one warning line) where it cannot be built."""
    try:
        return FastPass(model, masked_value)
    except (RuntimeError, NotImplementedError) as err:  # e.g. a torch build without oneDNN ops
        if warn:
            warnings.warn(f"asarm: fast pass unavailable ({str(err).splitlines()[0]}); using the eager pass",
                          stacklevel=3)
        return None
