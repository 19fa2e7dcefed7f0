"""ContextStore: compressed contexts keyed by the caller's ids, in Parquet files that data tools read.

Layout of a store folder (format 3):

    manifest.json                    format, codec, what made the contexts (encoder fingerprint, head, sizes)
    codec-<hash>.safetensors         what reading needs besides the codes: the head's weights, the pq codebook
    data/part-<hash>.parquet         fragments: one row per context (id, counts, text hash, codes, checksum)
    .lock                            the commit lock (writers only; readers never lock)

The package, one concept per module: `format` (schema, fragment names, row checksums), `files` (atomic
creation, temporary files, the lock), `manifest` (identity, codec file), `spaces` (what each codec space
keeps and how reading applies the head), `index` (fragments and the id index), `reader` (verified reads),
`writer` (rows from contexts, the queue, the commit, `FragmentWriter`), `states` (a new store and an open
one), `convert` (stores of arccompress 0.1 and 0.2). `ContextStore` is the face over them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from ..codec import DEFAULT_CODEC, Codec
from ..compressor import Compressor
from ..context import CompressedContext
from ..errors import ContextNotFoundError, InputError, InputTypeError, StoreError
from ..tokenization import check_text
from .convert import convert
from .files import remove_dead_leftovers
from .format import DATA, MANIFEST, row_schema
from .manifest import Identity
from .states import NewStore, OpenStore
from .writer import (Batch, CommitResult, FragmentWriter, IdClashError, Queue, batch_table, checked_rows, context_batch,
                     show)

__all__ = ["CommitResult", "ContextStore", "FragmentWriter", "IdClashError", "row_schema"]


class ContextStore:
    """A folder of compressed contexts keyed by string ids.

    >>> store = ContextStore("wiki-store", compressor=comp, codec="pq", bits_per_dim=1.0)
    >>> store.add_texts(ids, texts)          # or store.add_many(ids, comp.compress(texts))
    >>> store.close()
    >>> ContextStore("wiki-store").get_many(["doc-7", "doc-42"])   # CompressedContexts, ready for a Generator

    codec: how contexts are kept (see `arccompress.codec`); the default, "bottleneck-float16", keeps the
    head's bottleneck in float16, which the decoder reads exactly as float16 post-head vectors at half
    their size. `dtype=` (arccompress 0.1) means the decoder-space codec of that dtype. A store opened
    again takes its codec from the manifest.

    Writers (threads, processes, machines sharing the folder) may add to one store at once: each id is stored
    once, by the first writer to commit it; a later writer committing it with other contents gets an
    IdClashError naming it (its other contexts are committed), with identical contents it counts as written.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        compressor: Any = None,
        codec: str | None = None,
        bits_per_dim: float | None = None,
        dtype: str | torch.dtype | None = None,
        head: int | str | None = None,
        flush_every: int = 256,
        train_size: int = 16384,
    ):
        """Open the store at `path`, or prepare a new one there (created on the first flush).

        compressor: if given, the store must hold contexts of this encoder (same weights, sizes and head) or
        StoreError is raised; a new store with a bottleneck or encoder codec needs it (reading applies the
        head). head: which decoder head to read an encoder-space store of a two-head encoder with (default:
        the compressor's). train_size: vectors the pq codebook is trained on (the first ones added, or
        those of `train`).
        """
        if compressor is not None:
            if not isinstance(compressor, Compressor):
                raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        for name, value in (("flush_every", flush_every), ("train_size", train_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, not {value!r}")
        if dtype is not None:
            if codec is not None:
                raise InputError("give codec= or dtype=, not both")
            codec = _dtype_name(dtype)
        self.path = Path(path)
        self.compressor = compressor
        self.flush_every = flush_every
        self.train_size = train_size
        self._lock = threading.RLock()
        self._queue = Queue()
        if ContextStore.exists(self.path):
            self._state: NewStore | OpenStore = OpenStore.open(self.path, compressor, codec, bits_per_dim, head)
        else:
            if codec is None and compressor is None:
                raise StoreError(f"{self.path} is a new store: pass compressor= (its default codec, {DEFAULT_CODEC}, "
                                 "keeps the head's bottleneck), or codec='float16' to keep decoder vectors without one")
            self._state = NewStore(self.path, compressor, codec or DEFAULT_CODEC, bits_per_dim, head)
        for folder in (self.path, self.path / DATA):
            remove_dead_leftovers(folder)

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The store's manifest (None until the store is created)."""
        return self._state.manifest

    @property
    def codec(self) -> Codec | None:
        """The store's codec (None until a store made without a compressor receives its first context)."""
        return self._state.codec

    # ------------------------------------------------------------------ ids

    def refresh(self) -> None:
        """Index the fragments committed since the last look (by this or any other writer)."""
        with self._lock:
            self._state.refresh()

    def __len__(self) -> int:
        with self._lock:
            self._state.refresh()
            return self._state.count() + sum(1 for k in self._queue if k not in self._state)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            if key in self._queue or key in self._state:
                return True
            self._state.refresh()  # another writer may have added it
            return key in self._state

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            self._state.refresh()
            keys = list(self._state.ids()) + [k for k in self._queue if k not in self._state]
        return iter(keys)

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> Iterator[tuple[str, CompressedContext]]:
        for key in list(self):
            yield key, self[key]

    # ------------------------------------------------------------------ reading

    def __getitem__(self, key: str) -> CompressedContext:
        return self.get(key)

    def get(self, key: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CompressedContext:
        """The context stored under `key` (KeyError if none), as the decoder reads it."""
        return self.get_many([key], device=device, dtype=dtype)[0]

    def get_many(
        self, keys: Sequence[str], *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> list[CompressedContext]:
        """The contexts stored under `keys`, in that order (e.g. a retriever's top-k): one read per row group,
        every row's checksum verified, the head applied on `device`."""
        if isinstance(keys, str):
            raise InputTypeError("get_many takes a list of ids; use store[id] for one")
        keys = list(keys)
        if not keys:
            return []
        with self._lock:
            missing = [k for k in keys if k not in self]
            if missing:
                raise ContextNotFoundError(f"not in {self.path}: {show(missing)}")
            state = self._state
            head = state.read_head
            if not state.space.cont_stored and head is None:
                raise StoreError(f"{self.path} keeps encoder vectors for several decoder heads: choose one with "
                                 "ContextStore(..., head=) or compressor=")
            unique = list(dict.fromkeys(keys))
            found = state.read([k for k in unique if k not in self._queue])  # id -> (row fields, stored vectors)
            found |= {k: self._queue.get(k) for k in unique if k in self._queue}
            vectors = [found[k][1] for k in unique]
            device = torch.device(device)
            rows = state.space.rows(torch.cat(vectors).to(device, torch.float32), [v.shape[0] for v in vectors],
                                    head, state.heads)
            decoded = dict(zip(unique, rows))
        ident = state.identity
        return [CompressedContext(
            embeddings=decoded[k] if dtype is None else decoded[k].to(dtype), num_tokens=found[k][0]["num_tokens"],
            encoder=ident.encoder, head=head if head is not None else 0, pooling_factor=ident.pooling_factor,
            chunk_size=found[k][0]["chunk_size"], encoder_fingerprint=ident.encoder_fingerprint or None) for k in keys]

    def stats(self) -> dict[str, Any]:
        """Sizes on disk next to the raw text's: the paper's storage claim, on your data."""
        with self._lock:
            self._state.refresh()
            s = self._state.stats()
        tokens, text, disk = s["tokens"], s["text_bytes"], s["data_bytes"]
        return s | {"bytes_per_token": disk / tokens if tokens else 0.0,
                    "text_bytes_per_token": text / tokens if tokens else 0.0,
                    "size_vs_text": disk / text if text else float("nan")}

    # ------------------------------------------------------------------ writing

    def _check_contexts(self, keys: list[str], contexts: list[CompressedContext]) -> Identity:
        """The identity the contexts must have (the store's, or for a new store made without a compressor the
        first context's); StoreError naming the first context that has another."""
        state = self._state
        for key, ctx in zip(keys, contexts):
            if not isinstance(ctx, CompressedContext):
                raise InputTypeError(f"expected a CompressedContext for {key!r}, not {type(ctx).__name__}")
        every_head = state.space.serves_every_head
        reference = state.identity or Identity.of_context(contexts[0])
        for key, ctx in zip(keys, contexts):
            if not reference.matches(ctx, every_head=every_head):
                mismatch = reference.mismatch(Identity.of_context(ctx), every_head=every_head)
                raise StoreError(f"context {key!r} does not belong in {self.path}: {mismatch} (store made by encoder "
                                 f"{reference.encoder!r})")
        return reference

    def _batch(self, keys: Sequence[str], contexts: Sequence[CompressedContext]) -> Batch | None:
        """Checked ids and contexts as a batch of rows (one device-to-host copy)."""
        keys, contexts = list(keys), list(contexts)
        if len(keys) != len(contexts):
            raise InputError(f"{len(keys)} ids for {len(contexts)} contexts")
        for key in keys:
            if not isinstance(key, str) or not key:
                raise InputTypeError(f"store ids must be non-empty str, not {key!r}")
            check_text(key, f"store id {key[:40]!r}")
        if len(set(keys)) != len(keys):
            raise InputError(f"id {next(k for k in keys if keys.count(k) > 1)!r} is given twice")
        if not keys:
            return None
        state = self._state
        identity = self._check_contexts(keys, contexts)
        batch = context_batch(keys, contexts, state.space, state.codec_for(identity), state.heads)
        state.adopt(identity)  # a new store made without a compressor takes its first contexts' sizes
        return batch

    def add(self, key: str, ctx: CompressedContext) -> None:
        """Queue one context under `key`; written with the next flush (every `flush_every`)."""
        self.add_many([key], [ctx])

    def add_many(self, keys: Sequence[str], contexts: Sequence[CompressedContext]) -> None:
        """Queue several contexts; all are checked before any is queued. Ids already stored are refused
        (IdClashError)."""
        with self._lock:
            keys = list(keys)
            self._state.refresh()  # once: what other writers committed
            stored = [k for k in keys if isinstance(k, str) and (k in self._queue or k in self._state)]
            if stored:
                raise IdClashError(f"already in the store {self.path}: {show(stored)}; nothing was queued",
                                   stored, [], [])
            batch = self._batch(keys, contexts)
            clash, first = None, 0
            while batch is not None and first < len(batch):  # a fragment every flush_every contexts
                room = self.flush_every - len(self._queue)
                last = min(len(batch), first + (room if room > 0 else self.flush_every))
                self._queue.add(batch.slice(first, last))
                first = last
                if len(self._queue) >= self.flush_every and clash is None:
                    try:
                        self._flush(explicit=False)
                    except IdClashError as e:  # the rest stays queued: committed by the next flush
                        clash = e
            if clash is not None:
                raise clash

    def add_texts(self, keys: Sequence[str], texts: Sequence[str], *, chunk_size: int | None = None,
                  **compress_kwargs: Any) -> None:
        """Compress texts with the store's compressor and queue them under `keys` (ids already stored are an error)."""
        comp = self._require_compressor("add_texts")
        keys, texts = list(keys), list(texts)
        if len(keys) != len(texts):
            raise InputError(f"{len(keys)} ids for {len(texts)} texts")
        for k in range(0, len(keys), self.flush_every):
            contexts = comp.compress(texts[k: k + self.flush_every], chunk_size=chunk_size, **compress_kwargs)
            self.add_many(keys[k: k + self.flush_every], contexts)

    def train(self, data: Iterable[str] | Iterable[CompressedContext], *, chunk_size: int | None = None) -> int:
        """Train the pq codebook on the first `train_size` vectors of these texts (compressed with the store's
        compressor, a batch at a time, until enough) or contexts, and create the store; return the number of
        vectors used. A store keeps the codebook it was created with."""
        with self._lock:
            self._state, used = self._state.train(data, self.flush_every, self.train_size, chunk_size)
            return used

    def create(self) -> None:
        """Write the store's manifest now, before anything is added (a pq store is created by `train`): what
        parallel writers need to exist before they start."""
        with self._lock:
            self._state = self._state.create()

    def _require_compressor(self, what: str) -> Any:
        if self.compressor is None:
            raise StoreError(f"{what} needs the store opened with compressor=")
        return self.compressor

    def flush(self) -> None:
        """Commit the queued contexts as one fragment (training the pq codebook first, if it has none yet).

        IdClashError if another writer committed some of their ids first with other contents: those leave the
        queue, the others are committed."""
        self._flush(explicit=True)

    def _flush(self, explicit: bool) -> None:
        with self._lock:
            if not self._queue:
                return
            state = self._state.ready(self._queue, explicit, self.train_size)
            if state is None:
                return  # keep collecting: the codebook is trained on the first train_size vectors
            self._state = state
            table = self._queue.table(state.codec)
            try:
                state.commit(table)
            except IdClashError:
                self._queue.clear()  # the refused ids leave the queue; the rest is committed
                raise
            self._queue.clear()

    def encode(self, keys: Sequence[str], contexts: Sequence[CompressedContext]) -> pa.Table:
        """Rows of the store's Parquet format for these contexts (a pyarrow Table), without writing them:
        what parallel workers produce and `append` (or a `FragmentWriter`) commits. The store must exist."""
        with self._lock:
            state = self._state.opened("encoding rows")
            batch = self._batch(keys, contexts)
            return batch_table(batch, state.codec) if batch is not None else row_schema().empty_table()

    def append(self, table: pa.Table) -> CommitResult:
        """Commit a table of rows (from `encode`) as one fragment. Ids already stored with identical rows (a
        retried task) are skipped as written; ids stored with other contents are refused with IdClashError,
        after the other rows are committed."""
        with self._lock:
            state = self._state.opened("appending rows")
            return state.commit(checked_rows(table, state.fragment_identity))

    def fragment_writer(self) -> FragmentWriter:
        """A light, picklable handle committing rows to this store (what a Ray write task holds): it carries the
        store's path and identity only, and builds its own id index once per process."""
        return self._state.opened("making a fragment writer").fragment_writer()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()

    def __repr__(self) -> str:
        return f"ContextStore({str(self.path)!r}, {len(self)} contexts, codec={self._state.codec_label})"

    # ------------------------------------------------------------------ older stores

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether a store was created at `path` (its manifest is there)."""
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def convert(cls, old: str | Path, new: str | Path, *, codec: str | None = None, **kwargs: Any) -> ContextStore:
        """Copy a store of arccompress 0.1 (safetensors shards + index.jsonl) or 0.2 (format 2) into a new store.

        A 0.1 store kept decoder-space vectors, so the new one keeps them too (codec "float32", "float16" (the
        default), "bfloat16", "decoder-int8" or "decoder-pq"). A 0.2 store is copied with its own codec, its
        codes unchanged, a checksum added to every row."""
        return convert(cls, Path(old), Path(new), codec, kwargs)


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in ("float32", "float16", "bfloat16"):
        raise InputError(f"storage dtype must be one of bfloat16, float16, float32, not {dtype!r}")
    return name
