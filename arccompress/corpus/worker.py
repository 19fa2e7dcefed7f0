"""Where the encoder runs: opening (or creating) a store with it, and `EncodeBatch`, which turns batches of
`{id, text}` rows into rows of the store's format.

Nothing here touches CUDA until a worker loads its encoder: an `EncodeBatch` is built and pickled by a parent
process (a Ray driver, a `datasets.map` parent) that may fork its workers, and CUDA cannot be used again in a
process forked after it was initialised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..compressor import Compressor
from ..errors import InputError, InputTypeError, NotFoundError, StoreError
from ..sources import check_row_text, normalize_id
from ..store import ContextStore, FragmentWriter, IdClashError, Written


def load_store(store_path: str | Path, *, encoder: str | Path, codec: str | None = None,
               bits_per_dim: float | None = None, train_size: int = 16384, num_threads: int | None = None,
               storage_options: Mapping[str, str] | None = None, **compressor_kwargs: Any) -> ContextStore:
    """The store at `store_path` (a folder or an object store URI) opened with the encoder loaded here
    (`compressor_kwargs` go to `Compressor.from_pretrained`); StoreError if the store holds another encoder's
    contexts or another codec. A store that does not exist yet is created by `create_store`."""
    if num_threads:
        torch.set_num_threads(num_threads)
    comp = Compressor.from_pretrained(encoder, **compressor_kwargs)
    return ContextStore(store_path, compressor=comp, codec=codec, bits_per_dim=bits_per_dim, train_size=train_size,
                        storage_options=storage_options)


def create_store(store: ContextStore, texts: Iterable[str], *, chunk_size: int | None = None) -> int:
    """Create a store opened by `load_store` if it does not exist yet: a pq codebook is trained on the first
    `train_size` vectors of `texts` (compressed here), other codecs need none. Return the vectors trained on."""
    if store.manifest is not None:
        return 0
    return store.train(texts, chunk_size=chunk_size)


def commit_unit(writer: FragmentWriter, table: pa.Table) -> tuple[int, int]:
    """Commit one work unit's rows (the local engine); return (rows the job now holds, their encoder tokens)."""
    return commit_units(writer, [table.column("id").to_pylist()], [table.column("num_tokens").to_pylist()],
                        lambda: writer.commit(table))


def commit_written(writer: FragmentWriter, parts: Sequence[Written]) -> tuple[int, int]:
    """Commit work units that write tasks wrote as data files, in one version (the Ray engine's driver); return
    (rows the job now holds, their encoder tokens)."""
    return commit_units(writer, [p.ids for p in parts], [p.num_tokens for p in parts],
                        lambda: writer.commit_written(parts))


def commit_units(writer: FragmentWriter, ids: list[list[str]], tokens: list[list[int]], commit: Any
                 ) -> tuple[int, int]:
    """Run `commit` for these units' rows; return (rows stored, their encoder tokens).

    The job left out every id stored before it started, so an id the store already holds was stored by this job:
    by a unit that was written twice (a retried task: identical rows, which the commit skips), or by one whose
    actor restarted and compressed the same texts again (`IdClashError.same_text`: the codes differ at float
    rounding). Both count as stored. Any other clash (another text under the id: another job wrote it) fails the
    job, naming the ids."""
    try:
        result = commit()
        stored = set(result.committed + result.identical)
    except IdClashError as e:
        others = [k for k in e.ids if k not in set(e.same_text)]
        if others:
            raise StoreError(f"{writer.location}: ids already stored with another text: "
                             f"{', '.join(map(repr, others[:5]))}{' and more' if len(others) > 5 else ''} (another "
                             f"job wrote them); this job stops, {len(e.committed)} rows of these units were stored") \
                from None
        stored = set(e.committed + e.same_text)
    counted: set[str] = set()
    rows = total = 0
    for keys, counts in zip(ids, tokens):
        for key, n in zip(keys, counts):
            if key in stored and key not in counted:  # an id in two units counts once
                counted.add(key)
                rows += 1
                total += n
    return rows, total


class EncodeBatch:
    """Compress batches of `{id, text}` rows into rows of a store's format: a worker of a corpus job.

    Ray Data: `ds.map_batches(EncodeBatch, fn_constructor_kwargs=dict(store=path, encoder=name), concurrency=N,
    num_gpus=1, batch_format="pyarrow")`; `datasets`: `ds.map(EncodeBatch(path, encoder=name), batched=True,
    with_rank=True, num_proc=n)` (rank r uses cuda:r; see the README for the start method). The encoder is
    loaded once per worker process, on first use; `store` may also be an open ContextStore with its compressor.
    The store must exist (its manifest says the codec and holds the codebook). Ids follow the corpus rule (str, or
    int as its decimal text); a row that breaks it raises InputError naming the row. Returns a pyarrow Table of
    store rows (`ContextStore.append` writes them).
    """

    def __init__(self, store: str | Path | ContextStore, *, encoder: str | Path | None = None,
                 chunk_size: int | None = None, num_threads: int | None = None,
                 storage_options: Mapping[str, str] | None = None, **compressor_kwargs: Any):
        if isinstance(store, ContextStore):
            if store.compressor is None:
                raise InputError("EncodeBatch needs a ContextStore opened with compressor=")
        elif not isinstance(store, (str, Path)):
            raise InputTypeError(f"store must be a path or a ContextStore, not {type(store).__name__}")
        elif encoder is None:
            raise InputError("EncodeBatch needs encoder= (a hub id or folder) with a store path")
        self._store = store if isinstance(store, ContextStore) else None
        self.store_path = store.location.uri if isinstance(store, ContextStore) else str(store)
        self.storage_options = dict(store.location.storage_options or {}) if isinstance(store, ContextStore) \
            else storage_options
        self.encoder = None if encoder is None else str(encoder)
        self.chunk_size = chunk_size
        self.num_threads = num_threads
        self.compressor_kwargs = compressor_kwargs

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_store": None}  # a worker process loads its own encoder

    def _open(self, rank: int | None) -> ContextStore:
        if self._store is None:
            kwargs = dict(self.compressor_kwargs)
            if rank is not None and kwargs.get("device") is None and torch.cuda.is_available():
                kwargs["device"] = f"cuda:{rank % torch.cuda.device_count()}"
            store = load_store(self.store_path, encoder=self.encoder, num_threads=self.num_threads,
                               storage_options=self.storage_options, **kwargs)
            if store.manifest is None:
                raise NotFoundError(f"{self.store_path}: no store there yet; create it first (compress_corpus does, "
                                    "or arccompress.corpus.create_store)")
            self._store = store
        return self._store

    def encode(self, ids: list[str], texts: list[str]) -> pa.Table:
        """Store rows of checked ids and texts: one `Compressor.compress` call, one table."""
        store = self._open(None)
        contexts = store.compressor.compress(texts, chunk_size=self.chunk_size, show_progress_bar=False)
        return store.encode(ids, contexts)

    def __call__(self, batch: Any, rank: int | None = None) -> pa.Table:
        self._open(rank)
        raw_ids, raw_texts = _column(batch, "id"), _column(batch, "text")
        ids, texts = [], []
        for k, (raw_id, text) in enumerate(zip(raw_ids, raw_texts, strict=True)):
            try:
                ids.append(normalize_id(raw_id))
                texts.append(check_row_text(text))
            except InputError as e:
                raise InputError(f"row {k} of the batch{'' if len(ids) <= k else f' (id {ids[k]!r})'}: {e}") from None
        return self.encode(ids, texts)


def _column(batch: Any, name: str) -> list:
    """A column of a batch (a pyarrow Table, or a dict of lists or numpy arrays) as a Python list."""
    names = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    if name not in names:
        raise InputError(f"a batch needs an {name!r} column (it has {', '.join(map(str, names))})")
    column = batch[name]
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column.to_pylist()
    return column.tolist() if isinstance(column, np.ndarray) else list(column)
