"""ContextStore: compressed contexts keyed by the caller's ids, in Parquet files that data tools read.

Layout of a store folder:

    manifest.json                    format, codec, what made the contexts (encoder fingerprint, head, sizes)
    codec-<hash>.safetensors         what reading needs besides the codes: the head's weights, the pq codebook
    data/part-<hash>.parquet         fragments: one row per context (id, token counts, text hash, codes)

Parquet, because every data tool reads it without a plugin (DuckDB, polars, pandas, Ray Data, `datasets`,
Spark), and a folder of immutable files is what concurrent writers need: each flush writes one new fragment
to a temporary name and renames it into `data/` (atomic on POSIX file systems), so there is no shared file to
lock or to corrupt. A crash loses at most the batch in flight; readers never see a half-written fragment;
two writers never touch each other's files. A fragment's name is the hash of its ids, so a retried task
that writes the same batch again replaces the file with an identical one instead of duplicating it.

The manifest is created once, atomically (written aside, then hard-linked into place, which fails if another
writer got there first), together with the codec file it names by hash. Every fragment carries the store's
identity in its Parquet metadata; reading checks it, and each row's codes against the codec's size.

Reading builds an id -> (fragment, row group, row) index from the `id` columns at open, so `get_many`
reads only the row groups that hold the requested ids (small row groups keep that to a few kB).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .codec import FLOAT_QUANTIZERS, Codec, parse_codec
from .context import CompressedContext, check_castable, check_finite
from .errors import CodecError, ContextNotFoundError, InputError, InputTypeError, StoreError
from .heads import resolve_head
from .tokenization import check_text

FORMAT = "arccompress-store"
VERSION = 2
MANIFEST = "manifest.json"
DATA = "data"
DEFAULT_CODEC = "bottleneck-float16"
ROW_GROUP_SIZE = 32  # rows per Parquet row group: what one random read decodes
SCHEMA_FIELDS = (  # column, pyarrow type name
    ("id", "string"), ("num_tokens", "int32"), ("num_embeddings", "int32"), ("chunk_size", "int32"),
    ("text_sha256", "string"), ("text_bytes", "int64"), ("codes", "binary"),
)


def _pa():
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def row_schema():
    pa, _ = _pa()
    return pa.schema([(name, getattr(pa, kind)()) for name, kind in SCHEMA_FIELDS])


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
        from .compressor import Compressor

        if compressor is not None and not isinstance(compressor, Compressor):
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
        self._pending: dict[str, tuple[dict[str, Any], torch.Tensor]] = {}  # id -> (row fields, codec-space vectors)
        self._index: dict[str, tuple[int, int, int]] = {}  # id -> (fragment, row group, row in group)
        self._fragments: list[Path] = []  # data files, in the order they were indexed
        self._duplicates = 0  # rows whose id an earlier fragment already holds
        self._files: dict[Path, Any] = {}  # open ParquetFiles
        self._scanned_mtime: int | None = None
        self.manifest: dict[str, Any] | None = None
        self._heads: dict[int, dict[str, torch.Tensor]] = {}  # head -> layer1, layer2, cont (encoder width)
        self._head_cache: dict[tuple[int | None, torch.device], dict[str, torch.Tensor]] = {}
        if (self.path / MANIFEST).is_file():
            self._open_existing(codec, bits_per_dim)
        else:
            self._check_new_folder()
            if codec is None and compressor is None:
                raise StoreError(f"{self.path} is a new store: pass compressor= (its default codec, {DEFAULT_CODEC}, "
                                 "keeps the head's bottleneck), or codec='float16' to keep decoder vectors without one")
            self.codec = self._new_codec(codec or DEFAULT_CODEC, bits_per_dim)
            if compressor is not None and compressor.head is None and self.codec.space != "encoder":
                raise StoreError(f"{compressor.name!r} has {compressor.num_heads} decoder heads: choose one "
                                 "(Compressor.select_head) before storing its contexts, or use an encoder-space codec")
        self._clean_temporary_files()
        if compressor is not None:
            self._check_identity(self._identity_of_compressor(), "the compressor")
        self._head_arg = head
        self._read_head = self._resolve_read_head(head)

    # ------------------------------------------------------------------ opening

    def _open_existing(self, codec: str | None, bits_per_dim: float | None) -> None:
        manifest = self._read_manifest()
        self.manifest = manifest
        self.codec = self._load_codec(manifest)
        if codec is not None:
            space, quantizer = parse_codec(codec)
            if (space, quantizer) != (self.codec.space, self.codec.quantizer) or (
                    bits_per_dim is not None and bits_per_dim != self.codec.bits_per_dim):
                raise StoreError(f"{self.path} keeps {self._codec_label()}, not {space}-{quantizer}"
                                 + (f" at {bits_per_dim} bits/dim" if bits_per_dim is not None else ""))

    def _check_new_folder(self) -> None:
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a folder")
        if (self.path / "index.jsonl").exists():
            raise StoreError(f"{self.path} is an arccompress 0.1 store (index.jsonl): convert it once with "
                             f"`arccompress convert {self.path} NEW_STORE`")
        # what an interrupted first flush can leave: a codec file without its manifest, temporary files
        for entry in self.path.iterdir():
            leftover = entry.name.startswith((".tmp-", "codec-")) or (
                entry.name == DATA and entry.is_dir() and all(e.name.startswith(".tmp-") for e in entry.iterdir()))
            if not leftover:
                raise StoreError(f"{self.path} exists and is not a context store (no {MANIFEST}; found {entry.name!r})")

    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: unreadable ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{path}: not an arccompress store manifest")
        if manifest.get("version") == 1 or (self.path / "index.jsonl").exists():
            raise StoreError(f"{self.path} is an arccompress 0.1 store: convert it once with "
                             f"`arccompress convert {self.path} NEW_STORE`")
        if manifest.get("version") != VERSION:
            raise StoreError(f"{path}: store version {manifest.get('version')!r}; this arccompress reads {VERSION}")
        required = {"store_id": str, "codec": dict, "encoder": str, "encoder_fingerprint": str,
                    "hidden_size": int, "pooling_factor": int, "encoder_dim": int, "bottleneck_dim": int}
        for key, kind in required.items():
            if not isinstance(manifest.get(key), kind):
                raise StoreError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
        if manifest.get("head") is not None and not isinstance(manifest["head"], int):
            raise StoreError(f"{path}: field 'head' must be an int or null")
        return manifest

    def _load_codec(self, manifest: dict[str, Any]) -> Codec:
        spec = manifest["codec"]
        path = self.path / MANIFEST
        try:
            space, quantizer = parse_codec(f"{spec['space']}-{spec['quantizer']}")
            codec = Codec(space, quantizer, int(spec["dim"]), spec.get("bits_per_dim"))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path}: bad codec description {spec!r} ({e})") from None
        expected_dim = {"decoder": manifest["hidden_size"], "bottleneck": manifest["bottleneck_dim"],
                        "encoder": manifest["encoder_dim"]}[space]
        if codec.dim != expected_dim or spec.get("bytes_per_vector") != codec.bytes_per_vector:
            raise StoreError(f"{path}: codec dims {spec!r} do not match the store's sizes")
        tensors = self._read_codec_file(manifest)
        if quantizer == "pq":
            book = tensors.get("codebook")
            want = (codec.num_subquantizers, 256, codec.dim // codec.num_subquantizers)
            if book is None or tuple(book.shape) != want:
                raise StoreError(f"{self.path / manifest.get('codec_file', '?')}: pq codebook missing or not {list(want)}")
            codec.codebook = book.float()
        for key, tensor in tensors.items():
            if key.startswith("head"):
                head, _, name = key.partition(".")
                self._heads.setdefault(int(head[4:]), {})[name] = tensor.float()
        if space != "decoder":
            heads = [manifest["head"]] if manifest.get("head") is not None else list(self._heads)
            shapes = {"layer1": (manifest["bottleneck_dim"], manifest["encoder_dim"]),
                      "layer2": (manifest["hidden_size"], manifest["bottleneck_dim"]), "cont": (1, manifest["encoder_dim"])}
            for h in heads:
                for name, shape in shapes.items():
                    if tuple(self._heads.get(h, {}).get(name, torch.empty(0)).shape) != shape:
                        raise StoreError(f"{self.path / manifest['codec_file']}: head {h} {name} missing or not {list(shape)}")
        return codec

    def _read_codec_file(self, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
        name = manifest.get("codec_file")
        if name is None:
            return {}
        path = self.path / str(name)
        if Path(str(name)).name != name or not path.is_file():
            raise StoreError(f"{self.path / MANIFEST}: codec file {name!r} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest.get("codec_sha256"):
            raise StoreError(f"{path}: contents do not match the manifest's sha256 (changed or damaged)")
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as e:  # safetensors raises its own error types
            raise StoreError(f"{path}: not a readable safetensors file ({e})") from None
        for key, tensor in tensors.items():
            if not tensor.dtype.is_floating_point or not bool(torch.isfinite(tensor).all()):
                raise StoreError(f"{path}: {key} is not finite floating-point data")
        return tensors

    def _new_codec(self, name: str, bits_per_dim: float | None) -> Codec:
        space, quantizer = parse_codec(name)
        comp = self.compressor
        if space != "decoder" and comp is None:
            raise StoreError(f"a new store with the {space}-{quantizer} codec needs compressor=: reading it applies "
                             "the encoder head, whose weights the store keeps")
        if comp is not None:
            cfg = comp.model.config
            dim = {"decoder": cfg.decoder_hidden_size, "bottleneck": cfg.bridge_hidden_dim, "encoder": cfg.dim}[space]
            return Codec(space, quantizer, dim, bits_per_dim)
        return _DeferredCodec(space, quantizer, bits_per_dim)  # decoder width: from the first context

    def _resolve_read_head(self, head: int | str | None) -> int | None:
        """The decoder head contexts are read for: the store's own, or for an encoder-space store (which serves
        every head of its encoder) the one asked for, the compressor's, or the only one."""
        if self.codec.space != "encoder":
            stored = self.manifest.get("head") if self.manifest is not None else \
                (self.compressor.head if self.compressor is not None else None)
            if isinstance(head, int) and stored is not None and head != stored:
                raise StoreError(f"{self.path} holds contexts for head {stored}, not {head}")
            return stored
        n_heads = len(self._heads) if self.manifest is not None else self.compressor.num_heads
        if head is not None:
            return resolve_head(head, n_heads)
        if self.compressor is not None and self.compressor.head is not None:
            return self.compressor.head
        return 0 if n_heads == 1 else None

    # ------------------------------------------------------------------ identity

    def _identity_of_compressor(self) -> dict[str, Any]:
        comp = self.compressor
        cfg = comp.model.config
        return {"encoder_fingerprint": comp.fingerprint, "hidden_size": cfg.decoder_hidden_size,
                "pooling_factor": cfg.pooling_factor, "encoder_dim": cfg.dim, "bottleneck_dim": cfg.bridge_hidden_dim,
                "head": comp.head}

    def _check_identity(self, own: dict[str, Any], what: str) -> None:
        """StoreError unless `own` agrees with the store's manifest (or, before it exists, its compressor)."""
        if self.manifest is not None:
            reference, made_by = self.manifest, f"store made by encoder {self.manifest['encoder']!r}"
        elif self.compressor is not None and what != "the compressor":
            reference, made_by = self._identity_of_compressor(), f"the store's compressor {self.compressor.name!r}"
        else:
            return  # a new store takes the identity of its compressor or first context
        for key, value in own.items():
            if key == "head" and (self.codec.space == "encoder" or value is None):
                continue  # an encoder-space store serves every head; an open choice is made when reading
            if value is not None and reference.get(key) is not None and reference.get(key) != value:
                raise StoreError(f"{what} does not belong in {self.path}: {key} {value!r} != {reference[key]!r} "
                                 f"({made_by})")

    def check_compatible(self, ctx: CompressedContext) -> None:
        """Raise StoreError if `ctx` was made by another encoder, head or size than the store's contexts."""
        self._check_identity({"encoder_fingerprint": ctx.encoder_fingerprint or "", "hidden_size": ctx.hidden_size,
                              "pooling_factor": ctx.pooling_factor, "head": ctx.head}, "the context")

    # ------------------------------------------------------------------ fragments and index

    def refresh(self) -> None:
        """Index the fragments written since the last look (by this or any other writer), oldest first.

        The index is built on first use (a writer that only appends never reads other fragments)."""
        with self._lock:
            data = self.path / DATA
            if self.manifest is None or not data.is_dir():
                return
            mtime = data.stat().st_mtime_ns
            if mtime == self._scanned_mtime:
                return
            seen = {f.name for f in self._fragments}
            new = []
            for file in data.iterdir():
                if file.suffix == ".parquet" and not file.name.startswith(".") and file.name not in seen:
                    try:
                        new.append((file.stat().st_mtime_ns, file.name, file))
                    except FileNotFoundError:
                        continue  # replaced by an identical rewrite meanwhile: seen next time
            for _, _, file in sorted(new):
                self._index_fragment(file)
            self._scanned_mtime = mtime

    def _clean_temporary_files(self) -> None:
        """Remove temporary files that writers on this machine left when they died (never a live one's)."""
        host = socket.gethostname()
        for folder in (self.path, self.path / DATA):
            if not folder.is_dir():
                continue
            for file in folder.glob(".tmp-*"):
                parts = file.name.split("-")
                if len(parts) >= 4 and "-".join(parts[1:-2]) == host and parts[-2].isdigit() and \
                        not _alive(int(parts[-2])):
                    file.unlink(missing_ok=True)

    def _index_fragment(self, file: Path) -> None:
        _, pq = _pa()
        try:
            pf = pq.ParquetFile(file)
            meta = pf.schema_arrow.metadata or {}
            ident = json.loads(meta.get(b"arccompress", b"{}"))
            if ident.get("store_id") != self.manifest["store_id"]:
                raise StoreError(f"{file}: fragment of another store (store_id {ident.get('store_id')!r})")
            if [f.name for f in pf.schema_arrow] != [n for n, _ in SCHEMA_FIELDS]:
                raise StoreError(f"{file}: columns {pf.schema_arrow.names} are not a store fragment's")
            ids = pf.read(columns=["id"]).column(0).to_pylist()
            starts, total = [], 0
            for g in range(pf.metadata.num_row_groups):
                starts.append(total)
                total += pf.metadata.row_group(g).num_rows
        except StoreError:
            raise
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
            raise StoreError(f"{file}: not a readable store fragment ({e})") from None
        k = len(self._fragments)
        self._fragments.append(file)
        g = 0
        for row, key in enumerate(ids):
            while g + 1 < len(starts) and row >= starts[g + 1]:
                g += 1
            if not isinstance(key, str) or key in self._index:
                self._duplicates += 1  # the fragment indexed first (the oldest) wins
                continue
            self._index[key] = (k, g, row - starts[g])

    def __len__(self) -> int:
        self.refresh()
        return len(self._index) + sum(1 for k in self._pending if k not in self._index)

    def __contains__(self, key: object) -> bool:
        if key in self._index or key in self._pending:
            return True
        if isinstance(key, str) and self.manifest is not None:
            self.refresh()  # another writer may have added it
            return key in self._index
        return False

    def __iter__(self) -> Iterator[str]:
        self.refresh()
        yield from list(self._index)
        yield from [k for k in self._pending if k not in self._index]

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> Iterator[tuple[str, CompressedContext]]:
        for key in list(self):
            yield key, self[key]

    def __getitem__(self, key: str) -> CompressedContext:
        return self.get(key)

    def get(self, key: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CompressedContext:
        """The context stored under `key` (KeyError if none), as the decoder reads it."""
        return self.get_many([key], device=device, dtype=dtype)[0]

    def get_many(
        self, keys: Sequence[str], *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> list[CompressedContext]:
        """The contexts stored under `keys`, in that order (e.g. a retriever's top-k): one read per row group."""
        if isinstance(keys, str):
            raise InputTypeError("get_many takes a list of ids; use store[id] for one")
        keys = list(keys)
        missing = [k for k in keys if k not in self]
        if missing:
            raise ContextNotFoundError(f"not in {self.path}: {', '.join(map(repr, missing[:5]))}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        rows: dict[str, dict[str, Any]] = {}
        with self._lock:
            wanted: dict[tuple[int, int], list[tuple[str, int]]] = {}
            for key in keys:
                if key in self._index and key not in rows:
                    k, g, r = self._index[key]
                    wanted.setdefault((k, g), []).append((key, r))
            for (k, g), items in wanted.items():
                table = self._read_row_group(k, g)
                for key, r in items:
                    row = {name: table[name][r].as_py() for name in table.column_names}
                    if row["id"] != key:
                        raise StoreError(f"{self._fragments[k]}: row {r} of row group {g} is {row['id']!r}, "
                                         f"expected {key!r} (the file changed after it was indexed)")
                    rows[key] = row
        head = self._require_read_head()
        device = torch.device(device)
        out = []
        stored = [k for k in keys if k not in self._pending]
        vectors = self._decode_rows([rows[k] for k in stored], head, device) if stored else []
        by_key = dict(zip(stored, vectors))
        for key in keys:
            if key in self._pending:
                fields, vecs = self._pending[key]
                emb = self._to_decoder(vecs.to(device, torch.float32), head, [vecs.shape[0]])[0]
            else:
                fields, emb = rows[key], by_key[key]
            out.append(self._context(fields, emb, head).to(dtype=dtype))
        return out

    def _read_row_group(self, k: int, g: int):
        _, pq = _pa()
        frag = self._fragments[k]
        try:
            pf = self._files.get(frag)
            if pf is None:
                if len(self._files) >= 256:
                    self._files.clear()
                pf = self._files[frag] = pq.ParquetFile(frag)
            return pf.read_row_group(g)
        except Exception as e:
            raise StoreError(f"{frag}: cannot read row group {g} ({e})") from None

    def _decode_rows(self, rows: list[dict[str, Any]], head: int | None, device: torch.device) -> list[torch.Tensor]:
        """Decoder inputs of stored rows, on `device`: codes checked against the codec, decoded, the head applied."""
        bpv = self.codec.bytes_per_vector
        lengths, blobs = [], []
        for row in rows:
            n_vec = row["num_embeddings"] - (0 if self.codec.space == "decoder" else 1)
            codes = row["codes"]
            if not isinstance(codes, bytes) or n_vec < 1 or len(codes) != n_vec * bpv or row["num_tokens"] < 1:
                raise StoreError(f"{self.path}: context {row['id']!r} has {len(codes or b'')} bytes of codes for "
                                 f"{row['num_embeddings']} embeddings; {self.codec.name} needs {bpv} per vector")
            lengths.append(n_vec)
            blobs.append(codes)
        codes = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(-1, bpv)
        vectors = self.codec.decode(codes).to(device)
        # pq codes index a checked codebook; the other codecs store raw numbers, which a damaged file can corrupt
        if self.codec.quantizer != "pq" and not bool(torch.isfinite(vectors).all()):
            raise StoreError(f"{self.path}: stored vectors of {rows[0]['id']!r}... hold NaN or infinity")
        return self._to_decoder(vectors, head, lengths)

    def _to_decoder(self, vectors: torch.Tensor, head: int | None, lengths: list[int]) -> list[torch.Tensor]:
        """Codec-space vectors of contexts of `lengths` vectors each -> their decoder inputs, <Cont> appended,
        computed where the vectors are (a GPU reads a RAG top-k in well under a millisecond)."""
        if self.codec.space == "decoder":
            return list(vectors.split(lengths))
        w = self._device_head(head, vectors.device)
        with torch.inference_mode():
            hidden = vectors if self.codec.space == "bottleneck" else vectors @ w["layer1"].T
            out = hidden @ w["layer2"].T  # (sum of lengths, H)
        return [torch.cat([part, w["cont_out"]]) for part in out.split(lengths)]

    def _device_head(self, head: int | None, device: torch.device) -> dict[str, torch.Tensor]:
        """The head's weights on `device`, with its <Cont> vector already through the head (cached)."""
        key = (head, device)
        if key not in self._head_cache:
            w = {k: v.to(device) for k, v in self._heads[head].items()}  # type: ignore[index]
            with torch.inference_mode():
                w["cont_out"] = (w["cont"] @ w["layer1"].T) @ w["layer2"].T  # (1, H)
            self._head_cache[key] = w
        return self._head_cache[key]

    def _require_read_head(self) -> int | None:
        if self.codec.space == "encoder" and self._read_head is None and self.manifest is not None:
            raise StoreError(f"{self.path} keeps encoder vectors for {len(self._heads)} decoder heads: choose one "
                             "with ContextStore(..., head=) or compressor=")
        return self._read_head

    def _context(self, fields: dict[str, Any], embeddings: torch.Tensor, head: int | None) -> CompressedContext:
        m = self.manifest
        if m is None:  # pending contexts of a store whose manifest is not written yet
            m = self._manifest_from(None)
        return CompressedContext(
            embeddings=embeddings, num_tokens=fields["num_tokens"], encoder=m["encoder"],
            head=head if head is not None else 0, pooling_factor=m["pooling_factor"],
            chunk_size=fields.get("chunk_size"), encoder_fingerprint=m["encoder_fingerprint"] or None,
        )

    # ------------------------------------------------------------------ statistics

    def stats(self) -> dict[str, Any]:
        """Sizes on disk next to the raw text's: the paper's storage claim, on your data."""
        self.refresh()
        tokens = embeddings = text = 0
        _, pq = _pa()
        for k, frag in enumerate(self._fragments):
            try:
                t = pq.read_table(frag, columns=["id", "num_tokens", "num_embeddings", "text_bytes"])
            except Exception as e:
                raise StoreError(f"{frag}: not a readable store fragment ({e})") from None
            for key, n, e, b in zip(*(t.column(i).to_pylist() for i in range(4))):
                if self._index.get(key, (None,))[0] == k:  # duplicates count once
                    tokens += n
                    embeddings += e
                    text += b or 0
        disk = sum(f.stat().st_size for f in self._fragments)
        extra = (self.path / self.manifest["codec_file"]).stat().st_size if self.manifest and \
            self.manifest.get("codec_file") else 0
        return {
            "contexts": len(self._index),
            "tokens": tokens,
            "embeddings": embeddings,
            "codec": self._codec_label(),
            "fragments": len(self._fragments),
            "duplicates": self._duplicates,
            "data_bytes": disk,
            "codec_bytes": extra,
            "text_bytes": text,
            "bytes_per_token": disk / tokens if tokens else 0.0,
            "text_bytes_per_token": text / tokens if tokens else 0.0,
            "size_vs_text": disk / text if text else float("nan"),
        }

    def _codec_label(self) -> str:
        bits = f" at {self.codec.bits_per_dim:g} bits/dim" if self.codec.quantizer == "pq" else ""
        return f"{self.codec.name}{bits}"

    # ------------------------------------------------------------------ writing

    def _vectors_of(self, ctx: CompressedContext, where: str) -> torch.Tensor:
        """The codec-space vectors of a context (float32, CPU), checked to fit the codec's dtype."""
        vectors = self._space_vectors(ctx, where)
        if self.codec.quantizer in FLOAT_QUANTIZERS:
            check_castable(vectors, FLOAT_QUANTIZERS[self.codec.quantizer], where)
        return vectors

    def _space_vectors(self, ctx: CompressedContext, where: str) -> torch.Tensor:
        if self.codec.space == "decoder":
            return ctx.embeddings.detach().to("cpu", torch.float32)
        if ctx.pooled is None:
            raise StoreError(f"{where}: this store keeps {self.codec.space} vectors, which a context carries only as "
                             "Compressor.compress made it (not after save/load or from a store): add the texts "
                             "with add_texts(), or contexts fresh from compress()")
        pooled = ctx.pooled.detach().to("cpu", torch.float32)
        if pooled.dim() != 2 or pooled.shape[0] != ctx.num_embeddings - 1:
            raise StoreError(f"{where}: pooled vectors {list(pooled.shape)} do not match {ctx.num_embeddings} embeddings")
        if self.codec.space == "encoder":
            return pooled
        w = self._head_weights(ctx.head)
        with torch.inference_mode():
            return pooled @ w["layer1"].T

    def _head_weights(self, head: int) -> dict[str, torch.Tensor]:
        if head not in self._heads:
            if self.compressor is None:
                raise StoreError(f"{self.path}: no weights for head {head}")
            self._heads[head] = self.compressor.model.head(head).to("cpu", torch.float32).weights()
        return self._heads[head]

    def add(self, key: str, ctx: CompressedContext) -> None:
        """Queue one context under `key`; written with the next flush (every `flush_every`)."""
        self.add_many([key], [ctx])

    def add_many(self, keys: Sequence[str], contexts: Sequence[CompressedContext]) -> None:
        """Queue several contexts; all are checked before any is queued."""
        keys, contexts = list(keys), list(contexts)
        if len(keys) != len(contexts):
            raise InputError(f"{len(keys)} ids for {len(contexts)} contexts")
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise InputError(f"id {dup!r} is given twice")
        rows = []
        first = next(iter(self._pending.values()))[0] if self._pending else None
        for key, ctx in zip(keys, contexts):
            if not isinstance(key, str) or not key:
                raise InputTypeError(f"store ids must be non-empty str, not {key!r}")
            if not isinstance(ctx, CompressedContext):
                raise InputTypeError(f"expected a CompressedContext for {key!r}, not {type(ctx).__name__}")
            if key in self:
                raise StoreError(f"{key!r} is already in the store")
            fields, vectors = self._row(key, ctx)
            fields |= {"_encoder_fingerprint": ctx.encoder_fingerprint, "_head": ctx.head,
                       "_pooling_factor": ctx.pooling_factor, "_encoder": ctx.encoder, "_hidden_size": ctx.hidden_size}
            first = first or fields
            for field in ("encoder_fingerprint", "head", "pooling_factor", "hidden_size"):
                if first["_" + field] != fields["_" + field] and not (field == "head" and self.codec.space == "encoder"):
                    raise StoreError(f"context {key!r} was made by another {field.replace('_', ' ')} than the "
                                     "contexts waiting to be written")
            rows.append((key, fields, vectors))
        if rows and isinstance(self.codec, _DeferredCodec):
            self.codec = self.codec.resolve(rows[0][1]["_hidden_size"])
        for key, fields, vectors in rows:
            self._pending[key] = (fields, vectors)
            if len(self._pending) >= self.flush_every:
                self._flush(explicit=False)

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
        if self.manifest is not None:
            raise StoreError(f"{self.path} already exists; a store is trained once, when it is created")
        if self.codec.quantizer != "pq":
            self.create()
            return 0
        vectors: list[torch.Tensor] = []
        have, batch = 0, []
        items = iter(data)
        while have < self.train_size:
            batch = [x for _, x in zip(range(self.flush_every), items)]
            if not batch:
                break
            if isinstance(batch[0], str):
                batch = self._require_compressor("train").compress(batch, chunk_size=chunk_size, show_progress_bar=False)
            for i, ctx in enumerate(batch):
                vectors.append(self._vectors_of(ctx, f"training context {have + i}"))
            have = sum(v.shape[0] for v in vectors)
        stacked = torch.cat(vectors) if vectors else torch.empty(0, self.codec.dim)
        try:
            used = self.codec.train(stacked, max_vectors=self.train_size)
        except CodecError as e:
            raise StoreError(f"{self.path}: {e}") from None
        self._create_manifest(batch[0] if batch and isinstance(batch[0], CompressedContext) else None, trained_on=used)
        return used

    def create(self) -> None:
        """Write the store's manifest now, before anything is added (a pq store is created by `train`): what
        parallel writers need to exist before they start."""
        if self.manifest is not None:
            return
        if self.codec.needs_training:
            raise StoreError(f"{self.path}: a pq store is created by train(texts), which trains its codebook")
        if isinstance(self.codec, _DeferredCodec):
            raise StoreError(f"{self.path}: a store without compressor= is created by its first flush")
        self._create_manifest(None, trained_on=None)

    def _require_compressor(self, what: str):
        if self.compressor is None:
            raise StoreError(f"{what} needs the store opened with compressor=")
        return self.compressor

    def flush(self) -> None:
        """Write the queued contexts as one fragment (training the pq codebook first, if it has none yet)."""
        self._flush(explicit=True)

    def _flush(self, explicit: bool) -> None:
        with self._lock:
            if not self._pending:
                return
            if self.codec.needs_training:
                vectors = torch.cat([v for _, v in self._pending.values()])
                if vectors.shape[0] < self.train_size and not explicit:
                    return  # keep collecting: the codebook is trained on the first train_size vectors
                try:
                    used = self.codec.train(vectors, max_vectors=self.train_size)
                except CodecError as e:
                    raise StoreError(f"{self.path}: {e}") from None
                self._create_manifest(None, trained_on=used)
            elif self.manifest is None:
                self._create_manifest(None, trained_on=None)
            keys = list(self._pending)
            table = self._table(keys, [self._pending[k][0] for k in keys], [self._pending[k][1] for k in keys])
            self._write_fragment(table)
            self._pending.clear()

    def encode(self, keys: Sequence[str], contexts: Sequence[CompressedContext]):
        """Rows of the store's Parquet format for these contexts (a pyarrow Table), without writing them:
        what parallel workers produce and `append` (or a Ray datasink) writes. The store must exist."""
        if self.manifest is None:
            raise StoreError(f"{self.path} has no manifest yet: create it (a first flush, or train()) before encoding")
        keys = list(keys)
        rows = [self._row(key, ctx) for key, ctx in zip(keys, contexts, strict=True)]
        return self._table(keys, [fields for fields, _ in rows], [vectors for _, vectors in rows])

    def _row(self, key: str, ctx: CompressedContext) -> tuple[dict[str, Any], torch.Tensor]:
        """A checked context's row fields and codec-space vectors."""
        check_text(key, f"store id {key[:40]!r}")
        check_finite(ctx.embeddings, f"context {key!r}: embeddings")
        self.check_compatible(ctx)
        meta = ctx.metadata()
        fields = {"id": key, "num_tokens": ctx.num_tokens, "num_embeddings": ctx.num_embeddings,
                  "chunk_size": ctx.chunk_size, "text_sha256": meta.get("text_sha256"),
                  "text_bytes": int(meta["text_bytes"]) if "text_bytes" in meta else None}
        return fields, self._vectors_of(ctx, f"context {key!r}")

    def _table(self, keys: list[str], fields: list[dict[str, Any]], vectors: list[torch.Tensor]):
        pa, _ = _pa()
        codes = self.codec.encode(torch.cat(vectors)) if vectors else np.zeros((0, self.codec.bytes_per_vector), np.uint8)
        blobs, k = [], 0
        for v in vectors:
            blobs.append(codes[k: k + v.shape[0]].tobytes())
            k += v.shape[0]
        columns = {name: [f.get(name) for f in fields] for name, _ in SCHEMA_FIELDS if name not in ("id", "codes")}
        return pa.table({"id": keys, **columns, "codes": blobs}, schema=row_schema())

    def append(self, table, *, check_ids: bool = True) -> str:
        """Write a table of rows (from `encode`) as one fragment; return its file name. Ids already stored are
        refused, unless the fragment is an identical rewrite (a retried task); check_ids=False skips that check,
        which reads every fragment's ids, for jobs that left out stored ids before they started."""
        if self.manifest is None:
            raise StoreError(f"{self.path} has no manifest yet: nothing can be appended")
        if table.schema.names != [n for n, _ in SCHEMA_FIELDS]:
            raise StoreError(f"rows to append have columns {table.schema.names}, not a store fragment's")
        table = table.cast(row_schema())
        self._validate_rows(table)
        return self._write_fragment(table, check_ids=check_ids)

    def _validate_rows(self, table) -> None:
        bpv = self.codec.bytes_per_vector
        extra = 0 if self.codec.space == "decoder" else 1
        ids = table.column("id").to_pylist()
        if len(set(ids)) != len(ids) or any(not isinstance(i, str) or not i for i in ids):
            raise StoreError("rows to append must have distinct, non-empty ids")
        for key, n, e, codes in zip(ids, table.column("num_tokens").to_pylist(), table.column("num_embeddings").to_pylist(),
                                    table.column("codes").to_pylist()):
            if not n or not e or e <= extra or codes is None or len(codes) != (e - extra) * bpv:
                raise StoreError(f"row {key!r}: {len(codes or b'')} bytes of codes for {e} embeddings "
                                 f"({self.codec.name} needs {bpv} per vector)")

    def _write_fragment(self, table, *, check_ids: bool = True) -> str:
        _, pq = _pa()
        ids = table.column("id").to_pylist()
        name = "part-" + hashlib.sha256("\x00".join(ids).encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".parquet"
        data = self.path / DATA
        data.mkdir(parents=True, exist_ok=True)
        final = data / name
        if final.exists() and self._fragment_rows_equal(final, table):
            return name  # an identical fragment is already committed: a retried write
        if check_ids:
            self.refresh()
            clashing = [k for k in ids if k in self._index and self._fragments[self._index[k][0]] != final]
            if clashing:
                raise StoreError(f"ids already stored: {', '.join(map(repr, clashing[:5]))}")
        ident = json.dumps({"store_id": self.manifest["store_id"], "codec": self._codec_label(),
                            "encoder_fingerprint": self.manifest["encoder_fingerprint"]})
        table = table.replace_schema_metadata({b"arccompress": ident.encode()})
        tmp = _temporary_path(data / name)
        try:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression={"id": "zstd", "codes": "none"},
                           use_dictionary=["id"], write_statistics=["id"])
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return name

    def _fragment_rows_equal(self, path: Path, table) -> bool:
        _, pq = _pa()
        try:
            return pq.read_table(path).replace_schema_metadata(None).equals(table.replace_schema_metadata(None))
        except Exception:
            return False

    def _manifest_from(self, first: CompressedContext | None) -> dict[str, Any]:
        if self.compressor is not None:
            ident = {"encoder": self.compressor.name, **self._identity_of_compressor()}
        else:
            fields = first if first is not None else next(iter(self._pending.values()))[0]
            get = (lambda k: getattr(fields, k)) if isinstance(fields, CompressedContext) else (lambda k: fields["_" + k])
            # without a compressor only decoder-space stores are created: the pooled sizes are unknown (0)
            ident = {"encoder": get("encoder"), "encoder_fingerprint": get("encoder_fingerprint") or "",
                     "hidden_size": get("hidden_size"), "pooling_factor": get("pooling_factor"),
                     "encoder_dim": 0, "bottleneck_dim": 0, "head": get("head")}
        if self.codec.space == "encoder":
            ident["head"] = None
        elif ident["head"] is None and self._pending:
            ident["head"] = next(iter(self._pending.values()))[0]["_head"]
        return {"format": FORMAT, "version": VERSION, "store_id": uuid.uuid4().hex, **ident,
                "codec": self.codec.describe(), "arccompress_version": __version__}

    def _create_manifest(self, first: CompressedContext | None, *, trained_on: int | None) -> None:
        """Write the codec file and the manifest, atomically; adopt another writer's if it won the race."""
        from safetensors.torch import save

        manifest = self._manifest_from(first)
        if self.codec.quantizer == "pq":
            manifest["codec"]["trained_on_vectors"] = trained_on
        tensors: dict[str, torch.Tensor] = {}
        if self.codec.codebook is not None:
            tensors["codebook"] = self.codec.codebook.contiguous()
        if self.codec.space != "decoder":
            heads = range(self.compressor.num_heads) if self.codec.space == "encoder" else [manifest["head"]]
            for h in heads:
                for name, tensor in self._head_weights(h).items():
                    # bfloat16 when that is exact (the released weights are bfloat16): half the bytes, same numbers
                    as_bf16 = tensor.to(torch.bfloat16)
                    tensors[f"head{h}.{name}"] = as_bf16 if torch.equal(as_bf16.float(), tensor) else tensor.contiguous()
        self.path.mkdir(parents=True, exist_ok=True)
        if tensors:
            blob = save(tensors)
            digest = hashlib.sha256(blob).hexdigest()
            manifest |= {"codec_file": f"codec-{digest[:16]}.safetensors", "codec_sha256": digest}
            _atomic_write(self.path / manifest["codec_file"], blob, exclusive=False)
        try:
            _atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode(), exclusive=True)
            self.manifest = manifest
        except FileExistsError:  # another writer created the store first: use its manifest and codebook
            self.manifest = self._read_manifest()
            codec = self._load_codec(self.manifest)
            if (codec.space, codec.quantizer, codec.bits_per_dim) != (self.codec.space, self.codec.quantizer,
                                                                      self.codec.bits_per_dim):
                raise StoreError(f"{self.path} was created meanwhile with codec {codec.name}") from None
            self.codec = codec
            self._check_identity({k: manifest[k] for k in ("encoder_fingerprint", "hidden_size", "pooling_factor",
                                                           "head")}, "this writer's contexts")
        self._read_head = self._resolve_read_head(self._head_arg)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()

    def __repr__(self) -> str:
        return f"ContextStore({str(self.path)!r}, {len(self)} contexts, codec={self._codec_label()})"

    # ------------------------------------------------------------------ stores of arccompress 0.1

    @classmethod
    def convert(cls, old: str | Path, new: str | Path, *, codec: str = "float16", **kwargs: Any) -> ContextStore:
        """Copy an arccompress 0.1 store (safetensors shards + index.jsonl) into a new store, once.

        The old store kept decoder-space vectors, so the new one keeps them too (codec "float32", "float16",
        "bfloat16", "decoder-int8" or "decoder-pq"); compact bottleneck codecs need the texts compressed again.
        """
        if parse_codec(codec)[0] != "decoder":
            raise StoreError(f"a 0.1 store holds decoder vectors only: convert it with a decoder-space codec, "
                             f"not {codec!r} (or compress the texts again)")
        target = cls(new, codec=codec, **kwargs)
        if len(target):
            raise StoreError(f"{new} is not empty")
        for key, ctx in _read_v1(Path(old)):
            target.add(key, ctx)
        target.close()
        return target


class _DeferredCodec(Codec):
    """A decoder-space codec of a store made without a compressor: its width is the first context's."""

    def __init__(self, space: str, quantizer: str, bits_per_dim: float | None):
        self.space, self.quantizer, self.bits_per_dim, self.codebook = space, quantizer, bits_per_dim, None
        self.dim = 0

    def resolve(self, dim: int) -> Codec:
        return Codec(self.space, self.quantizer, dim, self.bits_per_dim)


def _read_v1(path: Path) -> Iterator[tuple[str, CompressedContext]]:
    """(id, context) of an arccompress 0.1 store, in index order."""
    from safetensors import safe_open

    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        lines = (path / "index.jsonl").read_bytes().split(b"\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not a readable arccompress 0.1 store ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise StoreError(f"{path}: not an arccompress 0.1 store")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            shard = path / "shards" / entry["shard"]
            with safe_open(shard, framework="pt") as f:
                emb = f.get_tensor(entry["key"])
        except Exception as e:  # a line cut by a crash ends the usable index
            if n == len(lines):
                break
            raise StoreError(f"{path / 'index.jsonl'}:{n}: unreadable entry ({e})") from None
        meta = {k: "" if v is None else str(v) for k, v in (manifest | entry).items()}
        yield entry["id"], CompressedContext.from_metadata(emb, meta, f"{path}:{entry['id']}")


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in ("float32", "float16", "bfloat16"):
        raise InputError(f"storage dtype must be one of bfloat16, float16, float32, not {dtype!r}")
    return name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_path(final: Path) -> Path:
    """Where a writer prepares `final`: `.tmp-<host>-<pid>-<random>` beside it, so that a writer on the same
    host can tell a dead writer's leftovers (see ContextStore._clean_temporary_files) from a live one's."""
    return final.with_name(f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}")


def _atomic_write(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write `data` to `path` through a temporary file; with exclusive=True fail (FileExistsError) if `path`
    exists, as only one of several racing writers may create it."""
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic create-if-absent
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
