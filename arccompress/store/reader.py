"""Reading a store: the rows of requested ids, one Parquet read per row group, every row's checksum verified.

A row whose values do not hash to its `checksum` (a flipped bit in its codes, its id or its counts) is a
StoreError naming the file and the id; a row group that cannot be read (a damaged page or footer) one naming
the file. Decoding turns the codes back into vectors; the space's head math, on the caller's device, makes
them decoder rows.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ..codec import Codec
from ..errors import StoreError
from .format import CHECKED, FIELDS, cont_added, row_checksum
from .index import Fragment, FragmentIndex

OPEN_FILES = 256  # ParquetFiles kept open between reads


class Reader:
    def __init__(self, index: FragmentIndex, codec: Codec, cont_stored: bool):
        self.index = index
        self.codec = codec
        self.cont_stored = cont_stored
        self._files: dict[Path, tuple[Any, list[int]]] = {}  # path -> (ParquetFile, row groups' first rows)

    def rows(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The stored rows of these (indexed) ids, verified."""
        wanted: dict[tuple[Fragment, int], list[tuple[str, int]]] = {}
        for key in dict.fromkeys(keys):
            fragment, row = self.index.locate(key)
            starts = self._file(fragment)[1]
            g = bisect.bisect_right(starts, row) - 1
            wanted.setdefault((fragment, g), []).append((key, row - starts[g]))
        out = {}
        for (fragment, g), items in wanted.items():
            try:
                table = self._file(fragment)[0].read_row_group(g)
            except Exception as e:  # pyarrow's errors for damaged pages
                raise StoreError(f"{fragment.path}: cannot read row group {g} ({e})") from None
            columns = [table.column(name) for name in FIELDS]
            for key, r in items:
                row = dict(zip(FIELDS, (c[r].as_py() for c in columns)))
                if row["id"] != key:
                    raise StoreError(f"{fragment.path}: row {r} of row group {g} is {row['id']!r}, expected {key!r} "
                                     "(the file changed after it was indexed)")
                if row_checksum(tuple(row[name] for name in CHECKED)) != row["checksum"]:
                    raise StoreError(f"{fragment.path}: context {key!r} does not match its checksum (the file is "
                                     "damaged)")
                out[key] = row
        return out

    def _file(self, fragment: Fragment) -> tuple[Any, list[int]]:
        entry = self._files.get(fragment.path)
        if entry is None:
            try:
                pf = pq.ParquetFile(fragment.path)
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            except Exception as e:
                raise StoreError(f"{fragment.path}: not a readable store fragment ({e})") from None
            if sum(sizes) != fragment.num_rows:
                raise StoreError(f"{fragment.path}: {sum(sizes)} rows, {fragment.num_rows} when it was indexed")
            if len(self._files) >= OPEN_FILES:
                self._files.clear()
            entry = self._files[fragment.path] = (pf, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist())
        return entry

    def read(self, keys: list[str]) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        """id -> (its row, its stored vectors decoded: float32, CPU) for these indexed ids."""
        rows = self.rows(keys)
        if not rows:
            return {}
        vectors, lengths = self.vectors(list(rows.values()))
        return {key: (row, v) for (key, row), v in zip(rows.items(), vectors.split(lengths))}

    def vectors(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, list[int]]:
        """The stored vectors of these rows, stacked (float32, CPU), and how many each row has."""
        bpv = self.codec.bytes_per_vector
        lengths, blobs = [], []
        for row in rows:
            n = row["num_embeddings"] - cont_added(self.cont_stored)
            codes = row["codes"]
            if not isinstance(codes, bytes) or n < 1 or len(codes) != n * bpv or row["num_tokens"] < 1:
                raise StoreError(f"context {row['id']!r} has {len(codes or b'')} bytes of codes for "
                                 f"{row['num_embeddings']} embeddings; {self.codec.name} needs {bpv} per vector")
            lengths.append(n)
            blobs.append(codes)
        vectors = self.codec.decode(np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, bpv))
        # pq codes index a checked codebook; the other codecs store raw numbers
        if self.codec.quantizer != "pq" and not bool(torch.isfinite(vectors).all()):
            raise StoreError(f"stored vectors of {rows[0]['id']!r}... hold NaN or infinity")
        return vectors, lengths
