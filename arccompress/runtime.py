"""Where the work runs and what it prints: devices, dtypes, progress bars, quiet libraries.

Nothing here imports transformers at import time, so every module (the store, the corpus job, the CLI)
can use these helpers without paying for it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


def interactive_output() -> bool:
    """True when a progress bar would be seen: a terminal on stderr, or a notebook kernel."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(**kwargs: Any):
    """tqdm: the notebook widget when ipywidgets can draw it, else the text bar (no 'IProgress not found')."""
    if "ipykernel" in sys.modules:
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm(**kwargs)
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm(**kwargs)


@contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """Hold back bitsandbytes' per-call log lines (one "MatMul8bitLt: inputs will be cast" per layer and step,
    "Failed to load CPU gemm_4bit_forward" on every CPU load): it still computes the same, and errors still show."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="bitsandbytes")
            yield
    finally:
        logger.setLevel(level)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' weight-loading progress bars and info lines, and bitsandbytes, for one load."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with quiet_bitsandbytes():
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
