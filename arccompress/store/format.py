"""The store's on-disk format: the row schema, fragment names, row checksums and what a fragment records.

A fragment is a Parquet file of rows, one per context:

    id              string   the caller's id (any Unicode text)
    num_tokens      int32    encoder tokens of the text
    num_embeddings  int32    decoder positions of the context, <Cont> included
    chunk_size      int32    the chunk size it was compressed with (null: whole text)
    text_sha256     string   SHA-256 of the text's UTF-8 bytes (null when unknown)
    text_bytes      int64    the text's UTF-8 size (null when unknown)
    codes           binary   the codec's bytes, one fixed-size code per stored vector
    checksum        binary   xxh3-128 of every value above, id included: verified on every read

Its name is `part-<sha256 of its ids>.parquet`, over an unambiguous encoding of the id list (the UTF-8 bytes
and their offsets), so different id lists cannot share a name, and a reader checks at open that the `id`
column still hashes to it. Its Parquet key-value metadata (`arccompress`) records the store, codec, sizes,
encoder and codec file it was written for; indexing compares them with the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ..errors import StoreError

FORMAT = "arccompress-store"
VERSION = 3
MANIFEST = "manifest.json"
DATA = "data"
ROW_GROUP_SIZE = 32  # rows per Parquet row group: what one random read decodes
FRAGMENT_PREFIX, FRAGMENT_SUFFIX = "part-", ".parquet"
NAME_HEX = 32  # 128 bits of the ids' SHA-256 in a fragment's name
METADATA_KEY = b"arccompress"
COLUMNS = (
    ("id", pa.string()), ("num_tokens", pa.int32()), ("num_embeddings", pa.int32()), ("chunk_size", pa.int32()),
    ("text_sha256", pa.string()), ("text_bytes", pa.int64()), ("codes", pa.binary()), ("checksum", pa.binary()),
)
FIELDS = tuple(name for name, _ in COLUMNS)
CHECKED = FIELDS[:-1]  # the columns a row's checksum covers
INT64 = struct.Struct("<q")


def cont_added(cont_stored: bool) -> int:
    """Decoder positions reading adds to a context's stored vectors: its <Cont> row, unless the store keeps it.
    A row's `num_embeddings` counts decoder positions; its codes hold `num_embeddings - cont_added` vectors."""
    return 0 if cont_stored else 1


def row_schema() -> pa.Schema:
    """The columns of a store fragment, in order."""
    return pa.schema(COLUMNS)


# ---------------------------------------------------------------------------- fragment names


def ids_digest(ids: pa.Array | pa.ChunkedArray) -> str:
    """SHA-256 (hex) of a list of ids: their count, UTF-8 offsets (int64) and bytes, hashed from Arrow's buffers."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if arr.type == pa.large_string():
        arr = arr.cast(pa.string())
    if arr.type != pa.string() or arr.null_count:
        raise StoreError(f"ids must be non-null strings, not {arr.type}")
    n = len(arr)
    h = hashlib.sha256(b"arccompress ids\0" + INT64.pack(n))
    if n:
        offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1].astype("<i8")
        h.update((offsets - offsets[0]).tobytes())
        h.update(memoryview(arr.buffers()[2])[offsets[0]: offsets[-1]])
    return h.hexdigest()


def fragment_name(ids: pa.Array | pa.ChunkedArray) -> str:
    return f"{FRAGMENT_PREFIX}{ids_digest(ids)[:NAME_HEX]}{FRAGMENT_SUFFIX}"


def is_fragment_name(name: str) -> bool:
    return name.startswith(FRAGMENT_PREFIX) and name.endswith(FRAGMENT_SUFFIX) and \
        len(name) == len(FRAGMENT_PREFIX) + NAME_HEX + len(FRAGMENT_SUFFIX)


# ---------------------------------------------------------------------------- row checksums


def row_checksum(values: tuple) -> bytes:
    """xxh3-128 of a row's values in `CHECKED` order, each unambiguously: a tag, then a fixed-width int or a
    length-prefixed byte string (the codes, last, may be any bytes-like object)."""
    *head, codes = values
    parts = []
    for value in head:
        if value is None:
            parts.append(b"\0")
        elif isinstance(value, int):
            parts.append(b"i" + INT64.pack(value))
        else:
            data = value.encode("utf-8")
            parts += (b"s", INT64.pack(len(data)), data)
    parts += (b"\0",) if codes is None else (b"s", INT64.pack(len(codes)))
    h = xxhash.xxh3_128(b"".join(parts))
    if codes is not None:
        h.update(codes)
    return h.digest()


def _binary_values(column: pa.ChunkedArray) -> Iterator[memoryview | None]:
    """The values of a binary column as zero-copy memoryviews (None for nulls)."""
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = memoryview(chunk.buffers()[2]) if chunk.buffers()[2] is not None else memoryview(b"")
        valid = chunk.is_valid().to_numpy(zero_copy_only=False) if chunk.null_count else None
        for i in range(len(chunk)):
            yield data[offsets[i]: offsets[i + 1]] if valid is None or valid[i] else None


def checksums(table: pa.Table) -> list[bytes]:
    """Each row's checksum, computed from the table's `CHECKED` columns."""
    columns = [table.column(name).to_pylist() for name in CHECKED[:-1]]
    return [row_checksum((*values, codes)) for *values, codes in zip(*columns, _binary_values(table.column("codes")))]


def with_checksums(table: pa.Table) -> pa.Table:
    """The table (columns `CHECKED`) with its `checksum` column computed and the store's schema."""
    table = table.select(list(CHECKED)).cast(pa.schema(COLUMNS[:-1]))
    return table.append_column("checksum", pa.array(checksums(table), pa.binary()))


# ---------------------------------------------------------------------------- what a fragment records


@dataclass(frozen=True)
class FragmentIdentity:
    """What every fragment of a store records, and indexing checks: the store, its codec and encoder.

    Small and picklable: a write task carries it instead of the store."""

    store_id: str
    codec: str  # e.g. "bottleneck-pq"
    bits_per_dim: float | None
    dim: int
    bytes_per_vector: int
    cont_stored: bool  # whether rows keep the <Cont> vector (decoder space) or reading appends it
    encoder_fingerprint: str
    codec_sha256: str | None  # the codec file: head weights, pq codebook

    def metadata(self) -> bytes:
        return json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True).encode()

    def check(self, metadata: dict[bytes, bytes] | None, file: Path) -> None:
        """StoreError naming `file` unless its key-value metadata records this identity."""
        try:
            found = json.loads((metadata or {})[METADATA_KEY])
        except (KeyError, ValueError) as e:
            raise StoreError(f"{file}: no readable arccompress metadata ({e!r}): not a fragment of this "
                             "store") from None
        if not isinstance(found, dict) or found.get("store_id") != self.store_id:
            got = found.get("store_id") if isinstance(found, dict) else None
            raise StoreError(f"{file}: fragment of another store (store_id {got!r}, this store is {self.store_id!r})")
        for key, value in {"version": VERSION, **asdict(self)}.items():
            if found.get(key) != value:
                raise StoreError(f"{file}: written with {key} {found.get(key)!r}, but the manifest says {value!r} "
                                 "(the manifest or the fragment was changed)")


def write_fragment(table: pa.Table, path: Path, identity: FragmentIdentity) -> None:
    """Write rows as one Parquet file, flushed to disk: plain values, uncompressed but for the text hashes (the
    ids are read at every open: their 32-row pages decode fastest as they are), the identity in the footer's
    key-value metadata (once: no serialized Arrow schema beside it)."""
    with pq.ParquetWriter(path, row_schema(), compression={name: "zstd" if name == "text_sha256" else "none"
                                                          for name in FIELDS},
                          use_dictionary=False, write_statistics=["id"], store_schema=False) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        writer.add_key_value_metadata({METADATA_KEY: identity.metadata()})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
