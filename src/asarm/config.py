"""Model configuration, stored as an HF `transformers` XLNet ``config.json``.

Only the fields our network uses are typed; every other key of a published config is kept in
``extra`` so that saving writes back what was read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError

SUPPORTED_ACTIVATIONS = ("gelu", "relu", "gelu_new", "silu", "swish")
QUANTIZATIONS = ("int8",)
# Sizes no real checkpoint comes near; a config.json beyond them is refused before anything is
# allocated (a hostile n_layer=100000 or d_model=1e9 would otherwise allocate until memory runs out).
MAX_SIZES = dict(vocab_size=2**22, d_model=2**16, n_layer=1024, n_head=1024, d_inner=2**18)
MAX_PARAMETERS = 2 * 10**10


# XLNet's SentencePiece vocabulary has `<mask>` at id 6: the mask token of a checkpoint that does
# not name one (and of text encoded with a tokenizer that has none).
DEFAULT_MASK_TOKEN_ID = 6


@dataclasses.dataclass
class ASARMConfig:
    vocab_size: int = 32000
    d_model: int = 1024
    n_layer: int = 24
    n_head: int = 16
    d_inner: int = 4096
    ff_activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    clamp_len: int = -1
    initializer_range: float = 0.02
    pad_token_id: int = 5
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Not an XLNet field: the token that marks hidden positions and is never sampled.
    mask_token_id: int = DEFAULT_MASK_TOKEN_ID
    # Longest sequence the model may be asked to handle. XLNet's relative positions have no
    # hard limit; None means "no limit", a number is enforced with a clear error.
    max_length: int | None = None
    # Not an XLNet field: None for float weights, "int8" for weight-only int8 (see quantize.py).
    quantization: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
            elif value > MAX_SIZES[name]:
                problems.append(f"{name} = {value} is larger than any supported model (at most {MAX_SIZES[name]})")
        if not problems and self.parameter_estimate() > MAX_PARAMETERS:
            problems.append(f"the config describes {self.parameter_estimate():.3g} parameters "
                            f"(at most {MAX_PARAMETERS:.0g} are supported)")
        if not problems and self.d_model % self.n_head:
            problems.append(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.ff_activation not in SUPPORTED_ACTIVATIONS:
            problems.append(
                f"ff_activation {self.ff_activation!r} is not supported (use one of {SUPPORTED_ACTIVATIONS})"
            )
        if not problems and not 0 <= self.mask_token_id < self.vocab_size:
            problems.append(f"mask_token_id {self.mask_token_id} is outside the vocabulary of {self.vocab_size}")
        if self.quantization not in (None, *QUANTIZATIONS):
            problems.append(f"asarm_quantization {self.quantization!r} is not supported (use one of {QUANTIZATIONS})")
        if problems:
            raise CheckpointError("invalid model config: " + "; ".join(problems))

    def parameter_estimate(self) -> int:
        """Number of parameters the config describes (without allocating them)."""
        d, layers = self.d_model, self.n_layer
        # q, k, v, o, r; three attention biases, seg_embed (2) and two layer norms (2 each); the FFN
        per_layer = 5 * d * d + 10 * d + 2 * d * self.d_inner + self.d_inner
        return self.vocab_size * (d + 1) + d + layers * per_layer

    # --- HF config.json round trip -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            {
                "model_type": "xlnet",
                "architectures": ["XLNetLMHeadModel"],
                "vocab_size": self.vocab_size,
                "d_model": self.d_model,
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "d_head": self.d_head,
                "d_inner": self.d_inner,
                "ff_activation": self.ff_activation,
                "layer_norm_eps": self.layer_norm_eps,
                "dropout": self.dropout,
                "clamp_len": self.clamp_len,
                "initializer_range": self.initializer_range,
                "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "attn_type": "bi",
                "bi_data": False,
                "untie_r": True,
                "mem_len": None,
                "reuse_len": None,
                "asarm_mask_token_id": self.mask_token_id,
                "asarm_max_length": self.max_length,
                "asarm_quantization": self.quantization,
            }
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ASARMConfig":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        model_type = data.get("model_type")
        if model_type != "xlnet":
            raise CheckpointError(
                f"{source}: model_type is {model_type!r}, but asarm loads XLNet-format checkpoints "
                "(model_type 'xlnet')"
            )
        if data.get("attn_type", "bi") != "bi":
            raise CheckpointError(f"{source}: attn_type {data.get('attn_type')!r} is not supported (need 'bi')")
        if data.get("bi_data"):
            raise CheckpointError(f"{source}: bi_data=True is not supported")
        if "d_head" in data and "d_model" in data and "n_head" in data:
            if not all(isinstance(data[k], int) for k in ("d_head", "n_head", "d_model")) or \
                    data["d_head"] * data["n_head"] != data["d_model"]:
                raise CheckpointError(f"{source}: d_head * n_head must equal d_model (integers)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "mask_token_id", "max_length", "quantization"}
        kwargs = {k: data[k] for k in names if k in data and data[k] is not None}
        if "asarm_mask_token_id" in data and data["asarm_mask_token_id"] is not None:
            kwargs["mask_token_id"] = data["asarm_mask_token_id"]
        if data.get("asarm_max_length") is not None:
            kwargs["max_length"] = data["asarm_max_length"]
        if data.get("asarm_quantization") is not None:
            kwargs["quantization"] = data["asarm_quantization"]
        known = names | {"model_type", "architectures", "d_head", "attn_type", "bi_data", "untie_r",
                         "mem_len", "reuse_len", "asarm_mask_token_id", "asarm_max_length",
                         "asarm_quantization"}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:  # e.g. a field given as a list: still one clear line
            raise CheckpointError(f"{source}: invalid model config ({exc})") from None

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "ASARMConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no config.json found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:  # a JSON value nested thousands deep
            raise CheckpointError(f"{path}: not a model config (JSON nested too deeply)") from None
        return cls.from_dict(data, source=str(path))
