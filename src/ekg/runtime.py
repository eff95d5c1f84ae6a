"""Device and mixed-precision choices, in one place."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .errors import EkgError

AMP_MODES = ("auto", "off", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EkgError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EkgError(f"device {name} was asked for but no CUDA GPU is available; use `device` cpu")
    return dev


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device`` (None = full precision).

    ``auto`` uses bf16 on GPUs that support it, fp16 on older GPUs, and full precision on the CPU
    (CPU autocast is slower than fp32 on most CPUs)."""
    if mode not in AMP_MODES:
        raise EkgError(f"`amp` must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise EkgError("`amp` fp16 needs a CUDA GPU; use `amp` bf16 or off on the CPU")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
