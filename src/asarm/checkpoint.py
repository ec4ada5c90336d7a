"""Loading and saving AS-ARM checkpoints in HF `transformers` XLNet format.

A checkpoint is a directory with ``config.json`` (model_type "xlnet") and ``model.safetensors``
(or ``pytorch_model.bin``, or sharded ``model.safetensors.index.json``), plus optional tokenizer
files. ``load_model`` accepts:

- a local directory;
- the short name of a model shipped with the package (``src/asarm/shipped/<name>/``), e.g.
  ``DEFAULT_MODEL`` = "asarm-en-small";
- a Hugging Face Hub id such as ``therealgabeguo/ASARM`` with ``revision="nlp"`` or ``"code"``
  (needs network access; otherwise download the files and pass the directory).

``save_model`` writes what ``transformers.XLNetLMHeadModel.from_pretrained`` reads: the tied
output embedding (``lm_loss.weight``) is stored once, as ``transformer.word_embedding.weight``.
Files are written into a temporary directory beside the target and renamed in, so a crash never
leaves a half-written weight file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ASARMConfig
from .devices import resolve_device, resolve_dtype
from .errors import CheckpointError, InputError
from .model import ASARM

SHIPPED_DIR = Path(__file__).parent / "shipped"
# Names of the models the package ships (their directories are added by training).
SHIPPED_NAMES = ("asarm-en-small", "asarm-py-small")
DEFAULT_MODEL = "asarm-en-small"
DEFAULT_MASK_TOKEN_ID = 6

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TIED_KEY = "lm_loss.weight"
EMBEDDING_KEY = "transformer.word_embedding.weight"
# Buffers some `transformers` versions store that our model has no use for.
IGNORED_KEY_PATTERNS = (re.compile(r".*position_ids$"),)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]

def shipped_models() -> list[str]:
    """Short names of the shipped models present in this installation."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "config.json").is_file())


# --- resolving a name to a directory ---------------------------------------------------------
def resolve(name_or_path, revision: str | None = None) -> Path:
    """The local directory for a path, a shipped short name, or a hub id (downloaded)."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise InputError(f"model name or path must be a non-empty string, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name_or_path}: is a file, expected a checkpoint directory")
    if name_or_path in SHIPPED_NAMES or (SHIPPED_DIR / name_or_path / "config.json").is_file():
        shipped = SHIPPED_DIR / name_or_path
        if not shipped.is_dir():
            raise CheckpointError(
                f"shipped model {name_or_path!r} is not installed in this copy of asarm "
                f"(expected at {shipped}); installed: {shipped_models() or 'none'}. "
                "Pass a local checkpoint directory instead."
            )
        return shipped
    if HUB_ID.match(name_or_path):  # "owner/name" that is not a local directory
        return _download(name_or_path, revision)
    raise CheckpointError(
        f"{name_or_path}: checkpoint directory does not exist (and it is not a shipped model: "
        f"{', '.join(SHIPPED_NAMES)})"
    )


def _download(repo_id: str, revision: str | None) -> Path:
    where = f"{repo_id}" + (f" (revision {revision!r})" if revision else "")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"cannot download {where}: huggingface_hub is not installed; download the checkpoint "
            "files and pass the local directory instead"
        ) from None
    try:
        local = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # offline, unknown repo or revision, HTTP errors
        raise CheckpointError(
            f"could not download {where} from the Hugging Face Hub: the hub is unreachable or the "
            f"repository/revision does not exist ({type(exc).__name__}: {exc}). No local directory "
            f"named {repo_id!r} exists either. "
            "Pass a local checkpoint directory (config.json + model.safetensors) instead."
        ) from None
    return Path(local)


# --- weights ---------------------------------------------------------------------------------
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or truncated weight file ({type(exc).__name__}: {exc})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only unpickling raises many types on bad files
        raise CheckpointError(f"{path}: corrupt weight file, cannot unpickle ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return data


def _load_sharded(index_path: Path, loader) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path}: corrupt shard index ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        state.update(loader(shard_path))
    return state


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The raw tensors of a checkpoint directory (safetensors preferred)."""
    directory = Path(directory)
    if (directory / SAFETENSORS_NAME).is_file():
        return _load_safetensors(directory / SAFETENSORS_NAME)
    if (directory / SAFETENSORS_INDEX).is_file():
        return _load_sharded(directory / SAFETENSORS_INDEX, _load_safetensors)
    if (directory / BIN_NAME).is_file():
        return _load_bin(directory / BIN_NAME)
    if (directory / BIN_INDEX).is_file():
        return _load_sharded(directory / BIN_INDEX, _load_bin)
    raise CheckpointError(
        f"{directory}: no weight file found (expected {SAFETENSORS_NAME} or {BIN_NAME})"
    )


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def match_state_dict(model: ASARM, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` renamed/checked against ``model``: tied ``lm_loss.weight`` optional, HF buffers
    ignored, any missing/unexpected key or wrong shape a CheckpointError naming the first few."""
    state = {k: v for k, v in state.items() if not any(p.match(k) for p in IGNORED_KEY_PATTERNS)}
    expected = model.state_dict()
    # A bare XLNetModel checkpoint stores the body without the "transformer." prefix.
    if state and not any(k.startswith("transformer.") for k in state) and "word_embedding.weight" in state:
        state = {(k if k.startswith("lm_loss.") else f"transformer.{k}"): v for k, v in state.items()}
    if EMBEDDING_KEY not in state and TIED_KEY in state:
        state[EMBEDDING_KEY] = state[TIED_KEY]
    if EMBEDDING_KEY in state:
        state[TIED_KEY] = state[EMBEDDING_KEY]  # tied: the embedding wins, as in transformers
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    wrong = [
        f"{k} has shape {tuple(state[k].shape)}, config needs {tuple(v.shape)}"
        for k, v in sorted(expected.items())
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong[:3]) + more)
    if problems:
        raise CheckpointError(f"{source}: weights do not match config.json: " + "; ".join(problems))
    bad = [k for k in expected if not state[k].is_floating_point()]
    if bad:
        raise CheckpointError(f"{source}: weights do not match config.json: non-float tensor(s): {_first(bad)}")
    return state


# --- the public functions --------------------------------------------------------------------
def load_model(name_or_path=DEFAULT_MODEL, revision: str | None = None, device=None, dtype=None,
               mask_token_id: int | None = None) -> ASARM:
    """An ``ASARM`` in eval mode from a directory, shipped short name or hub id.

    ``mask_token_id`` defaults to the tokenizer's mask token when the checkpoint has tokenizer
    files, else config.json's ``asarm_mask_token_id``, else 6 (XLNet's ``<mask>``). ``dtype``:
    a torch dtype or "fp32"/"float32"/"bf16"/"bfloat16"/"fp16"; None means fp32 (16-bit
    checkpoints are upcast: fp32 is the fast and exact choice on CPUs). ``device``: None means
    CUDA when available, else CPU. The tokenizer (or None) is
    attached as ``model.tokenizer`` and the source directory as ``model.name_or_path``.
    """
    from .tokenization import load_tokenizer, mask_token_id as tokenizer_mask_id

    dtype = resolve_dtype(dtype)
    directory = resolve(name_or_path, revision)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json found (not an HF XLNet-format checkpoint directory)")
    config = ASARMConfig.load(directory)
    tokenizer = load_tokenizer(directory)
    if mask_token_id is None:
        mask_token_id = tokenizer_mask_id(tokenizer)
    if mask_token_id is not None:
        if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool):
            raise InputError(f"mask_token_id must be an integer, got {mask_token_id!r}")
        if not 0 <= mask_token_id < config.vocab_size:
            raise InputError(f"mask_token_id {mask_token_id} is outside the vocabulary of {config.vocab_size}")
        config = dataclasses.replace(config, mask_token_id=mask_token_id)
    state = load_state_dict(directory)
    model = ASARM(config)
    state = match_state_dict(model, state, str(directory))
    if dtype is None:
        dtype = torch.float32
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    del state
    model.to(device=resolve_device(device), dtype=dtype)
    model.eval()
    model.tokenizer = tokenizer
    model.name_or_path = str(directory)
    return model


def save_model(model: ASARM, directory: str | Path, tokenizer=None, dtype=None) -> Path:
    """Write ``model`` (and ``tokenizer``, default ``model.tokenizer``) as an HF XLNet checkpoint.

    Files are written into a temporary directory beside ``directory`` and renamed in one by one.
    ``dtype`` converts the stored weights (default: the model's dtype).
    """
    from safetensors.torch import save_file

    dtype = resolve_dtype(dtype)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        model.config.save(tmp)
        tensors = {}
        for k, v in model.state_dict().items():
            if k == TIED_KEY:
                continue  # tied to the word embedding: stored once, as transformers does
            v = v.detach().to("cpu")
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            tensors[k] = v.contiguous().clone()
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        directory.mkdir(exist_ok=True)
        # Weights first, config last; each rename is atomic.
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        names.sort(key=lambda n: (n == "config.json", n != SAFETENSORS_NAME))
        for name in names:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
