"""The store's format (4): a Lance dataset of rows, one per context, each row checksummed.

    id              string   the caller's id (any Unicode text)
    num_tokens      int32    encoder tokens of the text
    num_embeddings  int32    decoder positions of the context, <Cont> included
    chunk_size      int32    the chunk size it was compressed with (null: whole text)
    text_sha256     string   SHA-256 of the text's UTF-8 bytes (null when unknown): lookup by text reads it
    text_bytes      int64    the text's UTF-8 size (null when unknown)
    codes           binary   the codec's bytes, one fixed-size code per stored vector
    checksum        binary   xxh3-128 of every value above, id included: verified on every read

A store is one Lance dataset: data files (`data/*.lance`) listed by one versioned manifest (`_versions/`), B-tree
indices on `id` and `text_sha256` (`_indices/`), the store's description (identity, codec) in the schema's
metadata under `arccompress`, and beside them the codec file (`_arccompress/codec-<sha256>.safetensors`: head
weights, pq codebook). The rows are format 3's, byte for byte: `convert` copies codes and checksums as they are.
Columns a user adds (a retrieval vector) are kept; the store reads and writes its own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import xxhash

FORMAT = "arccompress-store"
VERSION = 4
METADATA_KEY = b"arccompress"  # the schema metadata holding the store's description
CODEC_FOLDER = "_arccompress"  # the codec file's folder inside the dataset (Lance leaves it alone)
# Lance file format of the data files. 2.1, not 2.2: 2.2 run-length-encodes runs of equal integers, and a random
# read decodes the run (a constant column cost 4.5 ms per 5 random rows of 1,000,000, measured; 2.1: 0.3 ms).
LANCE_FILE_VERSION = "2.1"
ID_INDEX, TEXT_INDEX = "id_idx", "text_sha256_idx"  # B-tree indices, Lance's default names
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
    """The store's columns, in order."""
    return pa.schema(COLUMNS)


def schema_problem(schema: pa.Schema) -> str | None:
    """What keeps a dataset's columns from being a store's (a column missing, or of another type: large_string
    where a store has string, as many Arrow writers make), None if nothing does. Other columns are the user's."""
    for name, kind in COLUMNS:
        if name not in schema.names:
            return f"it has no {name!r} column (a store's columns: {', '.join(FIELDS)})"
        found = schema.field(name).type
        if found != kind:
            return f"its column {name!r} is {found}, a store's is {kind}"
    return None


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


def binary_values(column: pa.ChunkedArray | pa.Array) -> Iterator[memoryview | None]:
    """The values of a binary column as zero-copy memoryviews (None for nulls)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = memoryview(chunk.buffers()[2]) if chunk.buffers()[2] is not None else memoryview(b"")
        valid = chunk.is_valid().to_numpy(zero_copy_only=False) if chunk.null_count else None
        for i in range(len(chunk)):
            yield data[offsets[i]: offsets[i + 1]] if valid is None or valid[i] else None


def checksums(table: pa.Table) -> list[bytes]:
    """Each row's checksum, computed from the table's `CHECKED` columns."""
    columns = [table.column(name).to_pylist() for name in CHECKED[:-1]]
    return [row_checksum((*values, codes)) for *values, codes in zip(*columns, binary_values(table.column("codes")))]


def with_checksums(table: pa.Table) -> pa.Table:
    """The table (columns `CHECKED`) with its `checksum` column computed and the store's schema."""
    table = table.select(list(CHECKED)).cast(pa.schema(COLUMNS[:-1]))
    return table.append_column("checksum", pa.array(checksums(table), pa.binary()))
