"""The training configuration: ``TrainConfig``, read from JSON (a path or a shipped name) plus
``--set key=value`` overrides. The keys are documented in docs/training.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import ASARMConfig
from ..errors import InputError
from ..ranks import random_order_probability

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run; ``validate()`` checks them all and names each problem."""

    # model: either a model config (ASARMConfig fields; vocab_size is taken from the tokenizer)
    # or a local HF XLNet checkpoint directory to fine-tune.
    model: dict = dataclasses.field(default_factory=dict)
    init_from: str | None = None
    # tokenizer: a directory with tokenizer files; None trains one (or uses init_from's).
    tokenizer: str | None = None
    tokenizer_kind: str = "text"  # "text" | "code"
    tokenizer_vocab_size: int = 8192
    tokenizer_max_chars: int | None = None  # train the tokenizer on at most this many characters
    # data
    data: list = dataclasses.field(default_factory=list)
    valid_data: list | None = None  # separate validation sources; else a held-out split by document
    valid_fraction: float = 0.02
    max_chars: int | None = None  # read at most this many characters of training data
    seq_len: int = 256
    # optimisation
    batch_size: int = 16  # per rank and micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.98)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # the paper's masking
    mask_warmup_steps: int = 5000
    mask_start: float = 0.15
    mask_low: float = 0.85
    mask_high: float = 0.99
    random_order: bool | float = False  # or p in [0, 1]: that share of rows in random orders (a mixture)
    # validation
    eval_every: int = 200
    eval_chunks: int = 64
    eval_batch_size: int = 16
    eval_seed: int = 1234
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    max_time_minutes: float | None = None  # stop (checkpoint + export) after this much wall time
    out_dir: str = "runs/asarm"
    export_dtype: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    max_export_mb: float = 25.0
    max_shard_mb: float | None = None  # split the exported weights into shards of at most this many MiB
    export_dir: str | None = None  # default: <out_dir>/model
    # max_length written to the exported config.json ("seq_len": the training length, so that
    # samplers and evaluation harnesses stay within what the model saw; null: no limit)
    export_max_length: int | str | None = "seq_len"
    threads: int | None = None
    device: str | None = None
    mixed_precision: bool = True  # bf16 autocast on CUDA (CPU always trains in fp32)
    name: str | None = None
    trace_chunks: bool = False  # each rank appends its chunk indices per step to chunks-rank<r>.txt (tests)

    def validate(self) -> None:
        problems = []
        for key in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batch_size", "log_every",
                    "save_every", "eval_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{key} must be a positive integer, got {v!r}")
        for key in ("warmup_steps", "mask_warmup_steps", "eval_chunks"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"{key} must be a non-negative integer, got {v!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            problems.append(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.tokenizer_kind not in ("text", "code"):
            problems.append(f"tokenizer_kind must be text or code, got {self.tokenizer_kind!r}")
        if self.export_dtype not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"export_dtype must be auto, fp32, bf16 or fp16, got {self.export_dtype!r}")
        if not (0 < self.mask_start <= 1 and 0 < self.mask_low <= self.mask_high <= 1):
            problems.append("mask fractions must satisfy 0 < mask_start <= 1 and 0 < mask_low <= mask_high <= 1")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr!r}")
        if self.max_shard_mb is not None and (not isinstance(self.max_shard_mb, (int, float))
                                              or isinstance(self.max_shard_mb, bool) or self.max_shard_mb <= 0):
            problems.append(f"max_shard_mb must be a positive number or null, got {self.max_shard_mb!r}")
        try:
            random_order_probability(self.random_order)
        except InputError as exc:
            problems.append(str(exc))
        if not isinstance(self.mixed_precision, bool):
            problems.append(f"mixed_precision must be true or false, got {self.mixed_precision!r}")
        eml = self.export_max_length
        if not (eml is None or eml == "seq_len" or (isinstance(eml, int) and not isinstance(eml, bool) and eml > 0)):
            problems.append(f"export_max_length must be 'seq_len', null or a positive integer, got {eml!r}")
        if not self.data:
            problems.append("data: give at least one data source")
        if not self.model and not self.init_from:
            problems.append("give a model config ('model': {...}) or a checkpoint to fine-tune ('init_from')")
        if self.model:
            allowed = {f.name for f in dataclasses.fields(ASARMConfig)} - {"extra"}
            bad = sorted(set(self.model) - allowed)
            if bad:
                problems.append(f"unknown model config key(s) {bad} (known: {sorted(allowed)})")
        if problems:
            raise InputError("invalid training config: " + "; ".join(problems))

    def export_length(self) -> int | None:
        """max_length written into an exported config.json."""
        eml = self.export_max_length
        if eml == "seq_len":
            return self.seq_len
        if eml is not None and (not isinstance(eml, int) or isinstance(eml, bool) or eml < 1):
            raise InputError(f"export_max_length must be 'seq_len', null or a positive integer, got {eml!r}")
        return eml


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / f"{path}.json").is_file():
        p = CONFIG_DIR / f"{path}.json"  # a shipped config by name
    if not p.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config file {path} is not valid JSON ({exc})") from None
    except RecursionError:  # a JSON value nested thousands deep
        raise InputError(f"config file {path} is not a training config (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path}: expected a JSON object")
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys


def _apply_overrides(data: dict, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        value = _parse_value(value)
        if key.startswith("model."):
            data.setdefault("model", {})[key[6:]] = value
        else:
            data[key] = value


def load_config(path: str | None, overrides: list[str] | None = None, out: str | None = None) -> TrainConfig:
    """A TrainConfig from a JSON file (or a shipped config name) plus ``key=value`` overrides
    (values parsed as JSON, else taken as strings; ``model.d_model=256`` sets a model field)."""
    data = _read_config_file(path) if path is not None else {}
    _apply_overrides(data, overrides or [])
    if out is not None:
        data["out_dir"] = out
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown training config key(s) {unknown}; known keys: {sorted(known)}")
    for key in ("data", "valid_data"):  # one source may be given bare
        if isinstance(data.get(key), (str, dict)):
            data[key] = [data[key]]
    if "adam_betas" in data:
        data["adam_betas"] = tuple(data["adam_betas"])
    cfg = TrainConfig(**data)
    cfg.validate()
    return cfg
