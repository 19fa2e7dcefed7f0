"""A store's two states: new (no dataset yet: what it will be) and open (a Lance dataset: what it is).

`ContextStore` holds one of them and delegates; a new store becomes an open one when it is created (its first
flush, `create()` or `train()`), or when `refresh` finds that another writer created it; only an open one has
rows, a reader and commits.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lance
import pyarrow.compute as pc
import torch

from .codec import PQ_MIN_TRAIN, Codec, parse_codec
from ..context import CompressedContext
from ..errors import CodecError, InputError, StoreError
from ..heads import DecoderHead
from .format import CODEC_FOLDER, LANCE_FILE_VERSION, row_schema, schema_problem
from .location import LANCE_ERRORS, Location
from .maintenance import settle
from .manifest import Identity, Manifest, unfinished, unfinished_advice
from .reader import Reader
from .spaces import SPACES
from .table import StoreDamageWarning, StoreTable, lost_versions, open_failure
from .writer import CommitResult, FragmentWriter, IdClashError, Queue, RowRules, commit_rows, context_batch

T = TypeVar("T")
OLDER = "convert it once with `arccompress convert {old} NEW_STORE` (or ContextStore.convert)"


class HeadCache:
    """A store's decoder heads on the devices and dtypes they are used at."""

    def __init__(self, source: Callable[[int], DecoderHead]):
        self._source = source
        self._cache: dict[tuple[int, torch.device, torch.dtype], DecoderHead] = {}

    def __call__(self, head: int, device: torch.device | str, dtype: torch.dtype) -> DecoderHead:
        key = (head, torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._source(head).to(device, dtype)
        return self._cache[key]


def train_codebook(codec: Codec, vectors: torch.Tensor, train_size: int, where: Location) -> int:
    if vectors.shape[0] < PQ_MIN_TRAIN:
        raise InputError(f"{where}: the pq codebook needs at least {PQ_MIN_TRAIN} training vectors, got "
                         f"{vectors.shape[0]}: add more contexts before the first flush, or call train() with more "
                         "texts")
    try:
        return codec.train(vectors, max_vectors=train_size)
    except CodecError as e:
        raise StoreError(f"{where}: {e}") from None


def older_format(location: Location) -> str | None:
    """The one-line advice for a local folder holding a store of an older arccompress (None if it does not)."""
    if not location.is_local:
        return None
    folder = Path(location.uri)
    if (folder / "index.jsonl").exists():
        return f"{folder} is an arccompress 0.1 store: " + OLDER.format(old=folder)
    if (folder / "manifest.json").is_file():
        try:
            version = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("version")
        except (OSError, ValueError, AttributeError):
            version = None
        made_by = {2: "arccompress 0.2 (format 2, without checksums)", 3: "arccompress 0.3 (format 3, Parquet files)"}
        return f"{folder} is a store of {made_by.get(version, f'format {version!r}')}: " + OLDER.format(old=folder)
    return None


def check_new_folder(location: Location) -> None:
    """StoreError unless a local folder is absent, empty, or holds only what an interrupted creation leaves (a
    codec file); or it holds an older store (the advice to convert it)."""
    advice = older_format(location)
    if advice:
        raise StoreError(advice)
    folder = location.path
    if not isinstance(folder, Path) or not folder.exists():
        return
    if not folder.is_dir():
        raise StoreError(f"{folder} exists and is not a folder")
    for entry in folder.iterdir():
        if entry.name != CODEC_FOLDER:
            raise StoreError(f"{folder} exists and is not a context store (no Lance dataset; found {entry.name!r})")


class NewStore:
    """A store that is not created yet: its codec and identity come from the compressor (or the first context)."""

    manifest = None
    version = None

    def __init__(self, location: Location, compressor: Any, codec: str, bits_per_dim: float | None,
                 head: int | str | None):
        check_new_folder(location)
        space, self.quantizer = parse_codec(codec)
        self.location, self.space, self.bits_per_dim = location, SPACES[space], bits_per_dim
        self.compressor, self.asked_head = compressor, head
        self.identity: Identity | None = None
        self.codec: Codec | None = None  # known once the width is: from the compressor, or the first context
        if compressor is None:
            if not self.space.cont_stored:
                raise StoreError(f"a new store with the {codec} codec needs compressor=: reading it applies the "
                                 "encoder head, whose weights the store keeps")
        else:
            if compressor.head is None and not self.space.serves_every_head:
                raise StoreError(f"{compressor.name!r} has {compressor.num_heads} decoder heads: choose one "
                                 "(Compressor.select_head) before storing its contexts, or use an encoder-space codec")
            self.adopt(Identity.of_compressor(compressor))
        self.heads = HeadCache(lambda h: compressor.model.head(h))

    def codec_for(self, identity: Identity) -> Codec:
        """The codec contexts of this identity are kept with: the store's, or one of their width."""
        if self.codec is not None:
            return self.codec
        return Codec(self.space.name, self.quantizer, identity.dims[self.space.name], self.bits_per_dim)

    def adopt(self, identity: Identity) -> None:
        """Take the identity (and so the codec's width) of the compressor or of the first contexts queued."""
        if self.identity is None:
            self.codec = self.codec_for(identity)
            self.identity = identity

    @property
    def codec_label(self) -> str:
        return self.codec.label if self.codec is not None else f"{self.space.name}-{self.quantizer}"

    @property
    def read_head(self) -> int | None:
        comp = self.compressor
        return self.space.read_head(None if self.identity is None else self.identity.head, self.asked_head,
                                    None if comp is None else comp.head, 1 if comp is None else comp.num_heads,
                                    str(self.location))

    # ------------------------------------------------------------------ reading: nothing is stored yet

    def refreshed(self) -> NewStore | OpenStore:
        """This store, or the open one another writer created meanwhile."""
        if not store_exists(self.location):
            return self
        return OpenStore.open(self.location, self.compressor, self.codec.name if self.codec else None,
                              self.bits_per_dim, self.asked_head, None)

    def release(self) -> None:
        pass

    def __contains__(self, key: object) -> bool:
        return False

    def missing(self, keys: list[str]) -> list[str]:
        return list(keys)

    def ids(self) -> Iterator[str]:
        return iter(())

    def count(self) -> int:
        return 0

    def damage(self) -> list[str]:
        return []

    def read(self, keys: list[str]) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        return {}

    def find_texts(self, hashes: list[str], chunk_size: int | None) -> dict[str, str]:
        return {}

    def stats(self) -> dict[str, Any]:
        return {"contexts": 0, "tokens": 0, "embeddings": 0, "codec": self.codec_label, "fragments": 0,
                "duplicates": 0, "data_bytes": 0, "codec_bytes": 0, "text_bytes": 0, "text_tokens": 0, "version": None}

    # ------------------------------------------------------------------ becoming a store

    def opened(self, what: str) -> OpenStore:
        raise StoreError(f"{self.location} has no store yet: create it (a first flush, create() or train()) "
                         f"before {what}")

    def ready(self, queue: Queue, explicit: bool, train_size: int) -> OpenStore | None:
        """The store to commit the queue to: created now (its pq codebook trained on the queue's first
        `train_size` vectors), or None while a pq store waits for enough vectors."""
        trained_on = None
        if self.codec.needs_training:  # type: ignore[union-attr]
            if queue.num_vectors < train_size and not explicit:
                return None  # counted, not gathered: a queue growing one context at a time stays linear
            trained_on = train_codebook(self.codec, queue.vectors(), train_size,  # type: ignore[arg-type]
                                        self.location)
        return self._create(trained_on)

    def create(self) -> OpenStore:
        if self.codec is None:
            raise StoreError(f"{self.location}: a store without compressor= is created by its first flush")
        if self.codec.needs_training:
            raise StoreError(f"{self.location}: a pq store is created by train(texts), which trains its codebook")
        return self._create(None)

    def train(self, data: Iterable[str] | Iterable[CompressedContext], batch_size: int, train_size: int,
              chunk_size: int | None) -> tuple[OpenStore, int]:
        """Create the store, its pq codebook trained on the first `train_size` vectors of these texts (compressed a
        batch at a time, until enough) or contexts; the vectors used."""
        if self.codec is None or not self.codec.needs_training:
            return self.create(), 0
        parts, have, items = [], 0, iter(data)
        while have < train_size:
            batch = [x for _, x in zip(range(batch_size), items)]
            if not batch:
                break
            if isinstance(batch[0], str):
                if self.compressor is None:
                    raise StoreError("train() on texts needs the store opened with compressor=")
                batch = self.compressor.compress(batch, chunk_size=chunk_size, show_progress_bar=False)
            keys = [f"training context {have + i}" for i in range(len(batch))]
            parts.append(context_batch(keys, batch, self.space, self.codec, self.heads).vectors)
            have += parts[-1].shape[0]
        vectors = torch.cat(parts) if parts else torch.empty(0, self.codec.dim)
        used = train_codebook(self.codec, vectors, train_size, self.location)
        return self._create(used), used

    def _create(self, trained_on: int | None) -> OpenStore:
        """Write the codec file, then the dataset's first version (put-if-absent: of two writers creating the store
        at once, one creates it and the other opens it, if it is the same kind of store)."""
        identity, codec = self.identity, self.codec
        assert identity is not None and codec is not None
        num_heads = self.compressor.num_heads if self.compressor is not None else 1
        heads = {h: self.heads(h, "cpu", torch.float32) for h in self.space.heads_kept(identity.head, num_heads)}
        manifest, blob = Manifest.describe(identity, codec, self.space, heads, trained_on)
        try:
            return create_store(self.location, manifest, blob, self.compressor, self.asked_head)
        except FileExistsError:
            return self._theirs(codec)

    def _theirs(self, codec: Codec) -> OpenStore:
        """The store another writer created first, if it keeps contexts as this one would."""
        theirs = OpenStore.open(self.location, self.compressor, None, None, self.asked_head, None)
        if (theirs.codec.name, theirs.codec.bits_per_dim) != (codec.name, codec.bits_per_dim):
            raise StoreError(f"{self.location} was created meanwhile with codec {theirs.codec.label}, not "
                             f"{codec.label}")
        mismatch = theirs.identity.mismatch(self.identity, every_head=self.space.serves_every_head)  # type: ignore
        if mismatch:
            raise StoreError(f"{self.location} was created meanwhile for other contexts: {mismatch}")
        return theirs


def create_store(location: Location, manifest: Manifest, blob: bytes | None, compressor: Any,
                 head: int | str | None) -> OpenStore:
    """Write the codec file, then the dataset's first version: put-if-absent (FileExistsError if a store is there:
    of two writers creating one at once, one creates it). Then its indices and the cleanup of old versions."""
    try:
        if blob is not None:
            location.write_file(manifest.data["codec_file"], blob)
        schema = row_schema().with_metadata(manifest.metadata())
        dataset = lance.write_dataset(schema.empty_table(), location.lance(), schema=schema, mode="create",
                                      data_storage_version=LANCE_FILE_VERSION, storage_options=location.storage_options)
    except LANCE_ERRORS as e:
        if "already exists" in str(e):
            raise FileExistsError(location.uri) from None
        raise location.error("create the store", e) from None
    if dataset.version != 1:
        # another writer created the store between Lance's check and its commit, and Lance committed this create
        # as an overwrite on top of theirs (it rebases an overwrite rather than failing): their version comes back
        # whole, and theirs is the store
        try:
            lance.dataset(location.lance(), version=dataset.version - 1,
                          storage_options=location.storage_options).restore()
        except LANCE_ERRORS as e:
            raise location.error("undo a create that raced another writer's", e) from None
        raise FileExistsError(location.uri)
    try:
        settle(dataset)
    except LANCE_ERRORS as e:  # the store exists; a writer's upkeep after its commit makes the indices
        raise location.error("index the new store", e) from None
    table = StoreTable(location, dataset.checkout_version(dataset.latest_version))
    return OpenStore(location, manifest, table, compressor, head)


def store_exists(location: Location) -> bool:
    """Whether a format-4 store (a Lance dataset) is at `location`."""
    if location.is_local and not (Path(location.uri) / "_versions").is_dir():
        return False
    try:
        lance.dataset(location.lance(), storage_options=location.storage_options)
    except LANCE_ERRORS as e:
        if location.absent(e):
            return False
        raise open_failure(location, e) from None
    return True


class OpenStore:
    """A store with a dataset: its rows at the version this handle looks at, a reader, and commits."""

    def __init__(self, location: Location, manifest: Manifest, table: StoreTable, compressor: Any,
                 head: int | str | None, pinned: bool = False):
        self.location, self._manifest, self.table = location, manifest, table
        self.compressor, self.asked_head, self.pinned = compressor, head, pinned
        self.codec, self.space, self.identity = manifest.codec, manifest.space, manifest.identity
        self.rules = RowRules(manifest.store_id, self.codec.name, self.codec.bytes_per_vector, self.space.cont_stored)
        self.reader = Reader(self.codec, self.space.cont_stored)
        self.heads = HeadCache(self._head)
        self.read_head = self.space.read_head(self.identity.head, head, None if compressor is None else compressor.head,
                                              len(manifest.heads), str(location))

    @classmethod
    def open(cls, location: Location, compressor: Any, codec: str | None, bits_per_dim: float | None,
             head: int | str | None, version: int | None) -> OpenStore:
        table = StoreTable.open(location, version)
        manifest = Manifest.read(location, table.ds.schema.metadata)
        problem = schema_problem(table.ds.schema)
        if problem:
            raise StoreError(f"{location} is not a context store of format 4: {problem}")
        source = unfinished(manifest.data)
        if source is not None:
            warnings.warn(unfinished_advice(location, source), StoreDamageWarning, stacklevel=4)
        lost = None if version is not None else lost_versions(location, table.version)
        if lost:
            warnings.warn(f"{location}: {lost}; `arccompress store verify` lists it", StoreDamageWarning,
                          stacklevel=4)
        label = manifest.codec.label
        if codec is not None:
            space, quantizer = parse_codec(codec)
            if f"{space}-{quantizer}" != manifest.codec.name or (
                    bits_per_dim is not None and bits_per_dim != manifest.codec.bits_per_dim):
                asked = f"{space}-{quantizer}" + (f" at {bits_per_dim:g} bits/dim" if bits_per_dim is not None else "")
                raise StoreError(f"{location} keeps {label}, not {asked}")
        if compressor is not None:
            mismatch = manifest.identity.mismatch(Identity.of_compressor(compressor),
                                                  every_head=manifest.space.serves_every_head)
            if mismatch:
                raise StoreError(f"the compressor does not belong in {location}: {mismatch} (store made by encoder "
                                 f"{manifest.identity.encoder!r}): open it with that encoder (--encoder "
                                 f"{manifest.identity.encoder}), or give this one a store of its own")
        return cls(location, manifest, table, compressor, head, pinned=version is not None)

    def _head(self, h: int) -> DecoderHead:
        if h not in self._manifest.heads:
            raise StoreError(f"{self.location}: no weights for head {h}")
        return self._manifest.heads[h]

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest.data

    @property
    def version(self) -> int:
        return self.table.version

    @property
    def codec_label(self) -> str:
        return self.codec.label

    # ------------------------------------------------------------------ reading

    def refreshed(self) -> OpenStore:
        if not self.pinned:
            self.table = self.table.latest()
        return self

    def current(self, read: Callable[[StoreTable], T]) -> T:
        """`read(table)`; if it fails and a newer version exists (the files of this handle's version may have been
        compacted and cleaned up since), once more at the latest version."""
        try:
            return read(self.table)
        except StoreError:
            latest = self.table if self.pinned else self.table.latest()
            if latest is self.table:
                raise
            self.table = latest
            return read(latest)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.current(lambda t: t.rows([key], [])))

    def missing(self, keys: list[str]) -> list[str]:
        found = self.current(lambda t: t.rows(keys, []))
        return [k for k in keys if k not in found]

    def ids(self) -> Iterator[str]:
        return self.current(lambda t: t.ids())

    def count(self) -> int:
        return self.current(lambda t: t.count())

    def damage(self) -> list[str]:
        """The damage reads of this version went around (a damaged index, data files whose ids are unknown)."""
        return sorted(self.table.notes)

    def read(self, keys: list[str]) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        return self.current(lambda t: self.reader.read(t, keys))

    def find_texts(self, hashes: list[str], chunk_size: int | None) -> dict[str, str]:
        return self.current(lambda t: self._find_texts(t, hashes, chunk_size))

    def _find_texts(self, table: StoreTable, hashes: list[str], chunk_size: int | None) -> dict[str, str]:
        """text hash -> the id of a stored context of that text made with this chunk size (the first in the
        dataset's order whose row its id reads)."""
        out: dict[str, str] = {}
        try:
            found = table.ds.scanner(columns=["id", "text_sha256", "chunk_size"], with_row_address=True,
                                     filter=pc.field("text_sha256").isin(hashes)).to_table()
        except LANCE_ERRORS as e:
            raise self.location.error("look texts up", e) from None
        if not found.num_rows:
            return out
        found = table.in_order(found)
        rows = table.rows(list(dict.fromkeys(found.column("id").to_pylist())), [])
        for row in found.to_pylist():
            winner = rows.get(row["id"])  # a shadowed row's text is not the id's
            if row["chunk_size"] == chunk_size and winner is not None and winner["_rowaddr"] == row["_rowaddr"]:
                out.setdefault(row["text_sha256"], row["id"])
        return out

    def stats(self) -> dict[str, Any]:
        return self.current(self._stats)

    def _stats(self, table: StoreTable) -> dict[str, Any]:
        rows = table.visible(["num_tokens", "num_embeddings", "text_bytes"])
        fragments = table.fragments()
        return {"contexts": rows.num_rows, "tokens": pc.sum(rows.column("num_tokens")).as_py() or 0,
                "embeddings": pc.sum(rows.column("num_embeddings")).as_py() or 0, "codec": self.codec_label,
                "fragments": len(fragments), "duplicates": len(table.shadowed()),
                "data_bytes": sum(d.file_size_bytes or 0 for f in fragments for d in f.metadata.files),
                "codec_bytes": self.manifest.get("codec_bytes", 0),
                "text_bytes": pc.sum(rows.column("text_bytes")).as_py() or 0,
                # the tokens of the contexts stored with their text's size (contexts added without text have none)
                "text_tokens": pc.sum(rows.filter(pc.is_valid(rows.column("text_bytes"))).column("num_tokens")).as_py()
                or 0, "version": table.version}

    # ------------------------------------------------------------------ writing

    def codec_for(self, identity: Identity) -> Codec:
        return self.codec

    def adopt(self, identity: Identity) -> None:
        pass  # an open store's identity is its description's

    def opened(self, what: str) -> OpenStore:
        if self.pinned:
            raise StoreError(f"{self.location} is open at version {self.version}, read-only: open it without "
                             f"version= before {what}")
        return self

    def ready(self, queue: Queue, explicit: bool, train_size: int) -> OpenStore:
        return self.opened("writing")

    def create(self) -> OpenStore:
        return self

    def train(self, data: Any, batch_size: int, train_size: int, chunk_size: int | None) -> tuple[OpenStore, int]:
        raise StoreError(f"{self.location} already exists; a store is trained once, when it is created")

    def commit(self, rows: Any, absent_at: int | None = None) -> CommitResult:
        try:
            result, self.table = commit_rows(self.location, self.rules, rows, self.opened("writing").table, absent_at)
        except IdClashError:
            self.table = self.table.latest()  # the version this commit made, or a later one
            raise
        return result

    def release(self) -> None:
        self.table.release()

    def fragment_writer(self) -> FragmentWriter:
        return FragmentWriter(self.location, self.rules)
