"""The corpus job on Ray Data: the driver decides, actors encode, write tasks write data files, the driver commits.

The driver reads and checks the source (`arccompress.sources`, the same rule as the local engine), leaves out
the ids already stored, cuts the rest into the same work units as the local engine (consecutive `batch_size`
rows) and puts each into the object store. Ray never reads the source itself:

    ray.data.from_arrow_refs(units).map_batches(EncodeBatch, ...).map_batches(write_unit, ...)

Each write task writes its unit's rows as Lance data files of the store (invisible until committed) and hands the
driver what it wrote; the driver commits what has come in, one version at a time (every `COMMIT_SECONDS`, and at
the end): so a job that dies resumes from its last commit, every id is stored once (see `commit_units`), and a
write task retried by Ray writes files that are simply never committed. `StoreDatasink` is the same pattern for
a pipeline of your own: one commit when the write completes.

The driver loads no model: the store is opened, checked against the encoder and created (a pq codebook
trained) by one Ray task with a worker's resources, before the actors start; so a GPU is never taken on the
driver. Actors are restarted and their tasks retried by Ray when they die. The store may be on a file system
every node sees or on an object store (`s3://`, `gs://`, `az://`, with storage options).

Ray is quiet unless `verbose`: its workers' output is not forwarded, Ray Data's progress bars and start-up lines
are off (they still go to the session's log files under /tmp/ray); progress is our own bar.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.data import DataContext, Datasink
from ray.data.block import BlockAccessor

from ..errors import ArcCompressError, InputError
from ..console import progress_bar
from ..store import ContextStore, FragmentWriter, Written
from .worker import EncodeBatch, commit_written, create_store, load_store

__all__ = ["Resources", "StoreDatasink", "quiet_ray", "run_ray_job"]

COMMIT_SECONDS = 30.0  # the driver commits what the write tasks wrote at least this often


class StoreDatasink(Datasink):
    """A Ray Data datasink adding blocks of store rows (from EncodeBatch) to a ContextStore: each write task writes
    its blocks as data files of the store, and the driver commits them all in one version when the write completes
    (an id in two blocks is stored once: see `commit_units`). The store is opened once, on the driver, when the
    write starts; the write tasks hold its light `FragmentWriter`."""

    def __init__(self, store: str | Path, *, storage_options: Mapping[str, str] | None = None):
        self.store_path = str(store)
        self.storage_options = dict(storage_options) if storage_options else None
        self.rows = 0
        self.tokens = 0
        self._writer: FragmentWriter | None = None

    def on_write_start(self, schema: Any = None) -> None:
        self._writer = ContextStore(self.store_path, storage_options=self.storage_options).fragment_writer()

    def write(self, blocks: Any, ctx: Any) -> list[dict[str, Any]]:
        """Each block written as data files of its own: blocks handed to one task together (Ray's
        `min_rows_per_write`) may repeat an id, which the commit stores once, as it does across tasks."""
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        return [self._writer.write(t).to_row() for t in tables]

    def on_write_complete(self, write_result: Any) -> None:
        parts = [Written.from_row(row) for rows in write_result.write_returns for row in rows]
        self.rows, self.tokens = commit_written(self._writer, parts) if parts else (0, 0)


def write_unit(batch: pa.Table, writer: FragmentWriter) -> pa.Table:
    """A write task of the corpus job: one unit's rows written as data files (not committed), described."""
    rows = [writer.write(batch).to_row()] if batch.num_rows else []
    return pa.Table.from_pylist(rows, schema=Written.schema())


@dataclass(frozen=True)
class Resources:
    """What each encoder actor (and the task creating the store) asks Ray for."""

    num_workers: int
    num_gpus: float
    num_cpus: float

    @classmethod
    def plan(cls, num_workers: int | None, num_gpus_per_worker: float | None,
             num_cpus_per_worker: float | None) -> Resources:
        """Defaults from the cluster: one actor per GPU (else 2), each with one GPU and one CPU; CPU actors
        share the CPUs but leave one to the write tasks."""
        gpus = ray.cluster_resources().get("GPU", 0)
        if num_gpus_per_worker is None:
            num_gpus_per_worker = 1 if gpus else 0
        if num_gpus_per_worker > gpus:
            raise InputError(f"num_gpus_per_worker={num_gpus_per_worker:g} (--num-gpus-per-worker), and the Ray cluster "
                             f"has {gpus:g} GPUs: ask for at most {gpus:g}, or leave it out to compress on the CPUs")
        if num_workers is None:
            num_workers = int(gpus // num_gpus_per_worker) if num_gpus_per_worker else 2
        if num_workers < 1:
            raise InputError(f"num_workers must be at least 1 (--num-workers), not {num_workers}")
        if num_cpus_per_worker is None:
            cpus = ray.cluster_resources().get("CPU", 1)
            num_cpus_per_worker = 1.0 if num_gpus_per_worker else max(0.25, (cpus - 1) / num_workers)
        return cls(num_workers, float(num_gpus_per_worker), float(num_cpus_per_worker))


def _prepare_store(store_path: str, encoder: str, settings: dict[str, Any], compressor_kwargs: dict[str, Any],
                   units: list[Any]) -> int:
    """A Ray task: open the store with the encoder (refused if it holds another's), create it if new (a pq
    codebook trained on the first units' texts, on this worker's device); return the vectors trained on."""
    store = load_store(store_path, encoder=encoder, codec=settings["codec"], bits_per_dim=settings["bits_per_dim"],
                       train_size=settings["train_size"], storage_options=settings["storage_options"],
                       **compressor_kwargs)
    texts = (t for ref in units for t in ray.get(ref).column("text").to_pylist())
    return create_store(store, texts, chunk_size=settings["chunk_size"])


def run_ray_job(units: Iterator[tuple[list[str], list[str]]], store_path: str | Path, *, encoder: str | Path,
                codec: str | None, bits_per_dim: float | None, train_size: int, chunk_size: int | None,
                storage_options: Mapping[str, str] | None, resources: Resources, compressor_kwargs: dict[str, Any],
                todo: int, show_progress: bool) -> int:
    """Compress the work units into the store on the Ray cluster `ray.init` joined; return the encoder tokens
    stored. Errors the package raises on purpose in a task come out as themselves, not wrapped by Ray."""
    refs = [ray.put(pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}))
            for ids, texts in units]
    encoder = str(encoder)
    options = dict(storage_options) if storage_options else None
    settings = {"codec": codec, "bits_per_dim": bits_per_dim, "train_size": train_size, "chunk_size": chunk_size,
                "storage_options": options}
    prepare = ray.remote(_prepare_store).options(num_gpus=resources.num_gpus or None, num_cpus=resources.num_cpus,
                                                 max_retries=0)
    with _unwrapped_errors():
        ray.get(prepare.remote(str(store_path), encoder, settings, compressor_kwargs, refs))
    if not refs:
        return 0
    writer = ContextStore(store_path, storage_options=options).fragment_writer()
    written = ray.data.from_arrow_refs(refs).map_batches(
        EncodeBatch, fn_constructor_kwargs=dict(store=str(store_path), encoder=encoder, chunk_size=chunk_size,
                                                storage_options=options, **compressor_kwargs),
        compute=ray.data.ActorPoolStrategy(size=resources.num_workers), num_gpus=resources.num_gpus or None,
        num_cpus=resources.num_cpus, batch_size=None, batch_format="pyarrow",  # one call per block: per work unit
    ).map_batches(write_unit, fn_kwargs=dict(writer=writer), batch_size=None, batch_format="pyarrow",
                  num_cpus=0)  # the write tasks take no CPU slot: the actors may hold every slot of the cluster
    tokens = 0
    with _unwrapped_errors(), progress_bar(total=todo, unit="text", desc="compress", disable=not show_progress) as bar:
        pending: list[Written] = []
        last = time.monotonic()
        for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
            pending += [Written.from_row(row) for row in batch.to_pylist()]
            if pending and time.monotonic() - last >= COMMIT_SECONDS:
                rows, n = commit_written(writer, pending)
                bar.update(rows)
                tokens, pending, last = tokens + n, [], time.monotonic()
        if pending:
            rows, n = commit_written(writer, pending)
            bar.update(rows)
            tokens += n
    return tokens


@contextmanager
def _unwrapped_errors() -> Iterator[None]:
    """An ArcCompressError raised in a Ray task or actor, re-raised as itself (one line in the CLI)."""
    try:
        yield
    except ray.exceptions.RayError as e:
        cause = _cause(e)
        if isinstance(cause, ArcCompressError):
            raise cause from None
        raise


def _cause(error: BaseException | None) -> BaseException | None:
    """The exception of our own family a Ray error carries (a task's error comes as a RayTaskError that may also
    derive from the cause's class, its message holding the remote traceback: the cause itself is what we want)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.RayTaskError):
            error = error.cause
        elif isinstance(error, ArcCompressError):
            return error
        else:
            error = error.__cause__ or error.__context__
    return None


@contextmanager
def quiet_ray(*, address: str | None, verbose: bool) -> Iterator[None]:
    """Join the cluster at `address` (or start a local one) unless this process joined one already, quietly unless
    `verbose`: workers' output not forwarded, Ray's C++ and Python log lines kept in its session files (under
    /tmp/ray), Ray Data's progress bars and execution lines off for this job (restored after it)."""
    if not ray.is_initialized():
        # the processes ray.init starts read their C++ log level from the environment when they start
        backend = {} if verbose or "RAY_BACKEND_LOG_LEVEL" in os.environ else {"RAY_BACKEND_LOG_LEVEL": "fatal"}
        with _environment(backend), warnings.catch_warnings():
            if not verbose:  # Ray starts its processes by fork and exec: no Lance runs in them (see store.location)
                warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
            ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                     logging_level=logging.INFO if verbose else logging.ERROR)
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.verbose_progress)
    console = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in console]
    if not verbose:
        ctx.enable_progress_bars = ctx.print_on_execution_start = False
        ctx.execution_options.verbose_progress = False
        for h in console:
            h.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.verbose_progress = saved
        for h, level in zip(console, levels):
            h.setLevel(level)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the duration of a block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

