"""The AS-ARM network: a two-stream transformer with XLNet's relative attention.

Parameter names and maths follow `transformers`' ``XLNetLMHeadModel`` (attn_type "bi", no memory,
no bi_data, one segment), so published XLNet/AS-ARM checkpoints load without conversion. What
differs is the interface: callers describe a pass by *rows* rather than by dense L x L masks.

A pass has two kinds of rows, processed by the same layers in one batch:
- content rows (the content stream h): a token at a position, with a rank. Each produces keys
  and values at every layer; it sees every key of rank <= its own.
- query rows (the query stream g): a position with a rank and no token. It sees every key of
  rank < its own; its final state gives the logits p(x_pos | keys it sees).
Visible tokens have rank 0; hidden positions get ranks 1..m in decoding order (docs/design.md, "Rank structure").
A key is visible to a row iff ``key_rank < row_limit``, with limit = rank + 1 for content rows
and limit = rank for query rows, so one comparison builds every mask.

Keys can come from this pass alone (full recompute, training) or from a ``ContentCache`` that
holds the keys and values of earlier passes (see ``cache.py``): both give the same numbers.

One deliberate difference from `transformers`: a query row that may see no key at all (the first
hidden token when nothing is visible) gets a zero attention output. `transformers` would average
over *every* position instead, which makes p(x_first) depend on tokens that are supposed to be
invisible and breaks exact chain sampling.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import draft_head, fastpass, storage
from . import quantize as quant
from .config import ASARMConfig
from .errors import CheckpointError, InputError
from .ranks import NO_KEY, key_ranks, pass_geometry  # NO_KEY: the one "no key / padding" sentinel (ranks.py)

# Additive attention bias for keys a row may not see; finite so fully masked rows stay finite.
MASKED_SCORE = -1e30


def masked_score(dtype: torch.dtype) -> float:
    """MASKED_SCORE where the dtype holds it; fp16 (max 65504) gets -max/2, which still leaves
    room for the scores it is added to without overflowing to -inf."""
    big = torch.finfo(dtype).max
    return MASKED_SCORE if big > 1e32 else -big / 2


def on_rows(fn, rows: torch.Tensor | None, *xs: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to the rows of ``xs`` ([B, T, ...] each) that ``rows`` [B, T] marks, zeros
    in the other rows; to all of them when ``rows`` is None. A batch whose rows are in different
    phases of ASSD is padded to the longest row: this keeps the padding out of the matmuls."""
    if rows is None:
        return fn(*xs)
    y = fn(*(x[rows] for x in xs))
    out = y.new_zeros(rows.shape + y.shape[1:])
    out[rows] = y
    return out


def plain_attention(q, k, v, attn_mask, dropout_p: float, scale: float) -> torch.Tensor:
    """What ``F.scaled_dot_product_attention`` computes, written out with the softmax in fp32:
    [B, n, T, dh] queries, [B, n, K, dh] keys and values, an additive [B, n, T, K] mask."""
    scores = (q @ k.transpose(-1, -2)).float() * scale + attn_mask.float()
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def project(x: torch.Tensor, weight, shape: tuple[int, int]) -> torch.Tensor:
    """[..., d_in] -> [..., n, dh] through an attention matrix stored [d_in, n, dh] (float, any
    strides) or an ``Int8Weight``."""
    y = weight(x) if isinstance(weight, nn.Module) else x @ weight.flatten(1)
    return y.unflatten(-1, shape)

_ACTIVATIONS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def sinusoid(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """XLNet's sinusoidal embedding of (relative) positions: [P] -> [P, d_model]."""
    freq = torch.arange(0, d_model, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1 / torch.pow(10000, freq / d_model)
    angles = positions.float()[:, None] * inv_freq
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class RelativeAttention(nn.Module):
    """XLNet's relative attention; parameter shapes [d_model, n_head, d_head] as in `transformers`."""

    def __init__(self, config: ASARMConfig):
        super().__init__()
        d, n, dh = config.d_model, config.n_head, config.d_head
        self.n_head, self.d_head = n, dh
        self.scale = 1 / math.sqrt(dh)
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, nn.Parameter(torch.empty(d, n, dh)))
        self.r_r_bias = nn.Parameter(torch.empty(n, dh))
        self.r_s_bias = nn.Parameter(torch.empty(n, dh))  # segment term: unused with one segment
        self.r_w_bias = nn.Parameter(torch.empty(n, dh))
        self.seg_embed = nn.Parameter(torch.empty(2, n, dh))  # kept so checkpoints round-trip
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def project(self, x: torch.Tensor, weight) -> torch.Tensor:
        """[B, T, d_model] @ [d_model, n, dh] -> [B, T, n, dh]."""
        return project(x, weight, (self.n_head, self.d_head))

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, T, n * dh] -> [B, T, d_model] through ``o`` (stored [d_model, n, dh])."""
        return self.o(attn) if isinstance(self.o, nn.Module) else attn @ self.o.flatten(1).T

    def forward(self, x, keys, values, bias_parts, rel_table, rows=None):
        """x: rows [B, T, d]; keys/values [B, K, n, dh]; returns new rows [B, T, d] (``rows``
        [B, T]: the real rows, see ``on_rows``; None: all).

        bias_parts = (rel_index [B, T, K], allowed [B, T, K], has_key [B, T]).
        """
        rel_index, allowed, has_key = bias_parts
        B, T, _ = x.shape
        q = on_rows(lambda t: self.project(t, self.q), rows, x).transpose(1, 2)  # [B, n, T, dh]
        # Position term: score every row against the whole table of relative distances, then
        # pick the distance of each (row, key) pair. Cheap when T is small (cached passes). The
        # table is stored [n, dh, R]; einsum batches over heads with every (row, T) as one
        # matrix row (a plain broadcast `@` would copy the table once per batch row).
        pos_scores = torch.einsum("bntd,ndr->bntr", q + self.r_r_bias[:, None], rel_table)  # [B, n, T, R]
        index = rel_index[:, None].expand(B, self.n_head, T, rel_index.shape[-1])
        bias = pos_scores.gather(-1, index) * self.scale
        bias = bias.masked_fill(~allowed[:, None], masked_score(bias.dtype))
        # On CUDA, training takes the plain path: the fused memory-efficient kernel's backward
        # gives NaN gradients for rows whose keys are all masked (pytorch#119320, #125674).
        attend = plain_attention if self.training and x.is_cuda else F.scaled_dot_product_attention
        attn = attend(
            q + self.r_w_bias[:, None],
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=bias,
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=self.scale,
        )
        attn = attn * has_key[:, None, :, None].to(attn.dtype)
        return on_rows(lambda a, r: self.layer_norm(self.dropout(self.output(a)) + r), rows,
                       attn.transpose(1, 2).flatten(2), x)


class FeedForward(nn.Module):
    def __init__(self, config: ASARMConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.layer_1 = nn.Linear(config.d_model, config.d_inner)
        self.layer_2 = nn.Linear(config.d_inner, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = _ACTIVATIONS[config.ff_activation]

    def forward(self, x):
        y = self.dropout(self.layer_2(self.dropout(self.activation(self.layer_1(x)))))
        return self.layer_norm(y + x)


class Layer(nn.Module):
    def __init__(self, config: ASARMConfig):
        super().__init__()
        self.rel_attn = RelativeAttention(config)
        self.ff = FeedForward(config)


class Body(nn.Module):
    """Holds the parameters under the names `transformers` gives them (``transformer.*``)."""

    def __init__(self, config: ASARMConfig):
        super().__init__()
        self.word_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.mask_emb = nn.Parameter(torch.empty(1, 1, config.d_model))
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.n_layer))


class ASARM(nn.Module):
    """Any-subset autoregressive model with an XLNet-compatible two-stream transformer."""

    draft_head = None  # a draft_head.DraftHead (``draft="head"``), kept outside the model's state dict

    def __init__(self, config: ASARMConfig):
        super().__init__()
        self.config = config
        self.transformer = Body(config)
        self.lm_loss = nn.Linear(config.d_model, config.vocab_size)
        self.lm_loss.weight = self.transformer.word_embedding.weight  # tied, as in XLNet
        self.dropout = nn.Dropout(config.dropout)
        # In eval mode on CPU, store fp32 weight matrices [in, out], the orientation fp32 multiplies
        # fastest by (see ``_relayout``); False keeps the plain layout (for comparisons).
        self.fast_layout = True
        self._fast_pass = None  # a fastpass.FastPass while ``use_fast_path`` is on (inference only)
        self._fast_pass_wanted = False
        self.register_load_state_dict_post_hook(lambda module, keys: module._rebuild_fast_pass())
        self.reset_parameters()
        if config.quantization is not None:
            quant.quantize_model(self, config.quantization, empty=True)

    # --- construction -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """XLNet's initialisation: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias") and p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    @property
    def device(self) -> torch.device:
        return self.lm_loss.bias.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations (an int8 model's weights are int8, its activations this)."""
        return self.lm_loss.bias.dtype

    def num_parameters(self) -> int:
        """Weights of the network (int8 values of a quantized model included; scales not)."""
        total = sum(p.numel() for p in self.parameters())
        return total + sum(b.numel() for n, b in self.named_buffers() if n.endswith(".int8"))

    # --- weight layout for inference ---------------------------------------------------------------
    def _matrices(self):
        """(parameter, its first dim is the input dim) for every float weight matrix of a pass."""
        for layer in self.transformer.layer:
            attn = layer.rel_attn
            for name in ("q", "k", "v", "o"):
                p = getattr(attn, name)
                if isinstance(p, nn.Parameter):
                    yield p, name != "o"
            for linear in (layer.ff.layer_1, layer.ff.layer_2):
                if isinstance(linear, nn.Linear):
                    yield linear.weight, False
        if isinstance(self.transformer.word_embedding, nn.Embedding):
            yield self.transformer.word_embedding.weight, False  # = the LM head's weight

    @torch.no_grad()
    def _relayout(self) -> None:
        """Same parameters, same values, different strides. On CPU, fp32 multiplies the 5-15-row
        activations of cached passes about twice as fast by a weight stored [in, out] as by one
        stored [out, in] (nn.Linear's layout): scripts/profile_cached_pass.py --compare-layout.
        bf16 showed no consistent difference, so it keeps the plain layout, as do training, GPUs
        and ``fast_layout = False``."""
        fast = self.fast_layout and not self.training and self.device.type == "cpu" and self.dtype == torch.float32
        for p, dim0_is_in in self._matrices():
            transposed = fast and not dim0_is_in  # store [in, out]
            flat = p.data.flatten(1)
            is_transposed = flat.stride(0) == 1 and flat.shape[1] > 1
            if transposed == is_transposed and (transposed or p.data.is_contiguous()):
                continue
            new = flat.T.contiguous().T if transposed else flat.contiguous()
            p.data = new.view(p.shape)

    def train(self, mode: bool = True):
        super().train(mode)
        self._relayout()
        if hasattr(self, "_fast_pass_wanted"):
            self._rebuild_fast_pass()
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if hasattr(self, "fast_layout"):
            self._relayout()
            self._rebuild_fast_pass()
        return self

    # --- the fast inference pass ------------------------------------------------------------------
    def use_fast_path(self, enabled: bool = True, warn: bool = True) -> "ASARM":
        """Run inference passes (eval mode, no gradients) through ``fastpass.FastPass``:
        prepacked weights, fused projections, padding rows dropped once per pass. Same logits to
        float rounding; eager stays in use for training and anything that needs gradients. The
        packed weights are rebuilt when the parameters change through ``load_state_dict`` or
        ``.to``; after editing parameters in place, call ``use_fast_path()`` again."""
        self._fast_pass_wanted = bool(enabled)
        self._rebuild_fast_pass(warn)
        return self

    @property
    def fast_path(self) -> bool:
        """True while inference passes run through the fast pass."""
        return self._fast_pass is not None

    def _rebuild_fast_pass(self, warn: bool = True) -> None:
        self._fast_pass = None
        if self._fast_pass_wanted and not self.training and self.device.type != "meta":
            self._fast_pass = fastpass.build(self, masked_score(self.dtype), warn)

    # --- relative positions ---------------------------------------------------------------------
    def relative_table(self, span: int) -> list[torch.Tensor]:
        """Per layer, the projected embedding of every relative distance in [-(span-1), span-1],
        stored [n_head, d_head, 2 * span - 1].

        Column ``d + span - 1`` holds distance d = query position - key position. Depends only
        on the weights, so a sampler computes it once per run and passes it to every pass.
        """
        distances = torch.arange(span - 1, -span, -1, device=self.device).flip(0)
        if self.config.clamp_len > 0:
            distances = distances.clamp(-self.config.clamp_len, self.config.clamp_len)
        emb = self.dropout(sinusoid(distances, self.config.d_model).to(self.dtype))
        shape = (self.config.n_head, self.config.d_head)
        return [project(emb, layer.rel_attn.r, shape).permute(1, 2, 0).contiguous()
                for layer in self.transformer.layer]

    # --- the pass -------------------------------------------------------------------------------
    def forward_rows(
        self,
        content_ids: torch.Tensor,
        content_pos: torch.Tensor,
        content_rank: torch.Tensor,
        query_pos: torch.Tensor,
        query_rank: torch.Tensor,
        cache=None,
        rel_table: list[torch.Tensor] | None = None,
        return_hidden: bool = False,
        branches: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One pass over new content rows and query rows; returns query-row logits [B, Q, V]
        (with ``return_hidden``: (logits, the query rows' final states [B, Q, d_model]), which a
        draft head reads).

        content_*: [B, N] (padding rows have rank ``NO_KEY``); query_*: [B, Q] (padding rows have
        rank 0 and see nothing). Without ``cache`` the keys are exactly this pass's content rows.
        With a ``ContentCache`` the new rows' keys and values are written after the row's
        committed slots and every row attends to committed + new keys; ``cache.commit`` then keeps
        a prefix of the new rows. ``rel_table``: ``relative_table(span)`` for a span covering
        every position (computed here when missing or too short). ``branches``: (content_branch
        [B, N], query_branch [B, Q]) draft-branch ids of a multi-draft pass (``pass_geometry``).
        """
        if self._fast_pass is not None and not torch.is_grad_enabled():
            return self._fast_pass.forward_rows(content_ids, content_pos, content_rank, query_pos, query_rank,
                                                cache, rel_table, return_hidden, branches)
        geo = pass_geometry(content_ids, content_pos, content_rank, query_pos, query_rank, cache, rel_table,
                            self.relative_table, branches)
        B, N = geo.content_ids.shape
        bias_parts = (geo.rel_index, geo.allowed, geo.allowed.any(-1))
        # Padding rows (content rank NO_KEY, query rank 0) are left out of every matmul.
        rows = None if bool(geo.real_rows.all()) else geo.real_rows
        content_rows, query_rows = (None, None) if rows is None else (rows[:, :N], rows[:, N:])

        h = self.dropout(self.transformer.word_embedding(geo.content_ids).to(self.dtype))
        g = self.dropout(self.transformer.mask_emb.expand(B, query_pos.shape[1], -1))
        x = torch.cat([h, g], dim=1)
        for i, layer in enumerate(self.transformer.layer):
            attn = layer.rel_attn
            content = x[:, :N]
            k_new = on_rows(lambda t: attn.project(t, attn.k), content_rows, content)
            v_new = on_rows(lambda t: attn.project(t, attn.v), content_rows, content)
            if cache is None:
                keys, values = k_new, v_new
            else:
                keys, values = cache.write_layer(i, k_new, v_new)
            x = on_rows(layer.ff, rows, attn(x, keys, values, bias_parts, geo.rel_table[i], rows))
        logits = on_rows(lambda t: self.lm_loss(self.dropout(t)), query_rows, x[:, N:])
        return (logits, x[:, N:]) if return_hidden else logits

    def chain_logits(self, input_ids: torch.Tensor, ranks: torch.Tensor, rel_table=None):
        """Every factor of the chain in one pass, with no cache (training, scoring, references).

        input_ids, ranks: [B, L]; ranks 0 = visible, 1..m = hidden in decoding order,
        ``ranks.PADDING_RANK`` (-1) = padding. Returns (logits [B, Q, V], query_pos [B, Q],
        query_valid [B, Q]) where the query rows are each row's hidden positions, ascending in
        position.
        """
        B, L = input_ids.shape
        ranks = ranks.long()
        positions = torch.arange(L, device=input_ids.device).expand(B, L)
        content_rank = key_ranks(ranks)
        hidden = ranks > 0
        Q = int(hidden.sum(1).max().item()) if B else 0
        # Stable sort puts each row's hidden positions first, in ascending position.
        order = torch.sort((~hidden).to(torch.int8), dim=1, stable=True).indices[:, :Q]
        query_valid = hidden.gather(1, order)
        query_pos = order
        query_rank = torch.where(query_valid, ranks.gather(1, order), torch.zeros_like(order))
        logits = self.forward_rows(input_ids, positions, content_rank, query_pos, query_rank,
                                   rel_table=rel_table)
        return logits, query_pos, query_valid

    # --- checkpoints ------------------------------------------------------------------------------
    def save_pretrained(self, directory, tokenizer=None, dtype=None, max_shard_mb=None):
        """Write an HF XLNet-format checkpoint (``tokenizer`` defaults to ``self.tokenizer``).

        ``dtype`` converts the stored float weights (default: the model's dtype); an int8 model
        stores its int8 values and float32 scales whatever ``dtype`` says. ``max_shard_mb``
        splits the weights into transformers-style shards of at most that many MiB.
        """
        from .devices import resolve_dtype

        dtype = resolve_dtype(dtype)
        if tokenizer is None:
            tokenizer = getattr(self, "tokenizer", None)
        tensors = {}
        for k, v in self.state_dict().items():
            if k == storage.TIED_KEY:
                continue  # tied to the word embedding: stored once, as transformers does
            if dtype is not None and v.is_floating_point() and not k.endswith(".scale"):
                v = v.to(dtype)
            tensors[k] = v
        return storage.write_checkpoint(directory, self.config.to_dict(), tensors, tokenizer, max_shard_mb)

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, device=None, dtype=None, mask_token_id=None,
                        quantize=None, fast_path=None):
        """An ``ASARM`` in eval mode from a directory, shipped short name or hub id.

        ``mask_token_id`` defaults to the tokenizer's mask token when the checkpoint has tokenizer
        files, else config.json's ``asarm_mask_token_id``, else 6 (XLNet's ``<mask>``). ``dtype``:
        the activations' dtype, a torch dtype or "fp32"/"bf16"/"fp16"; None means fp32 (16-bit
        checkpoints are upcast), or bf16 for an int8 model. ``quantize="int8"`` quantizes a float
        checkpoint's weights (see ``asarm.quantize``); an int8 checkpoint loads as int8 by
        itself. ``device``: None means CUDA when available, else CPU. ``fast_path``: run
        inference through ``fastpass.FastPass`` (None: on for CPUs, where it was measured; see
        ``use_fast_path``). The tokenizer (or None) is attached as ``model.tokenizer``, the
        source directory as ``model.name_or_path``.
        """
        from .devices import resolve_device, resolve_dtype
        from .tokenization import load_tokenizer, mask_token_id as tokenizer_mask_id

        device = resolve_device(device)
        dtype, quantize = resolve_dtype(dtype, device), quant.check_method(quantize)
        directory = storage.resolve(name_or_path, revision)
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory}: no config.json found (not an HF XLNet-format checkpoint directory)")
        config = ASARMConfig.load(directory)
        if quantize is not None and config.quantization is not None:
            raise InputError(f"{directory} is already quantized ({config.quantization}); "
                             "load it without quantize= or quantize its float original")
        tokenizer = load_tokenizer(directory)
        config = _with_mask_token(config, tokenizer_mask_id(tokenizer) if mask_token_id is None else mask_token_id)
        check_weight_file(config, directory)  # before any allocation
        state = storage.normalize_keys(storage.load_state_dict(directory))
        model = cls(config)
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
        del state
        if quantize is not None:
            quant.quantize_model(model, quantize)
        if dtype is None:
            int8 = model.config.quantization is not None  # quantize_model replaced the config
            dtype = torch.bfloat16 if int8 and device.type == "cpu" else torch.float32
        model.to(device=device, dtype=dtype)
        model.eval()
        model.use_fast_path(device.type == "cpu" if fast_path is None else fast_path)
        model.tokenizer = tokenizer
        model.name_or_path = str(directory)
        if draft_head.has_head(directory):  # saved beside the model by `asarm train-draft`
            model.attach_draft_head(draft_head.load_head(directory, model.config, device))
        return model

    def attach_draft_head(self, head) -> None:
        """Use ``head`` (a ``draft_head.DraftHead`` for this model) for ``draft="head"``. It stays
        out of the model's parameters and state dict (it is saved and loaded on its own)."""
        if head is not None:
            draft_head.check_head(head.config, self.config, "draft head")
        self.__dict__["draft_head"] = head


def _with_mask_token(config: ASARMConfig, mask_token_id) -> ASARMConfig:
    if mask_token_id is None:
        return config
    if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool):
        raise InputError(f"mask_token_id must be an integer, got {mask_token_id!r}")
    if not 0 <= mask_token_id < config.vocab_size:
        raise InputError(f"mask_token_id {mask_token_id} is outside the vocabulary of {config.vocab_size}")
    return dataclasses.replace(config, mask_token_id=mask_token_id)


def expected_shapes(config: ASARMConfig) -> dict[str, tuple[int, ...]]:
    """{state-dict name: shape} of a model with ``config``, built on the meta device (allocates
    no weight memory; the config's sizes are already bounded by ``ASARMConfig``)."""
    with torch.device("meta"):
        model = ASARM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weight_file(config: ASARMConfig, directory) -> None:
    """config.json against the weight file's header: names, shapes and float/int8 types agree,
    or a CheckpointError — checked before the model or any tensor is allocated."""
    found = storage.normalize_keys(storage.header_shapes(directory))
    quant.check_loadable(config, found)
    # Cheap first check, so a config with a huge layer count fails before even the meta model.
    layers = {k.split(".")[2] for k in found if k.startswith("transformer.layer.")}
    if config.n_layer > len(layers):
        raise CheckpointError(f"{directory}: weights do not match config.json: config.json says "
                              f"n_layer={config.n_layer}, the weight file has {len(layers)} layer(s)")
    storage.check_shapes(expected_shapes(config), found, str(directory))
