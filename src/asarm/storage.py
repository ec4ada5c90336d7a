"""Where checkpoints live and what their files hold; knows nothing about the network.

A checkpoint is a directory in HF `transformers` XLNet format: ``config.json`` (model_type
"xlnet") and ``model.safetensors`` (or ``pytorch_model.bin``, or sharded with an
``*.index.json``), plus optional tokenizer files. This module

- turns a name into such a directory: a local path, the short name of a model shipped with the
  package (``src/asarm/shipped/<name>/``), or a Hugging Face Hub id (downloaded);
- reads weight files, and reads their *shapes* from the file header without loading any tensor,
  so a config can be checked against the weights before anything is allocated;
- renames/checks a state dict against the shapes a config needs;
- writes a checkpoint atomically (temporary directory beside the target, then renames).

Layering: ``storage`` < ``quantize`` < ``model`` (``ASARM.from_pretrained``) < ``checkpoint``
(the public ``load_model``/``save_model``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError, InputError

SHIPPED_DIR = Path(__file__).parent / "shipped"
# Names of the models the package ships (their directories are added by training).
SHIPPED_NAMES = ("asarm-en-small", "asarm-py-small")
DEFAULT_MODEL = "asarm-en-small"

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


# --- reading weight files ----------------------------------------------------------------------
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or truncated weight file ({type(exc).__name__}: {exc})") from None


def _load_bin(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # weights_only unpickling raises many types on bad files
        raise CheckpointError(f"{path}: corrupt weight file, cannot unpickle ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return data


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header: reads a few KiB, allocates no tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or truncated weight file ({type(exc).__name__}: {exc})") from None


def _bin_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    # mmap: storages are mapped, not read, so a huge file costs no memory here
    return {k: tuple(v.shape) for k, v in _load_bin(path, mmap=True).items()}


def _shard_paths(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{index_path}: corrupt shard index ({type(exc).__name__})") from None
    paths = []
    root = index_path.parent.resolve()
    for shard in shards:
        shard_path = index_path.parent / str(shard)
        # a shard is a file of the model directory itself: never ../../etc/passwd or /abs/path
        if (not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", "..")
                or shard_path.resolve().parent != root):
            raise CheckpointError(f"{index_path}: shard name {str(shard)[:80]!r} is not a file of the model directory")
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        paths.append(shard_path)
    return paths


def _weight_files(directory: Path):
    """[(path, kind)] of the checkpoint's weight files, kind "safetensors" or "bin"."""
    if (directory / SAFETENSORS_NAME).is_file():
        return [(directory / SAFETENSORS_NAME, "safetensors")]
    if (directory / SAFETENSORS_INDEX).is_file():
        return [(p, "safetensors") for p in _shard_paths(directory / SAFETENSORS_INDEX)]
    if (directory / BIN_NAME).is_file():
        return [(directory / BIN_NAME, "bin")]
    if (directory / BIN_INDEX).is_file():
        return [(p, "bin") for p in _shard_paths(directory / BIN_INDEX)]
    raise CheckpointError(f"{directory}: no weight file found (expected {SAFETENSORS_NAME} or {BIN_NAME})")


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The raw tensors of a checkpoint directory (safetensors preferred)."""
    state: dict[str, torch.Tensor] = {}
    for path, kind in _weight_files(Path(directory)):
        state.update(_load_safetensors(path) if kind == "safetensors" else _load_bin(path))
    return state


def header_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a checkpoint stores, read without loading them."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, kind in _weight_files(Path(directory)):
        shapes.update(_safetensors_shapes(path) if kind == "safetensors" else _bin_shapes(path))
    return shapes


# --- matching stored names and shapes to what a config needs -----------------------------------
def first_names(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def normalize_keys(state: dict) -> dict:
    """HF naming variants mapped to ours: HF buffers dropped, a bare ``XLNetModel`` body gets the
    ``transformer.`` prefix, and the tied ``lm_loss.weight`` equals the word embedding (the
    embedding wins, as in transformers). Works on tensors or on shapes alike."""
    state = {k: v for k, v in state.items() if not any(p.match(k) for p in IGNORED_KEY_PATTERNS)}
    if state and not any(k.startswith("transformer.") for k in state) and "word_embedding.weight" in state:
        state = {(k if k.startswith("lm_loss.") else f"transformer.{k}"): v for k, v in state.items()}
    if EMBEDDING_KEY not in state and TIED_KEY in state:
        state[EMBEDDING_KEY] = state[TIED_KEY]
    if EMBEDDING_KEY in state:
        state[TIED_KEY] = state[EMBEDDING_KEY]
    return state


def check_shapes(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """CheckpointError naming the first few missing/unexpected keys and wrong shapes, if any."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {first_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {first_names(unexpected)}")
    wrong = [f"{k} has shape {tuple(found[k])}, config needs {tuple(shape)}"
             for k, shape in sorted(expected.items()) if k in found and tuple(found[k]) != tuple(shape)]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong[:3]) + more)
    if problems:
        raise CheckpointError(f"{source}: weights do not match config.json: " + "; ".join(problems))


# --- writing -------------------------------------------------------------------------------------
WEIGHT_FILE = re.compile(r"^(model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json)$")


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_shard_bytes`` each (in state-dict
    order; a tensor bigger than the limit gets a shard of its own); one group when no limit."""
    if max_shard_bytes is None:
        return [list(tensors)]
    groups, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor], max_shard_mb: float | None) -> list[str]:
    """Write the weights into ``tmp`` as ``model.safetensors``, or as transformers-style shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when they exceed
    ``max_shard_mb``. Returns the weight file names, the index last."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    limit = None if max_shard_mb is None else int(max_shard_mb * 2**20)
    if limit is not None and limit <= 0:
        raise InputError(f"max_shard_mb must be positive, got {max_shard_mb!r}")
    groups = _shards(tensors, limit)
    if len(groups) == 1:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        return [SAFETENSORS_NAME]
    names, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [SAFETENSORS_INDEX]


def install_files(source: Path, directory: Path, weights: list[str]) -> None:
    """Move every file of ``source`` into ``directory``: the new weight files first (``weights``,
    in order), then the other files, then config.json; weight files of an older export that the
    new one does not have are removed just before config.json, so that ``directory`` never
    offers a reader two sets of weights for one config (a single file is preferred to an index)."""
    directory.mkdir(exist_ok=True)
    rest = sorted(p.name for p in source.iterdir() if p.is_file() and p.name not in weights)
    rest.sort(key=lambda n: n == "config.json")
    for name in weights + [n for n in rest if n != "config.json"]:
        os.replace(source / name, directory / name)
    for stale in directory.iterdir():
        if WEIGHT_FILE.match(stale.name) and stale.name not in weights:
            stale.unlink()
    if "config.json" in rest:
        os.replace(source / "config.json", directory / "config.json")


def write_checkpoint(directory: str | Path, config_dict: dict, tensors: dict[str, torch.Tensor],
                     tokenizer=None, max_shard_mb: float | None = None) -> Path:
    """Write config.json, the weights and the tokenizer's files into ``directory``: the weights in
    ``model.safetensors``, or in shards of at most ``max_shard_mb`` MiB with an index, as
    transformers writes them.

    Files are written into a temporary directory beside ``directory`` and moved in by
    ``install_files`` (weights first, config.json last), so a crash never leaves a half-written file.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        weights = _write_weights(tmp, tensors, max_shard_mb)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        install_files(tmp, directory, weights)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
