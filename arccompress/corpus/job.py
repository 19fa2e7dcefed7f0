"""`compress_corpus`: a corpus into a ContextStore, resumable, in this process or on a Ray cluster.

Both engines run the same plan: the source is read and checked by the corpus rule of `arccompress.sources`
(bad rows raise or are left out and reported), ids already stored are left out (a job that died or was stopped
resumes from what it committed), and the rows left are cut into work units of `batch_size` consecutive rows, each
compressed by one `Compressor.compress` call and written as one data file of the store: committed at once by the
local engine, in batches by the Ray engine's driver. With the same units, device and thread count, both engines
store exactly the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store.codec import parse_codec
from ..compressor import check_batching
from ..errors import InputError
from ..extras import require
from ..console import interactive_output, progress_bar
from ..devices import resolve_device
from ..sources import BadRow, CheckedRows, check_bad_row_choice, open_source
from ..store import ContextStore
from .worker import EncodeBatch, commit_unit, create_store, load_store

ENGINES = ("local", "ray")


@dataclass
class CorpusSummary:
    """What a compress_corpus job did."""

    store: str
    texts: int  # source rows stored by this job
    already_stored: int  # source rows whose id the store held before the job
    tokens: int  # encoder tokens of the texts compressed
    seconds: float
    bytes_written: int  # store data written by this job
    engine: str
    bad_rows: list[BadRow] = field(default_factory=list)  # left out (on_bad_row="skip")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        bad = f", {len(self.bad_rows)} bad rows left out" if self.bad_rows else ""
        return (f"compressed {self.texts} texts ({self.already_stored} already stored{bad}) into {self.store}: "
                f"{self.tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s, {self.engine}), "
                f"{self.bytes_written / 1e6:.2f} MB written")


def compress_corpus(
    source: Any,
    store_path: str | Path,
    *,
    encoder: str | Path,
    codec: str | None = None,
    bits_per_dim: float | None = None,
    engine: str = "local",
    num_workers: int | None = None,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float | None = None,
    batch_size: int = 256,
    chunk_size: int | None = None,
    train_size: int = 16384,
    on_bad_row: str = "raise",
    id_field: str = "id",
    text_field: str = "text",
    address: str | None = None,
    show_progress: bool | None = None,
    verbose: bool = False,
    storage_options: Mapping[str, str] | None = None,
    **compressor_kwargs: Any,
) -> CorpusSummary:
    """Compress every `{id, text}` row of `source` not yet in the store at `store_path`; return a summary.

    source: a JSONL or Parquet path (or folder), `arccompress.sources.TextFiles`, a list of `(id, text)` pairs or
    dicts, a `datasets.Dataset` or a Ray `Dataset`. Ids are strs or ints (ints become their decimal text).
    store_path: a folder or an object store URI (`s3://`, `gs://`, `az://`; `storage_options` reach it).
    on_bad_row="raise" (default) stops at the first bad row, naming it, before anything is compressed; "skip"
    leaves bad rows out and lists them in the summary. A row whose id another row also carries is bad, both.

    engine="local" compresses in this process. engine="ray" runs on a Ray cluster (the one `ray.init` joined, else
    `address`, else a new local one): `num_workers` actors (default: one per GPU, else 2), each loading the encoder
    once, with `num_gpus_per_worker` GPUs (default 1 when the cluster has GPUs) and `num_cpus_per_worker` CPUs.
    This process only reads the source: the store is created (for pq: the codebook trained on the first
    `train_size` vectors) by a Ray task with a worker's resources, and `device` (in compressor_kwargs) applies to
    the workers. Ray prints nothing of its own unless `verbose`. `compressor_kwargs` go to
    `Compressor.from_pretrained` (tokenizer, head, dtype, device, revision, token, ...).
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be 'local' or 'ray', not {engine!r}")
    check_bad_row_choice(on_bad_row)
    check_batching(chunk_size, batch_size, 1)
    if codec is not None:
        parse_codec(codec)
    if engine == "local":
        resolve_device(compressor_kwargs.get("device"))  # arguments first: before reading a large source
    else:
        _require_ray()
    checked = CheckedRows(open_source(source, pair_fields=(id_field, text_field)), id_field, text_field, on_bad_row)
    if show_progress is None:
        show_progress = interactive_output()
    start = time.perf_counter()
    settings = dict(codec=codec, bits_per_dim=bits_per_dim, train_size=train_size, storage_options=storage_options)
    if engine == "local":
        store = load_store(store_path, encoder=encoder, **settings, **compressor_kwargs)
        stored = set(store)
        before_bytes = _data_bytes(store)
        create_store(store, (text for _, text in checked.rows(stored)), chunk_size=chunk_size)
        tokens = _run_local(store, work_units(checked.rows(stored), batch_size), len(checked.ids - stored),
                            chunk_size=chunk_size, show_progress=show_progress)
    else:
        from .ray_engine import Resources, quiet_ray, run_ray_job

        with quiet_ray(address=address, verbose=verbose):
            resources = Resources.plan(num_workers, num_gpus_per_worker, num_cpus_per_worker)
            before = ContextStore(store_path, storage_options=storage_options) \
                if ContextStore.exists(store_path, storage_options=storage_options) else None
            stored = set(before) if before is not None else set()
            before_bytes = _data_bytes(before) if before is not None else 0
            tokens = run_ray_job(work_units(checked.rows(stored), batch_size), store_path, encoder=encoder,
                                 chunk_size=chunk_size, resources=resources, compressor_kwargs=compressor_kwargs,
                                 todo=len(checked.ids - stored), show_progress=show_progress, **settings)
        store = ContextStore(store_path, storage_options=storage_options)
    store.refresh()
    now = set(store)
    return CorpusSummary(
        store=str(store_path), texts=len((checked.ids - stored) & now), already_stored=len(checked.ids & stored),
        tokens=tokens, seconds=time.perf_counter() - start, bytes_written=_data_bytes(store) - before_bytes,
        engine=engine, bad_rows=checked.bad_rows,
    )


def work_units(rows: Iterable[tuple[str, str]], size: int) -> Iterator[tuple[list[str], list[str]]]:
    """Consecutive groups of `size` (ids, texts): the work units of both engines."""
    ids: list[str] = []
    texts: list[str] = []
    for key, text in rows:
        ids.append(key)
        texts.append(text)
        if len(ids) == size:
            yield ids, texts
            ids, texts = [], []
    if ids:
        yield ids, texts


def _run_local(store: ContextStore, units: Iterator[tuple[list[str], list[str]]], todo: int, *,
               chunk_size: int | None, show_progress: bool) -> int:
    """Compress and commit each work unit in this process, as the Ray engine's actors and write tasks do; return
    the encoder tokens of the rows stored."""
    worker = EncodeBatch(store, chunk_size=chunk_size)
    writer = store.fragment_writer()
    tokens = 0
    with progress_bar(total=todo, unit="text", desc="compress", disable=not show_progress) as bar:
        for ids, texts in units:
            tokens += commit_unit(writer, worker.encode(ids, texts))[1]
            bar.update(len(ids))
    return tokens


def _require_ray() -> None:
    require("ray", "engine='ray' (--engine ray)")


def _data_bytes(store: ContextStore) -> int:
    """The size of a store's data files (0 before it is created)."""
    return store.stats()["data_bytes"] if store.manifest is not None else 0
