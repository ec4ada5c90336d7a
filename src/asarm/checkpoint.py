"""Loading and saving AS-ARM checkpoints in HF `transformers` XLNet format: the public functions.

``load_model`` accepts:

- a local directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` / shards);
- the short name of a model shipped with the package (``src/asarm/shipped/<name>/``), e.g.
  ``DEFAULT_MODEL`` = "asarm-en-small";
- a Hugging Face Hub id such as ``therealgabeguo/ASARM`` with ``revision="nlp"`` or ``"code"``
  (needs network access; otherwise download the files and pass the directory).

``save_model`` writes what ``transformers.XLNetLMHeadModel.from_pretrained`` reads: the tied
output embedding (``lm_loss.weight``) is stored once, as ``transformer.word_embedding.weight``.
Files are written into a temporary directory beside the target and renamed in, so a crash never
leaves a half-written weight file. Int8 models (``quantize="int8"``, ``asarm quantize``) store
int8 values and scales and say so in config.json (see ``asarm.quantize``).

Layering (no circles): ``storage`` (names, files) < ``quantize`` < ``model`` < this module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import ASARM
from .storage import (  # noqa: F401  (public names kept where they always were)
    BIN_INDEX, BIN_NAME, DEFAULT_MODEL, EMBEDDING_KEY, SAFETENSORS_INDEX, SAFETENSORS_NAME,
    SHIPPED_DIR, SHIPPED_NAMES, TIED_KEY, load_state_dict, resolve, shipped_models,
)
from . import storage


def match_state_dict(model: ASARM, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` renamed/checked against ``model``: tied ``lm_loss.weight`` optional, HF buffers
    ignored, any missing/unexpected key or wrong shape a CheckpointError naming the first few."""
    from .errors import CheckpointError

    state = storage.normalize_keys(state)
    expected = model.state_dict()
    storage.check_shapes({k: tuple(v.shape) for k, v in expected.items()},
                         {k: tuple(v.shape) for k, v in state.items()}, source)
    bad = [k for k, v in expected.items() if v.is_floating_point() and not state[k].is_floating_point()]
    if bad:
        raise CheckpointError(f"{source}: weights do not match config.json: non-float tensor(s): {storage.first_names(bad)}")
    return state


def load_model(name_or_path=DEFAULT_MODEL, revision: str | None = None, device=None, dtype=None,
               mask_token_id: int | None = None, quantize: str | None = None, fast_path: bool | None = None) -> ASARM:
    """An ``ASARM`` in eval mode from a directory, shipped short name or hub id.

    ``mask_token_id`` defaults to the tokenizer's mask token when the checkpoint has tokenizer
    files, else config.json's ``asarm_mask_token_id``, else 6 (XLNet's ``<mask>``). ``dtype``:
    the activations' dtype, a torch dtype or "fp32"/"float32"/"bf16"/"bfloat16"/"fp16", or "auto"
    (``devices.fastest_dtype``: bf16 on a CPU with native bf16, else fp32); None
    means fp32 (16-bit checkpoints are upcast), or bf16 on CPU for an int8 model.
    ``quantize``: None or "int8" (weight-only int8 per output channel; an int8 checkpoint loads
    as int8 without it). ``device``: None means CUDA when available, else CPU. ``fast_path``:
    inference through the fast pass (``asarm.fastpass``; None: on for CPUs). The tokenizer
    (or None) is attached as ``model.tokenizer`` and the source directory as
    ``model.name_or_path``.

    Threads: the first call in a process sets torch to one thread, measured fastest for these
    models, unless the program chose (``ASARM_NUM_THREADS``, ``OMP_NUM_THREADS`` or its own
    ``torch.set_num_threads`` call; ``asarm.threads``).
    """
    from .threads import apply_library_default

    apply_library_default()
    return ASARM.from_pretrained(name_or_path, revision=revision, device=device, dtype=dtype,
                                 mask_token_id=mask_token_id, quantize=quantize, fast_path=fast_path)


def save_model(model: ASARM, directory: str | Path, tokenizer=None, dtype=None,
               max_shard_mb: float | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, default ``model.tokenizer``) as an HF XLNet checkpoint.

    ``dtype`` converts the stored float weights (default: the model's dtype); ``max_shard_mb``
    splits them into shards of at most that many MiB (with ``model.safetensors.index.json``).
    """
    return model.save_pretrained(directory, tokenizer=tokenizer, dtype=dtype, max_shard_mb=max_shard_mb)
