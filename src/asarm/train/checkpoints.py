"""Run-folder checkpoints: atomic saves, reading without pickle, resume with fallback.

``checkpoints/step-XXXXXXX/`` holds ``config.json`` and ``model.safetensors`` (the weights) and
the trainer state split in two: ``trainer_state.safetensors`` (every tensor: optimizer moments,
RNG states) and ``trainer_state.json`` (everything else, with a reference in place of each
tensor). Neither format can run code when read, so a file planted in a run folder is at worst
unreadable. Checkpoints of older versions (``trainer_state.pt``, a pickle) are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.

A save writes a hidden temporary folder, fsyncs it, renames it into place, then moves the
``LATEST`` (and ``BEST``) pointers and deletes older folders: a crash or a full disk at any
moment leaves the previous checkpoint complete and pointed at. The folder LATEST named before
the save is kept too, so a checkpoint damaged later (a bad sector, a stray edit) always leaves
resume an older one to fall back to.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
FORMAT = "asarm-trainer-state/1"
STEP_DIR = re.compile(r"^step-(\d+)$")
# What a full disk or a read-only folder raises: OSError from Python, SafetensorError from the
# safetensors writer, RuntimeError from torch.save's zip writer.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def stderr(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


class RunFolderError(CheckpointError):
    """The run folder cannot be written (disk full, read-only, no permission)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def writing(what: str, cleanup: Path | None = None):
    """Turn a failed write into one RunFolderError line, removing the temporary ``cleanup``."""
    try:
        yield
    except WRITE_ERRORS as exc:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise RunFolderError(f"cannot write {what}: {_reason(exc)} (nothing saved before was lost)") from None


# --- durable writes ----------------------------------------------------------------------------
def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (renames, new files) durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; nothing more to do there
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then the directory itself."""
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a part of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_pointer(path: Path, value: str) -> None:
    write_text_atomic(path, value + "\n")


def read_pointer(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


# --- the trainer state without pickle ------------------------------------------------------------
def encode_state(obj, tensors: dict[str, torch.Tensor], path: str = "s"):
    """A JSON-able copy of ``obj`` with each tensor moved to ``tensors`` under a key. Tuples and
    dicts with non-string keys (optimizer state, ranks) are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, (list, tuple)):
        items = [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, encode_state(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state: cannot store a {type(obj).__name__} without pickle")


def decode_state(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of ``encode_state``; builds only containers, numbers, strings and tensors."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"tensor {obj['__tensor__']!r} is missing from {STATE_TENSORS}")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_key(k): decode_state(v, tensors) for k, v in obj["__items__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def _key(k):
    if isinstance(k, (str, int, float, bool)) or k is None:
        return k
    raise CheckpointError(f"unexpected key {k!r} in {STATE_JSON}")


# --- RNG states ----------------------------------------------------------------------------------
def rng_states() -> dict:
    """This process's global RNG states in storable form (numpy's key array as a list)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = (kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    if "numpy" in states:
        with contextlib.suppress(ImportError):
            import numpy as np

            kind, keys, *rest = states["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


# --- saving ----------------------------------------------------------------------------------------
def step_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders (``step-N``; temporaries start with a dot), newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _write_checkpoint_files(directory: Path, model, state: dict) -> None:
    model.config.save(directory)
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
               if k != "lm_loss.weight"}  # tied to the word embedding: stored once
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    # the JSON last: a folder with a readable trainer_state.json has all its files
    (directory / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": encoded}) + "\n")
    fsync_tree(directory)


def save_checkpoint(ckpt_root: Path, model, state: dict, best: bool = False) -> Path:
    """Atomically write ``step-XXXXXXX`` for ``state["step"]``, point LATEST (and BEST) at it and
    delete every other folder but the previous LATEST. On failure the temporary folder is
    removed, the pointers still name the previous checkpoint, and a RunFolderError says why."""
    name = f"step-{state['step']:07d}"
    previous = read_pointer(ckpt_root / "LATEST")
    final, tmp = ckpt_root / name, ckpt_root / f".{name}.tmp"
    with writing(f"checkpoint {final}", cleanup=tmp):
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_checkpoint_files(tmp, model, state)
        if final.exists():  # a folder of the same step from before a fallback: set it aside first
            os.replace(final, ckpt_root / f".{name}.old.tmp")
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        write_pointer(ckpt_root / "LATEST", name)
        if best:
            write_pointer(ckpt_root / "BEST", name)
    keep = {read_pointer(ckpt_root / "LATEST"), read_pointer(ckpt_root / "BEST"), previous}
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return final


# --- reading -------------------------------------------------------------------------------------
def _read_json_state(directory: Path) -> dict:
    try:
        doc = json.loads((directory / STATE_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{STATE_JSON} is unreadable or truncated ({_reason(exc)})") from None
    except RecursionError:  # planted or damaged: a JSON value nested thousands deep
        raise CheckpointError(f"{STATE_JSON} is not a trainer state (JSON nested too deeply)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{STATE_JSON} is not an asarm trainer state ({FORMAT})")
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
    except Exception as exc:  # missing, truncated or corrupt: safetensors raises several types
        raise CheckpointError(f"{STATE_TENSORS} is unreadable or truncated ({_reason(exc)})") from None
    try:
        return decode_state(doc.get("state"), tensors)
    except RecursionError:
        raise CheckpointError(f"{STATE_JSON} is not a trainer state (nested too deeply)") from None


def _read_legacy_state(directory: Path) -> dict:
    """A ``trainer_state.pt`` of an older asarm: tensors and plain containers only (numpy's RNG
    key array is the one other type allowed); a planted pickle fails here without running."""
    safe: list = []
    with contextlib.suppress(ImportError, AttributeError):
        import numpy as np

        rebuild = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
        safe = [(rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct"),
                np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(directory / LEGACY_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only unpickling raises many types on bad or hostile files
        raise CheckpointError(f"{LEGACY_STATE} is unreadable or not plain data ({_reason(exc)})") from None


REQUIRED = ("step", "optimizer", "scheduler", "stream")


def read_trainer_state(directory: Path) -> dict:
    """The trainer state of one checkpoint folder, or a CheckpointError saying what is wrong."""
    if not directory.is_dir():
        raise CheckpointError("the folder does not exist")
    if (directory / STATE_JSON).exists() or not (directory / LEGACY_STATE).exists():
        state = _read_json_state(directory)
    else:
        state = _read_legacy_state(directory)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"incomplete trainer state (needs {', '.join(REQUIRED)})")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"the trainer state's step must be an integer >= 0, got {step!r}")
    check_rng_states(state.get("rng"))
    return state


def check_rng_states(by_rank) -> None:
    """A CheckpointError unless ``by_rank`` (the state's "rng": rank -> ``rng_states()``) holds
    RNG states this process can restore: a bad one would otherwise fail mid-resume or, worse,
    restore a generator that no longer repeats the run."""
    if by_rank is None:
        return
    if not isinstance(by_rank, dict) or not all(isinstance(r, int) and r >= 0 for r in by_rank):
        raise CheckpointError("bad RNG state: expected one entry per rank")
    expected = torch.get_rng_state()
    for rank, states in by_rank.items():
        where = f"bad RNG state of rank {rank}"
        if not isinstance(states, dict) or "torch" not in states:
            raise CheckpointError(f"{where}: needs the torch generator's state")
        t = states["torch"]
        if not isinstance(t, torch.Tensor) or t.dtype != expected.dtype or t.shape != expected.shape:
            raise CheckpointError(f"{where}: the torch generator state is not a {tuple(expected.shape)} uint8 tensor")
        try:
            if "python" in states:  # (an older asarm's trainer_state.pt may have only torch and numpy)
                random.Random().setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
        except (TypeError, ValueError, OverflowError):
            raise CheckpointError(f"{where}: the python generator state is not one") from None
        cuda = states.get("cuda")
        if cuda is not None and not (isinstance(cuda, (list, tuple)) and all(
                isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda)):
            raise CheckpointError(f"{where}: the CUDA generator states are not uint8 tensors")


def load_checkpoint_weights(model, directory: Path) -> None:
    from ..checkpoint import load_state_dict, match_state_dict

    state = match_state_dict(model, load_state_dict(directory), str(directory))
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def load_newest(candidates: list[Path], load: Callable[[Path], dict], log=None) -> tuple[Path, dict]:
    """``load(folder)`` on each candidate in turn until one works; a one-line warning for each
    that does not, and a CheckpointError naming them all when none does."""
    log = log or stderr
    problems = []
    for directory in candidates:
        try:
            state = load(directory)
        except CheckpointError as exc:
            problems.append(f"{directory.name}: {exc}")
            log(f"warning: checkpoint {directory} is unreadable ({exc}); trying an older one")
            continue
        return directory, state
    if not problems:
        raise CheckpointError("no checkpoint found")
    raise CheckpointError("no readable checkpoint: " + "; ".join(problems))


def candidates(ckpt_root: Path, pointer: str | None = None) -> list[Path]:
    """The folder ``pointer`` (LATEST/BEST) names first when given, then every step folder newest
    first. A pointer to a deleted folder stays in the list so the warning names it."""
    found = step_dirs(ckpt_root)
    name = read_pointer(ckpt_root / pointer) if pointer else None
    if name is None or not STEP_DIR.match(name):  # no pointer, or not a folder name of ours
        return found
    first = ckpt_root / name
    return [first] + [p for p in found if p != first]
