"""Device and dtype names as users type them ("cuda", "bf16") turned into torch objects."""

from __future__ import annotations

import torch

from .errors import InputError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch floating dtype, or one of "fp32"/"float32"/"bf16"/"bfloat16"/"fp16"/"float16"."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise InputError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16 (or a torch floating dtype)")


def resolve_device(device) -> torch.device:
    """None means CUDA when available, else CPU; a CUDA device that is not there is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev
