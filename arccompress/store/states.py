"""A store folder's two states: new (no manifest yet: what it will be) and open (a manifest: what it is).

`ContextStore` holds one of them and delegates; a new store becomes an open one when it is created (its
first flush, `create()` or `train()`), and only an open one has fragments, an index and a reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..codec import Codec, parse_codec
from ..context import CompressedContext
from ..errors import CodecError, StoreError
from ..heads import DecoderHead
from .files import is_temporary
from .format import DATA, MANIFEST
from .index import FragmentIndex
from .manifest import Identity, Manifest
from .reader import Reader
from .spaces import SPACES
from .writer import CommitResult, FragmentWriter, Queue, commit, context_batch

LEFTOVERS = ("codec-", ".lock")  # what an interrupted creation leaves besides temporary files


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


def train_codebook(codec: Codec, vectors: torch.Tensor, train_size: int, folder: Path) -> int:
    try:
        return codec.train(vectors, max_vectors=train_size)
    except CodecError as e:
        raise StoreError(f"{folder}: {e}") from None


class NewStore:
    """A store that is not created yet: its codec and identity come from the compressor (or the first context)."""

    manifest = None

    def __init__(self, folder: Path, compressor: Any, codec: str, bits_per_dim: float | None,
                 head: int | str | None):
        check_new_folder(folder)
        space, self.quantizer = parse_codec(codec)
        self.folder, self.space, self.bits_per_dim = folder, SPACES[space], bits_per_dim
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
                                    str(self.folder))

    # ------------------------------------------------------------------ reading: nothing is stored yet

    def refresh(self) -> None:
        pass

    def __contains__(self, key: object) -> bool:
        return False

    def ids(self) -> Iterator[str]:
        return iter(())

    def count(self) -> int:
        return 0

    def read(self, keys: list[str]) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        return {}

    def stats(self) -> dict[str, Any]:
        return {"contexts": 0, "tokens": 0, "embeddings": 0, "codec": self.codec_label, "fragments": 0,
                "duplicates": 0, "data_bytes": 0, "codec_bytes": 0, "text_bytes": 0}

    # ------------------------------------------------------------------ becoming a store

    def opened(self, what: str) -> OpenStore:
        raise StoreError(f"{self.folder} has no manifest yet: create it (a first flush, create() or train()) "
                         f"before {what}")

    def ready(self, queue: Queue, explicit: bool, train_size: int) -> OpenStore | None:
        """The store to commit the queue to: created now (its pq codebook trained on the queue's first
        `train_size` vectors), or None while a pq store waits for enough vectors."""
        trained_on = None
        if self.codec.needs_training:  # type: ignore[union-attr]
            vectors = queue.vectors()
            if vectors.shape[0] < train_size and not explicit:
                return None
            trained_on = train_codebook(self.codec, vectors, train_size, self.folder)  # type: ignore[arg-type]
        return self._create(trained_on)

    def create(self) -> OpenStore:
        if self.codec is None:
            raise StoreError(f"{self.folder}: a store without compressor= is created by its first flush")
        if self.codec.needs_training:
            raise StoreError(f"{self.folder}: a pq store is created by train(texts), which trains its codebook")
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
        used = train_codebook(self.codec, vectors, train_size, self.folder)
        return self._create(used), used

    def _create(self, trained_on: int | None) -> OpenStore:
        identity, codec = self.identity, self.codec
        assert identity is not None and codec is not None
        num_heads = self.compressor.num_heads if self.compressor is not None else 1
        heads = {h: self.heads(h, "cpu", torch.float32) for h in self.space.heads_kept(identity.head, num_heads)}
        manifest = Manifest.create(self.folder, identity, codec, self.space, heads, trained_on)
        theirs = manifest.codec  # another writer's, if it created the store first
        if (theirs.name, theirs.bits_per_dim) != (codec.name, codec.bits_per_dim):
            raise StoreError(f"{self.folder} was created meanwhile with codec {theirs.label}, not {codec.label}")
        mismatch = manifest.identity.mismatch(identity, every_head=self.space.serves_every_head)
        if mismatch:
            raise StoreError(f"{self.folder} was created meanwhile for other contexts: {mismatch}")
        return OpenStore(self.folder, manifest, self.compressor, self.asked_head)


class OpenStore:
    """A store with a manifest: its fragments, their id index, a reader, and commits."""

    def __init__(self, folder: Path, manifest: Manifest, compressor: Any, head: int | str | None):
        self.folder, self._manifest, self.compressor, self.asked_head = folder, manifest, compressor, head
        self.codec, self.space, self.identity = manifest.codec, manifest.space, manifest.identity
        self.fragment_identity = manifest.fragments
        self.index = FragmentIndex(folder / DATA, self.fragment_identity)
        self.reader = Reader(self.index, self.codec, self.space.cont_stored)
        self.heads = HeadCache(self._head)
        self.read_head = self.space.read_head(self.identity.head, head, None if compressor is None else compressor.head,
                                              len(manifest.heads), str(folder))

    @classmethod
    def open(cls, folder: Path, compressor: Any, codec: str | None, bits_per_dim: float | None,
             head: int | str | None) -> OpenStore:
        manifest = Manifest.read(folder)
        label = manifest.codec.label
        if codec is not None:
            space, quantizer = parse_codec(codec)
            if f"{space}-{quantizer}" != manifest.codec.name or (
                    bits_per_dim is not None and bits_per_dim != manifest.codec.bits_per_dim):
                asked = f"{space}-{quantizer}" + (f" at {bits_per_dim:g} bits/dim" if bits_per_dim is not None else "")
                raise StoreError(f"{folder} keeps {label}, not {asked}")
        if compressor is not None:
            mismatch = manifest.identity.mismatch(Identity.of_compressor(compressor),
                                                  every_head=manifest.space.serves_every_head)
            if mismatch:
                raise StoreError(f"the compressor does not belong in {folder}: {mismatch} (store made by encoder "
                                 f"{manifest.identity.encoder!r})")
        return cls(folder, manifest, compressor, head)

    def _head(self, h: int) -> DecoderHead:
        if h not in self._manifest.heads:
            raise StoreError(f"{self.folder}: no weights for head {h}")
        return self._manifest.heads[h]

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest.data

    @property
    def codec_label(self) -> str:
        return self.codec.label

    # ------------------------------------------------------------------ reading

    def refresh(self) -> None:
        self.index.refresh()

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def ids(self) -> Iterator[str]:
        return iter(self.index)

    def count(self) -> int:
        return len(self.index)

    def read(self, keys: list[str]) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        return self.reader.read(keys)

    def stats(self) -> dict[str, Any]:
        tokens = embeddings = text = 0
        for fragment in self.index.fragments:
            try:
                t = pq.read_table(fragment.path, columns=["id", "num_tokens", "num_embeddings", "text_bytes"])
            except Exception as e:
                raise StoreError(f"{fragment.path}: not a readable store fragment ({e})") from None
            if self.index.duplicates:  # count each id once, where the index reads it
                keys = t.column("id").to_pylist()
                t = t.filter(pa.array([self.index.owns(k, fragment, r) for r, k in enumerate(keys)]))
            tokens += pc.sum(t.column("num_tokens")).as_py() or 0
            embeddings += pc.sum(t.column("num_embeddings")).as_py() or 0
            text += pc.sum(t.column("text_bytes")).as_py() or 0
        codec_file = self.manifest.get("codec_file")
        return {"contexts": len(self.index), "tokens": tokens, "embeddings": embeddings, "codec": self.codec_label,
                "fragments": len(self.index.fragments), "duplicates": self.index.duplicates,
                "data_bytes": sum(f.path.stat().st_size for f in self.index.fragments),
                "codec_bytes": (self.folder / codec_file).stat().st_size if codec_file else 0, "text_bytes": text}

    # ------------------------------------------------------------------ writing

    def codec_for(self, identity: Identity) -> Codec:
        return self.codec

    def adopt(self, identity: Identity) -> None:
        pass  # an open store's identity is its manifest's

    def opened(self, what: str) -> OpenStore:
        return self

    def ready(self, queue: Queue, explicit: bool, train_size: int) -> OpenStore:
        return self

    def create(self) -> OpenStore:
        return self

    def train(self, data: Any, batch_size: int, train_size: int, chunk_size: int | None) -> tuple[OpenStore, int]:
        raise StoreError(f"{self.folder} already exists; a store is trained once, when it is created")

    def commit(self, table: Any) -> CommitResult:
        return commit(self.folder, self.fragment_identity, table, self.index)

    def fragment_writer(self) -> FragmentWriter:
        return FragmentWriter(str(self.folder), self.fragment_identity)


def check_new_folder(folder: Path) -> None:
    """StoreError unless `folder` is absent, empty, or holds only what an interrupted creation leaves."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise StoreError(f"{folder} exists and is not a folder")
    if (folder / "index.jsonl").exists():
        raise StoreError(f"{folder} is an arccompress 0.1 store (index.jsonl): convert it once with "
                         f"`arccompress convert {folder} NEW_STORE`")
    for entry in folder.iterdir():  # what an interrupted first flush can leave: a codec file, temporary files
        leftover = is_temporary(entry.name) or entry.name.startswith(LEFTOVERS) or (
            entry.name == DATA and entry.is_dir() and all(is_temporary(e.name) for e in entry.iterdir()))
        if not leftover:
            raise StoreError(f"{folder} exists and is not a context store (no {MANIFEST}; found {entry.name!r})")
