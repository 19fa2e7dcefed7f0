"""Compressing a corpus into a ContextStore: in this process, or on a Ray cluster.

    from arccompress import compress_corpus
    summary = compress_corpus("wiki.jsonl", "wiki-store", encoder="kyutai/ARC8_Encoder_Mistral", codec="pq",
                              bits_per_dim=1.0, engine="ray", num_workers=8, num_gpus_per_worker=1)

Modules, whose imports run one way: `job` (the public entry, `compress_corpus`) -> `ray_engine` (the Ray Data
pipeline, `StoreDatasink`) -> `worker` (`EncodeBatch`, where the encoder runs); rows come from
`arccompress.sources`. `StoreDatasink` is imported from here only when asked for, as it needs Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from .job import CorpusSummary, compress_corpus, work_units
from .worker import EncodeBatch, create_store, load_store

__all__ = ["CorpusSummary", "EncodeBatch", "StoreDatasink", "compress_corpus", "create_store", "load_store",
           "work_units"]


def __getattr__(name: str) -> Any:
    if name == "StoreDatasink":  # needs ray
        return importlib.import_module(".ray_engine", __name__).StoreDatasink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
