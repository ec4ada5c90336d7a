"""Device and dtype names as users type them ("cuda", "bf16") turned into torch objects."""

from __future__ import annotations

import torch

from .errors import InputError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def native_bf16_cpu() -> bool:
    """True where oneDNN runs bf16 matmuls natively on this CPU (AVX-512 BF16 or AMX): bf16
    weights then stream at full speed through prepacked kernels (``asarm.fastpass``). Elsewhere
    bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def fastest_dtype(device: torch.device) -> torch.dtype:
    """What ``dtype="auto"`` means: the activation dtype measured fastest for generation on this
    device class, fixed in code (never timed at run time, so a seed keeps its output on a
    machine): bf16 on a CPU with native bf16 — a pass is bound by reading the weights, and bf16
    reads half the bytes (results/bench-cpu-pass) — fp32 everywhere else (CUDA: not measured yet)."""
    return torch.bfloat16 if device.type == "cpu" and native_bf16_cpu() else torch.float32


def resolve_dtype(dtype, device: torch.device | None = None) -> torch.dtype | None:
    """None, a torch floating dtype, or one of "fp32"/"float32"/"bf16"/"bfloat16"/"fp16"/"float16";
    "auto" is ``fastest_dtype(device)`` (CPU when no device is given)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return fastest_dtype(device if device is not None else torch.device("cpu"))
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise InputError(f"unknown dtype {dtype!r}: use fp32, bf16, fp16 or auto (or a torch floating dtype)")


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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r} requested but MPS (an Apple GPU) is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):  # meta holds no data; other backends are untested
        raise InputError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev
