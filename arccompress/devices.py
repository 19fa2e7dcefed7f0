"""Where the work runs: devices and dtypes, resolved from what callers name, and waiting for a device's queue."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A torch device, CUDA by default when there is one; InputError for a name torch does not know or a
    CUDA device on a machine without one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r} ({e})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (what the released weights are), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A floating-point torch dtype from a dtype or its name; the device's default for None."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise InputError(f"unknown dtype {dtype!r}")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise InputError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return dtype


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): what a timer must do before it stops."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
