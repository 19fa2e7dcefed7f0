"""ContextStore: compressed contexts keyed by the caller's ids, in a Lance dataset that data tools read.

A store (format 4) is a Lance dataset, on a local disk or an object store (`s3://`, `gs://`, `az://`): data
files listed by one versioned manifest, B-tree indices on `id` and on the text's hash, the store's description
in the schema's metadata, the codec file beside (see `format`). Writers on any number of machines add to it at
once without a lock: each commit is a new version, and each id reads one row, the first committed (see `writer`
and `table`). Versions can be read back (`version=`), merged (`compact`) and removed (`cleanup`); `verify` reads
everything and `repair` removes what is damaged.

The package, one concept per module: `format` (columns, row checksums), `location` (where a store lives, failures
in the user's terms), `manifest` (identity, codec file), `spaces` (what each codec space keeps and how reading
applies the head), `table` (a version of the dataset, and which row each id reads), `reader` (verified reads),
`writer` (rows from contexts, the queue, the commit, `FragmentWriter`), `maintenance` (compaction, indices, old
versions, verify, repair), `states` (a new store and an open one), `legacy` and `convert` (stores of arccompress
0.1 to 0.3). `ContextStore` is the face over them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa
import torch

from .codec import DEFAULT_CODEC, PQ_MIN_TRAIN, Codec, parse_codec
from ..compressor import Compressor
from ..context import CompressedContext
from ..errors import ContextNotFoundError, InputError, InputTypeError, StoreError
from ..tokenization import check_text
from .convert import convert
from .format import FIELDS, row_schema
from .location import Location
from .maintenance import VerifyReport, cleanup, compact, repair, verify
from .manifest import Identity
from .states import NewStore, OpenStore, older_format, store_exists
from .table import StoreDamageWarning
from .writer import (Batch, CommitResult, FragmentWriter, IdClashError, Queue, Written, batch_table, checked_rows,
                     context_batch, show)

__all__ = ["CommitResult", "ContextStore", "FragmentWriter", "IdClashError", "StoreDamageWarning", "VerifyReport",
           "Written", "row_schema"]


class ContextStore:
    """A store of compressed contexts keyed by string ids: a local folder or an object store URI.

    >>> store = ContextStore("wiki-store", compressor=comp, codec="pq", bits_per_dim=1.0)
    >>> store.add_texts(ids, texts)          # or store.add_many(ids, comp.compress(texts))
    >>> store.close()
    >>> ContextStore("wiki-store").get_many(["doc-7", "doc-42"])   # CompressedContexts, ready for a Generator

    codec: how contexts are kept (see `arccompress.store.codec`); the default, "bottleneck-float16", keeps the
    head's bottleneck in float16, which the decoder reads exactly as float16 post-head vectors at half
    their size. `dtype=` (arccompress 0.1) means the decoder-space codec of that dtype. A store opened
    again takes its codec from its description.

    Writers (threads, processes, machines) may add to one store at once, with no lock: each id is stored once, by
    the first writer to commit it; a later writer committing it with other contents gets an IdClashError naming
    it (its other contexts are committed), with identical contents it counts as written.
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
        storage_options: Mapping[str, str] | None = None,
        version: int | None = None,
    ):
        """Open the store at `path` (a folder, or an `s3://`, `gs://`, `az://` URI), or prepare a new one there
        (created on the first flush).

        compressor: if given, the store must hold contexts of this encoder (same weights, sizes and head) or
        StoreError is raised; a new store with a bottleneck or encoder codec needs it (reading applies the
        head). head: which decoder head to read an encoder-space store of a two-head encoder with (default:
        the compressor's). train_size: vectors the pq codebook is trained on (the first ones added, or those of
        `train`; at least 256). storage_options: Lance's options for an object store (endpoint, credentials,
        region; unset ones come from the environment). version: read the store as it was at that version
        (read-only; see `versions()`).
        """
        if compressor is not None and not isinstance(compressor, Compressor):
            raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        for name, value in (("flush_every", flush_every), ("train_size", train_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, not {value!r}")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise InputError(f"version must be a positive int, not {version!r}")
        if dtype is not None:
            if codec is not None:
                raise InputError("give codec= or dtype=, not both")
            codec = _dtype_name(dtype)
        if codec is not None and parse_codec(codec)[1] == "pq" and train_size < PQ_MIN_TRAIN:
            raise InputError(f"train_size must be at least {PQ_MIN_TRAIN} for the pq codec (each sub-quantizer has "
                             f"{PQ_MIN_TRAIN} centroids to train), not {train_size}")
        self.location = Location.of(path, storage_options)
        self.path = self.location.path
        self.compressor = compressor
        self.flush_every = flush_every
        self.train_size = train_size
        self._pid, self._own_lock, self._queue = os.getpid(), threading.RLock(), Queue()
        self._state: NewStore | OpenStore
        if version is not None or store_exists(self.location):
            self._state = OpenStore.open(self.location, compressor, codec, bits_per_dim, head, version)
        else:
            if codec is None and compressor is None:
                raise StoreError(older_format(self.location) or
                                 f"{self.location} is a new store: pass compressor= (its default codec, "
                                 f"{DEFAULT_CODEC}, keeps the head's bottleneck), or codec='float16' to keep decoder "
                                 "vectors without one")
            self._state = NewStore(self.location, compressor, codec or DEFAULT_CODEC, bits_per_dim, head)

    @property
    def _lock(self) -> threading.RLock:
        """This process's lock of the handle. In a process forked from another, the parent's threads are gone, and
        a lock one of them held (it was committing) would never be released: the child takes a new lock, and an
        empty queue (the parent commits what it queued)."""
        if self._pid != os.getpid():
            self._pid, self._own_lock, self._queue = os.getpid(), threading.RLock(), Queue()
        return self._own_lock

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The store's description: identity, codec, store id (None until the store is created)."""
        return self._state.manifest

    @property
    def codec(self) -> Codec | None:
        """The store's codec (None until a store made without a compressor receives its first context)."""
        return self._state.codec

    @property
    def version(self) -> int | None:
        """The version this handle reads (None until the store is created)."""
        return self._state.version

    # ------------------------------------------------------------------ ids

    def refresh(self) -> None:
        """Look at the latest version: what this and every other writer committed (and, for a store that did
        not exist yet, whether another writer created it). A store opened at a `version=` stays there."""
        with self._lock:
            self._state = self._state.refreshed()

    def __len__(self) -> int:
        with self._lock:
            self.refresh()
            return self._state.count() + len(self._state.missing(list(self._queue)))

    def __contains__(self, key: object) -> bool:
        with self._lock:
            if key in self._queue or key in self._state:
                return True
            self.refresh()  # another writer may have added it
            return key in self._state

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The ids of `keys` this store does not hold, in order, each once: one lookup for all of them, and one look
        at the latest version when any is absent (where `id not in store` for each would look once per id)."""
        if isinstance(keys, str):
            raise InputTypeError("missing takes a list of ids")
        with self._lock:
            absent = self._state.missing([k for k in dict.fromkeys(keys) if k not in self._queue])
            if absent:
                self.refresh()  # another writer may have added them
                absent = self._state.missing(absent)
        return absent

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            self.refresh()
            keys = list(self._state.ids()) + self._state.missing(list(self._queue))
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
        """The contexts stored under `keys`, in that order (e.g. a retriever's top-k): one index lookup and read,
        every row's checksum verified, the head applied on `device`."""
        if isinstance(keys, str):
            raise InputTypeError("get_many takes a list of ids; use store[id] for one")
        keys = list(keys)
        for i, key in enumerate(keys):
            if not isinstance(key, str):
                raise InputTypeError(f"store ids are str, not {type(key).__name__} ({key!r} at position {i})")
        device = _device(device)
        if not keys:
            return []
        with self._lock:
            unique = list(dict.fromkeys(keys))
            found = {k: self._queue.get(k) for k in unique if k in self._queue}
            found |= self._state.read([k for k in unique if k not in found])  # id -> (row fields, stored vectors)
            if len(found) < len(unique):  # another writer may have added them
                self.refresh()
                found |= self._state.read([k for k in unique if k not in found])
            missing = [k for k in unique if k not in found]
            if missing:
                damage = "".join(f"; {note}" for note in self._state.damage())
                raise ContextNotFoundError(f"not in {self.location}: {show(missing)}{damage}")
            return self._decoded(found, keys, device, dtype)

    def contexts(self, rows: pa.Table, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                 ) -> list[CompressedContext]:
        """The contexts of rows of this store read by another tool (a LanceDB vector search, a DuckDB query over
        `dataset()`), in their order: every row's checksum verified, the head applied on `device`. The rows are
        taken as they are; `get_many(ids)` reads the row each id reads."""
        if not isinstance(rows, pa.Table):
            raise InputTypeError(f"rows must be a pyarrow Table, not {type(rows).__name__}")
        missing = [c for c in FIELDS if c not in rows.column_names]
        if missing:
            raise InputError(f"rows of {self.location} need the store's columns; these are missing: {missing}")
        with self._lock:
            state = self._state.opened("decoding rows")
            found = state.reader.decode(rows.select(list(FIELDS)), str(self.location))
            return self._decoded(found, rows.column("id").to_pylist(), device, dtype)

    def _decoded(self, found: dict[str, tuple[dict[str, Any], torch.Tensor]], keys: list[str],
                 device: torch.device | str, dtype: torch.dtype | None) -> list[CompressedContext]:
        """Contexts of `keys` from their rows and stored vectors: the head applied where the caller wants them."""
        state = self._state
        head = state.read_head
        if not state.space.cont_stored and head is None:
            raise StoreError(f"{self.location} keeps encoder vectors for several decoder heads: choose one with "
                             "ContextStore(..., head=) or compressor=")
        unique = list(dict.fromkeys(keys))
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

    def find_texts(self, texts: Sequence[str], *, chunk_size: int | None = None) -> list[str | None]:
        """The id of a stored context of each text (compressed whole, or with this `chunk_size`), None for texts the
        store does not hold: a lookup of the texts' SHA-256 in the index on `text_sha256`."""
        if isinstance(texts, str):
            raise InputTypeError("find_texts takes a list of texts")
        hashes = [hashlib.sha256(check_text(t, f"text {i}").encode("utf-8")).hexdigest()
                  if isinstance(t, str) else _not_text(t, i) for i, t in enumerate(texts)]
        with self._lock:
            found = self._state.find_texts(list(dict.fromkeys(hashes)), chunk_size)
            if len(found) < len(set(hashes)):  # another writer may have added them
                self.refresh()
                found |= self._state.find_texts([h for h in dict.fromkeys(hashes) if h not in found], chunk_size)
        return [found.get(h) for h in hashes]

    def lookup_texts(self, texts: Sequence[str], *, chunk_size: int | None = None,
                     device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                     ) -> list[CompressedContext | None]:
        """The stored context of each text already in the store (compressed whole, or with this `chunk_size`),
        None for the others: what a retriever's documents need when nobody kept their ids."""
        ids = self.find_texts(texts, chunk_size=chunk_size)
        present = list(dict.fromkeys(k for k in ids if k is not None))
        read = dict(zip(present, self.get_many(present, device=device, dtype=dtype))) if present else {}
        return [None if k is None else read[k] for k in ids]

    def stats(self) -> dict[str, Any]:
        """Sizes on disk next to the raw text's: the paper's storage claim, on your data. The text's side counts the
        contexts stored with their text (`text_tokens` of `tokens`); with none, `text_bytes_per_token` is None and
        `size_vs_text` NaN: the size of the text is not known (contexts added without it, or converted from a store
        that did not keep it)."""
        with self._lock:
            self.refresh()
            s = self._state.stats()
        tokens, text, text_tokens, disk = s["tokens"], s["text_bytes"], s["text_tokens"], s["data_bytes"]
        return s | {"bytes_per_token": disk / tokens if tokens else 0.0,
                    "text_bytes_per_token": text / text_tokens if text_tokens else None,
                    "size_vs_text": (disk / tokens) / (text / text_tokens) if text_tokens and text else float("nan")}

    def dataset(self) -> lance.LanceDataset:
        """The Lance dataset at this handle's version: a pyarrow Dataset that DuckDB, polars and Ray read (every
        row, a rare shadowed one included: see `table`)."""
        with self._lock:
            return self._state.opened("reading it as a dataset").table.ds

    def versions(self) -> list[dict[str, Any]]:
        """The versions kept (each: `version`, `timestamp`, ...), oldest first: what `version=` can open."""
        return self._state.opened("listing versions").table.ds.versions()

    # ------------------------------------------------------------------ upkeep

    def verify(self) -> VerifyReport:
        """Read every row of this version: each data file readable, each row matching its checksum; the damaged
        files with their ids (see `arccompress store verify`)."""
        state = self._state.opened("verifying it")
        return verify(self.location, state.rules.bytes_per_vector, state.rules.cont_stored, state.version)

    def repair(self, report: VerifyReport | None = None) -> dict[str, Any]:
        """Commit a version without the damaged files and rows (`report`, else a new `verify()` of the latest
        version); returns {"version", "ids": the ids to compute again, "unknown_rows"}."""
        with self._lock:
            self._state = self._state.refreshed()
            state = self._state.opened("repairing it")
            result = repair(self.location, report or verify(self.location, state.rules.bytes_per_vector,
                                                            state.rules.cont_stored))
            self.refresh()
            return result

    def compact(self) -> dict[str, Any]:
        """Drop shadowed rows, merge small data files, bring the indices up to date (a new version)."""
        with self._lock:
            self._state.opened("compacting it")
            result = compact(self.location)
            self.refresh()
            return result

    def cleanup(self, older_than: timedelta = timedelta(days=7)) -> dict[str, Any]:
        """Remove versions older than `older_than` (never the latest) and the files only they use."""
        self._state.opened("cleaning it up")
        return cleanup(self.location, older_than)

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
                raise StoreError(f"context {key!r} does not belong in {self.location}: {mismatch} (store made by "
                                 f"encoder {reference.encoder!r}): compress it with that encoder, or store it in a "
                                 "store of its own")
        return reference

    def _batch(self, keys: Sequence[str], contexts: Sequence[CompressedContext]) -> Batch | None:
        """Checked ids and contexts as a batch of rows (one device-to-host copy)."""
        keys, contexts = list(keys), list(contexts)
        if len(keys) != len(contexts):
            raise InputError(f"{len(keys)} ids for {len(contexts)} contexts")
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if not isinstance(key, str) or not key:
                raise InputTypeError(f"store ids must be non-empty str, not {key!r} (position {i})")
            check_text(key, f"store id {key[:40]!r}")
            if first.setdefault(key, i) != i:
                raise InputError(f"id {key!r} is given twice: at positions {first[key]} and {i}")
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
        """Queue contexts, committed `flush_every` at a time. All or nothing: every context is checked before
        any is queued, ids already stored with other contents are refused (IdClashError, nothing queued), ids
        stored with identical contents count as written; if a commit fails, the contexts of this call that it
        did not commit leave the queue (the call may be retried as it was)."""
        with self._lock:
            if isinstance(self._state, OpenStore):
                self._state.opened("adding contexts")  # a store opened at a version is read-only
            batch = self._batch(keys, contexts)
            if batch is None:
                return
            queued = [k for k in batch.keys if k in self._queue]
            if queued:
                raise IdClashError(f"already queued in {self.location}: {show(queued)}; nothing was queued",
                                   queued, [], [])
            self.refresh()  # once: what other writers committed
            batch = self._unstored(batch)
            committed: list[str] = []
            first = 0
            try:
                while first < len(batch):  # a commit every flush_every contexts
                    room = self.flush_every - len(self._queue)
                    last = min(len(batch), first + max(room, 1))
                    self._queue.add(batch.slice(first, last))
                    first = last
                    if len(self._queue) >= self.flush_every:
                        committed += self._flush(explicit=False)
            except IdClashError as e:
                self._queue.remove(batch.keys)
                raise IdClashError(f"{e}; {len(batch) - first} contexts of this call were not queued: add them "
                                   "again", e.ids, e.same_text, committed + e.committed) from None
            except BaseException:
                self._queue.remove(batch.keys)
                raise

    def _unstored(self, batch: Batch) -> Batch:
        """The batch without ids the store holds identically; IdClashError for ids it holds otherwise."""
        if not isinstance(self._state, OpenStore):
            return batch
        present = set(batch.keys) - set(self._state.missing(batch.keys))
        stored = [i for i, k in enumerate(batch.keys) if k in present]
        if not stored:
            batch.absent_at = self._state.version
            return batch
        ours = batch_table(batch.select(stored), self._state.codec)
        theirs = self._state.table.rows(ours.column("id").to_pylist(), ["checksum"])
        other = [k for k, c in zip(ours.column("id").to_pylist(), ours.column("checksum").to_pylist())
                 if theirs[k]["checksum"] != c]
        if other:
            raise IdClashError(f"already in the store {self.location} with other contents: {show(other)}; nothing "
                               "was queued", other, [], [])
        rest = batch.select([i for i in range(len(batch)) if i not in set(stored)])
        rest.absent_at = self._state.version
        return rest

    def add_texts(self, keys: Sequence[str], texts: Sequence[str], *, chunk_size: int | None = None,
                  **compress_kwargs: Any) -> None:
        """Compress texts with the store's compressor and queue them under `keys` (see `add_many`)."""
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
        """Create the store now, before anything is added (a pq store is created by `train`): what parallel
        writers need to exist before they start."""
        with self._lock:
            self._state = self._state.create()

    def _require_compressor(self, what: str) -> Any:
        if self.compressor is None:
            raise StoreError(f"{what} needs the store opened with compressor=")
        return self.compressor

    def flush(self) -> None:
        """Commit the queued contexts as one new version (training the pq codebook first, if it has none yet).

        IdClashError if another writer committed some of their ids first with other contents: those leave the
        queue, the others are committed. Any other failure leaves the queue as it was: flush again."""
        with self._lock:
            self._flush(explicit=True)

    def _flush(self, explicit: bool) -> list[str]:
        if not self._queue:
            return []
        state = self._state.ready(self._queue, explicit, self.train_size)
        if state is None:
            return []  # keep collecting: the codebook is trained on the first train_size vectors
        self._state = state
        table = self._queue.table(state.codec)
        try:
            result = state.commit(table, self._queue.absent_at())
        except IdClashError:
            self._queue.clear()  # the refused ids leave the queue; the rest is committed
            raise
        self._queue.clear()
        return result.committed + result.identical

    def encode(self, keys: Sequence[str], contexts: Sequence[CompressedContext]) -> pa.Table:
        """Rows of the store's format for these contexts (a pyarrow Table), without writing them: what parallel
        workers produce and `append` (or a `FragmentWriter`) commits. The store must exist."""
        with self._lock:
            state = self._state.opened("encoding rows")
            batch = self._batch(keys, contexts)
            return batch_table(batch, state.codec) if batch is not None else row_schema().empty_table()

    def append(self, table: pa.Table) -> CommitResult:
        """Commit a table of rows (from `encode`) as one version. Ids already stored with identical rows (a
        retried task) are skipped as written; ids stored with other contents are refused with IdClashError,
        after the other rows are committed."""
        with self._lock:
            state = self._state.opened("appending rows")
            return state.commit(checked_rows(table, state.rules))

    def fragment_writer(self) -> FragmentWriter:
        """A light, picklable handle writing and committing rows to this store (what a Ray write task holds): it
        carries the store's location and row rules only."""
        return self._state.opened("making a fragment writer").fragment_writer()

    def close(self) -> None:
        """Flush, and let go of the dataset's open files and caches (a later call opens it again)."""
        with self._lock:
            self.flush()
            self._state.release()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()

    def __repr__(self) -> str:
        return f"ContextStore({self.location.uri!r}, {len(self)} contexts, codec={self._state.codec_label})"

    # ------------------------------------------------------------------ where stores are

    @staticmethod
    def exists(path: str | Path, *, storage_options: Mapping[str, str] | None = None) -> bool:
        """Whether a store was created at `path` (of this format, or an older one that `convert` reads)."""
        location = Location.of(path, storage_options)
        return older_format(location) is not None or store_exists(location)

    @classmethod
    def convert(cls, old: str | Path, new: str | Path, *, codec: str | None = None,
                storage_options: Mapping[str, str] | None = None, **kwargs: Any) -> ContextStore:
        """Copy a store of arccompress 0.1 (safetensors shards + index.jsonl), 0.2 (format 2) or 0.3 (format 3,
        Parquet files) into a new store at `new` (a folder or an object store URI).

        A 0.1 store kept decoder-space vectors, so the new one keeps them too (codec "float32", "float16" (the
        default), "bfloat16", "decoder-int8" or "decoder-pq"). A 0.2 or 0.3 store is copied with its own codec,
        its codes unchanged (0.2's rows gain their checksums), each id's row the one the old store read."""
        return convert(cls, Path(old), Location.of(new, storage_options), codec, kwargs)


def _device(device: torch.device | str) -> torch.device:
    """A torch device to read contexts onto, one this process has; InputError naming it otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={str(device)!r}, and this process has no CUDA device (torch.cuda.is_available() "
                         "is False): read onto 'cpu'")
    return device


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in ("float32", "float16", "bfloat16"):
        raise InputError(f"storage dtype must be one of bfloat16, float16, float32, not {dtype!r}")
    return name


def _not_text(value: Any, i: int) -> str:
    raise InputTypeError(f"text {i} is a {type(value).__name__}, not a str")
