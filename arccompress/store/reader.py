"""Reading a store: the rows of requested ids, every row's checksum verified, codes decoded to vectors.

A row whose values do not hash to its `checksum` (a flipped bit in its codes, its id or its counts), or that is
not the row asked for, is a StoreError naming the data file and the id. Decoding turns the codes back into
vectors; the space's head math, on the caller's device, makes them decoder rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .codec import Codec
from ..errors import StoreError
from .format import CHECKED, FIELDS, cont_added, row_checksum
from .table import ADDRESS, StoreTable, data_file, fragment_of


class Reader:
    def __init__(self, codec: Codec, cont_stored: bool):
        self.codec = codec
        self.cont_stored = cont_stored

    def rows(self, table: StoreTable, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The rows these ids read, verified (ids the store does not hold are left out)."""
        found = table.rows(keys, FIELDS)
        for key, row in found.items():
            if row["id"] != key or row_checksum(tuple(row[name] for name in CHECKED)) != row["checksum"]:
                raise StoreError(f"{table.location}/{self.file_of(table, row)}: context {key!r} does not match its "
                                 "checksum (the file is damaged)")
        return found

    @staticmethod
    def file_of(table: StoreTable, row: dict[str, Any]) -> str:
        fragment = next((f for f in table.fragments() if f.fragment_id == fragment_of(row[ADDRESS])), None)
        return data_file(fragment) if fragment is not None else f"fragment {fragment_of(row[ADDRESS])}"

    def read(self, table: StoreTable, keys: list[str]) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        """id -> (its row, its stored vectors decoded: float32, CPU) for the ids the store holds."""
        rows = self.rows(table, keys)
        return self.with_vectors(rows, lambda row: f"{table.location}/{self.file_of(table, row)}")

    def decode(self, rows: pa.Table, where: str) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        """id -> (its row, its stored vectors) for rows read by another tool, each checked against its checksum."""
        found = {}
        for row in rows.to_pylist():
            if row_checksum(tuple(row[name] for name in CHECKED)) != row["checksum"]:
                raise StoreError(f"{where}: the row of {row['id']!r} does not match its checksum (changed or damaged)")
            found[row["id"]] = row
        return self.with_vectors(found, lambda row: where)

    def with_vectors(self, rows: dict[str, dict[str, Any]], where: Callable[[dict[str, Any]], str]
                     ) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        """The rows with their stored vectors decoded (float32, CPU); `where(row)` names a row's file in errors."""
        if not rows:
            return {}
        bpv = self.codec.bytes_per_vector
        lengths, blobs = [], []
        for row in rows.values():
            n = row["num_embeddings"] - cont_added(self.cont_stored)
            codes = row["codes"]
            if not isinstance(codes, bytes) or n < 1 or len(codes) != n * bpv or row["num_tokens"] < 1:
                raise StoreError(f"{where(row)}: context {row['id']!r} has {len(codes or b'')} bytes of codes for "
                                 f"{row['num_embeddings']} embeddings; {self.codec.name} needs {bpv} per vector")
            lengths.append(n)
            blobs.append(codes)
        vectors = self.codec.decode(np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, bpv))
        # pq codes index a checked codebook; the other codecs store raw numbers
        if self.codec.quantizer != "pq" and not bool(torch.isfinite(vectors).all()):
            raise StoreError(f"{where(next(iter(rows.values())))}: stored vectors of {next(iter(rows))!r}... hold NaN "
                             "or infinity")
        return {key: (row, v) for (key, row), v in zip(rows.items(), vectors.split(lengths))}
