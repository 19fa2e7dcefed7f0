"""What the user sees while the work runs: progress bars where someone watches, libraries' own chatter held back.

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
