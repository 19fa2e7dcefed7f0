"""ContextStore: many compressed contexts on disk, keyed by the caller's ids, written resumably.

Layout of a store folder:

    manifest.json          what made the contexts (encoder, its weights' hash, head, sizes) and the storage dtype
    index.jsonl            one line per context: id, shard, key, token and embedding counts, text hash
    shards/NNNNN.safetensors  the embeddings of one flushed batch

A batch is written as a shard first (to a temporary name, then renamed), and only then are its index
lines appended: a crash loses at most the batch in flight, and reopening the store continues.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .context import CompressedContext

FORMAT = "arccompress-store"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# manifest keys that must agree between a store and every context added to it
IDENTITY = ("encoder_fingerprint", "decoder_index", "hidden_size", "pooling_factor")


class StoreError(ValueError):
    """A store that cannot be read, or a context that does not belong in it."""


class ContextStore:
    """A folder of compressed contexts keyed by string ids.

    >>> with ContextStore(path, dtype="float16") as store:
    ...     store.add_many(ids, compressor.compress(texts))
    >>> ContextStore(path)["doc-42"]     # a CompressedContext
    """

    def __init__(
        self,
        path: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        compressor: Any = None,
        flush_every: int = 256,
    ):
        """Open (or create on first flush) the store at `path`.

        dtype: storage dtype of a new store (float32, float16 or bfloat16). compressor: if given, the store
        must hold contexts of this compressor (same encoder weights, head and sizes) or StoreError is raised.
        """
        self.path = Path(path)
        self.flush_every = flush_every
        self._manifest_path = self.path / "manifest.json"
        self._index_path = self.path / "index.jsonl"
        self._pending: dict[str, CompressedContext] = {}  # added, not yet flushed
        self._entries: dict[str, dict[str, Any]] = {}
        if self._manifest_path.is_file():
            self.manifest = self._read_manifest()
            if dtype is not None and _dtype_name(dtype) != self.manifest["dtype"]:
                raise StoreError(f"{self.path} stores {self.manifest['dtype']}, not {_dtype_name(dtype)}")
            self._load_index()
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreError(f"{self.path} exists and is not a context store (no manifest.json)")
            self.manifest = {"format": FORMAT, "version": 1, "dtype": _dtype_name(dtype or "float32")}
        if compressor is not None:
            self._check_identity(identity(compressor.fingerprint, compressor.decoder_index,
                                          compressor.decoder_hidden_size, compressor.pooling_factor))

    # ------------------------------------------------------------------ reading

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self._manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self._manifest_path}: unreadable ({e})") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{self._manifest_path}: not an arccompress store")
        return manifest

    def _load_index(self) -> None:
        if not self._index_path.is_file():
            return
        raw = self._index_path.read_bytes()
        good = raw[: raw.rfind(b"\n") + 1]  # a line cut by a crash is dropped, and rewritten below
        if len(good) != len(raw):
            with open(self._index_path, "wb") as f:
                f.write(good)
        for n, line in enumerate(good.decode("utf-8").splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise StoreError(f"{self._index_path}:{n}: corrupt index line") from None
            self._entries[entry["id"]] = entry

    def __len__(self) -> int:
        return len(self._entries) + len(self._pending)

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._pending

    def __iter__(self) -> Iterator[str]:
        yield from self._entries
        yield from self._pending

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> Iterator[tuple[str, CompressedContext]]:
        for key in list(self):
            yield key, self[key]

    def __getitem__(self, key: str) -> CompressedContext:
        return self.get(key)

    def get(self, key: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CompressedContext:
        """The context stored under `key` (KeyError if none), with the store's metadata."""
        if key in self._pending:
            return self._pending[key].to(device=device, dtype=dtype)
        if key not in self._entries:
            raise KeyError(key)
        entry = self._entries[key]
        shard = self.path / "shards" / entry["shard"]
        try:
            with safe_open(shard, framework="pt") as f:
                emb = f.get_tensor(entry["key"])
        except Exception as e:
            raise StoreError(f"{shard}: cannot read context {key!r} ({e})") from None
        meta = {k: str(v) for k, v in self.manifest.items()} | {k: "" if v is None else str(v) for k, v in entry.items()}
        return CompressedContext.from_metadata(emb.to(device=device, dtype=dtype), meta)

    def stats(self) -> dict[str, float | int]:
        """Sizes on disk next to the raw text's: the paper's storage claim, on your data."""
        entries = list(self._entries.values())
        tokens = sum(e["num_tokens"] for e in entries)
        stored = sum(e["num_embeddings"] for e in entries) * self.manifest.get("hidden_size", 0) * \
            STORAGE_DTYPES[self.manifest["dtype"]].itemsize
        text = sum(e.get("text_bytes") or 0 for e in entries)
        return {
            "contexts": len(entries),
            "tokens": tokens,
            "embeddings": sum(e["num_embeddings"] for e in entries),
            "embedding_bytes": stored,
            "text_bytes": text,
            "bytes_per_token": stored / tokens if tokens else 0.0,
            "text_bytes_per_token": text / tokens if tokens else 0.0,
            "size_vs_text": stored / text if text else float("nan"),
        }

    # ------------------------------------------------------------------ writing

    def check_compatible(self, ctx: CompressedContext) -> None:
        """Raise StoreError if `ctx` was made by another encoder, head or size than the store's contexts."""
        self._check_identity(identity(ctx.encoder_fingerprint, ctx.decoder_index, ctx.hidden_size, ctx.pooling_factor))

    def _check_identity(self, own: dict[str, Any]) -> None:
        if "hidden_size" not in self.manifest:
            return  # an empty store takes the identity of its first context
        for key in IDENTITY:
            if self.manifest[key] != own[key]:
                raise StoreError(
                    f"context does not belong in {self.path}: {key} {own[key]!r} != the store's "
                    f"{self.manifest[key]!r} (encoder {self.manifest['encoder']!r})"
                )

    def add(self, key: str, ctx: CompressedContext) -> None:
        """Queue one context under `key`; written with the next flush (every `flush_every`)."""
        if not isinstance(key, str) or not key:
            raise TypeError(f"store ids must be non-empty str, not {key!r}")
        if not isinstance(ctx, CompressedContext):
            raise TypeError(f"expected a CompressedContext, not {type(ctx).__name__}")
        if key in self:
            raise KeyError(f"{key!r} is already in the store")
        self.check_compatible(ctx)
        if "hidden_size" not in self.manifest:
            self.manifest |= {"encoder": ctx.encoder} | identity(
                ctx.encoder_fingerprint, ctx.decoder_index, ctx.hidden_size, ctx.pooling_factor)
        self._pending[key] = ctx
        if len(self._pending) >= self.flush_every:
            self.flush()

    def add_many(self, keys: list[str], contexts: list[CompressedContext]) -> None:
        if len(keys) != len(contexts):
            raise ValueError(f"{len(keys)} ids for {len(contexts)} contexts")
        for key, ctx in zip(keys, contexts):
            self.add(key, ctx)

    def flush(self) -> None:
        """Write the queued contexts as one shard, then index them."""
        if not self._pending:
            return
        from . import __version__

        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "shards").mkdir(exist_ok=True)
        self.manifest["arccompress_version"] = __version__
        _atomic_write(self._manifest_path, json.dumps(self.manifest, indent=2).encode())
        number = len(list((self.path / "shards").glob("*.safetensors")))
        shard = f"{number:05d}.safetensors"
        dtype = STORAGE_DTYPES[self.manifest["dtype"]]
        tensors = {f"c{i}": ctx.embeddings.detach().to("cpu", dtype).contiguous() for i, ctx in enumerate(self._pending.values())}
        tmp = self.path / "shards" / (shard + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path / "shards" / shard)
        lines = []
        for i, (key, ctx) in enumerate(self._pending.items()):
            meta = ctx.metadata()
            entry = {"id": key, "shard": shard, "key": f"c{i}", "num_tokens": ctx.num_tokens,
                     "num_embeddings": ctx.num_embeddings, "chunk_size": ctx.chunk_size,
                     "text_sha256": meta.get("text_sha256"), "text_bytes": int(meta.get("text_bytes", 0)) or None}
            lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
            self._entries[key] = entry
        with open(self._index_path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        self._pending.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ContextStore({str(self.path)!r}, {len(self)} contexts, dtype={self.manifest['dtype']})"


def identity(fingerprint: str | None, decoder_index: int | None, hidden_size: int, pooling_factor: int) -> dict[str, Any]:
    """What must agree between a store and the contexts it holds (the IDENTITY keys)."""
    return {"encoder_fingerprint": fingerprint or "", "decoder_index": decoder_index,
            "hidden_size": hidden_size, "pooling_factor": pooling_factor}


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, not {dtype!r}")
    return name


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
