"""The id index: which fragment holds each id, built from the fragments' `id` columns.

Indexing a fragment reads its footer and its `id` column only (never codes) and checks three things, naming the
file when one fails: its metadata records this store's identity (store, codec, sizes, encoder, codec file),
its columns are a fragment's, and its ids hash to its name (a damaged id column is caught at open). A writer
indexes under the store's lock, so it sees every committed fragment; readers index without locking, and see
fragments committed since their last look on `refresh`.
"""

from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StoreError
from .format import FragmentIdentity, fragment_name, is_fragment_name, row_schema


@dataclass(frozen=True)
class Fragment:
    path: Path
    first: int  # the index's number of its first row
    num_rows: int


class FragmentIndex:
    """id -> (fragment, row) over the fragments of one store's `data/` folder, in the order they were indexed."""

    def __init__(self, data: Path, identity: FragmentIdentity):
        self.data = data
        self.identity = identity
        self.fragments: list[Fragment] = []
        self._firsts: list[int] = []  # fragments' first rows, for bisect
        self._rows: dict[str, int] = {}  # id -> row number across fragments
        self._names: set[str] = set()
        self._total = 0
        self.duplicates = 0  # rows whose id an earlier fragment holds (only a writer ignoring the lock makes them)

    def refresh(self) -> None:
        """Index the fragments committed since the last look, oldest first (read and checked in parallel)."""
        try:
            entries = list(os.scandir(self.data))
        except FileNotFoundError:
            return
        new = []
        for entry in entries:
            if is_fragment_name(entry.name) and entry.name not in self._names:
                try:
                    new.append((entry.stat().st_mtime_ns, entry.name))
                except FileNotFoundError:
                    continue
        paths = [self.data / name for _, name in sorted(new)]
        if len(paths) == 1:  # what a writer usually finds under the lock
            self.add(paths[0], self._read_ids(paths[0]))
        elif paths:
            with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
                for path, ids in zip(paths, pool.map(self._read_ids, paths)):  # the first failure stops here
                    self.add(path, ids)

    def _read_ids(self, path: Path) -> pa.ChunkedArray:
        """A fragment's ids, after checking its footer's identity, its columns, and that its ids hash to its name."""
        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            self.identity.check(schema.metadata, path)
            if not schema.equals(row_schema(), check_metadata=False):
                raise StoreError(f"{path}: columns {schema.names} ({', '.join(map(str, schema.types))}) are not a "
                                 "store fragment's")
            ids = pf.read(columns=["id"], use_threads=False).column(0)  # threads cost more than 32-row groups take
        except StoreError:
            raise
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
            raise StoreError(f"{path}: not a readable store fragment ({e})") from None
        if ids.null_count or fragment_name(ids) != path.name:
            raise StoreError(f"{path}: its ids do not hash to its name (the id column is damaged, or the file "
                             "was renamed)")
        return ids

    def add(self, path: Path, ids: pa.ChunkedArray | pa.Array) -> None:
        """Index a fragment whose ids are known (one this process just committed, or checked by `_read_ids`)."""
        keys = ids.to_numpy(zero_copy_only=False).tolist()
        first, before = self._total, len(self._rows)
        self._rows.update(zip(keys, range(first, first + len(keys))))
        self.fragments.append(Fragment(path, first, len(keys)))
        self._firsts.append(first)
        self._names.add(path.name)
        self._total += len(keys)
        if len(self._rows) - before == len(keys):
            return
        try:  # an id seen before: rare (a writer ignoring the lock, a file copied in), and slow
            self._first_wins()
        except StoreError:  # the new fragment holds an id twice: index without it, and say so
            self.fragments.pop()
            self._firsts.pop()
            self._names.discard(path.name)
            self._total = first
            self._first_wins()
            raise

    def _first_wins(self) -> None:
        """Index every fragment again, each id read from the first fragment holding it; StoreError naming a
        fragment that holds an id twice."""
        rows: dict[str, int] = {}
        duplicates = 0
        for fragment in self.fragments:
            try:
                keys = pq.read_table(fragment.path, columns=["id"]).column(0).to_pylist()
            except Exception as e:
                raise StoreError(f"{fragment.path}: not a readable store fragment ({e})") from None
            if len(set(keys)) != len(keys):
                raise StoreError(f"{fragment.path}: an id appears twice in the fragment")
            for row, key in enumerate(keys, fragment.first):
                duplicates += rows.setdefault(key, row) != row
        self._rows, self.duplicates = rows, duplicates

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def locate(self, key: str) -> tuple[Fragment, int]:
        """The fragment holding `key` and its row there."""
        row = self._rows[key]
        fragment = self.fragments[bisect.bisect_right(self._firsts, row) - 1]
        return fragment, row - fragment.first

    def owns(self, key: str, fragment: Fragment, row: int) -> bool:
        """Whether the index reads `key` from this row (not from an earlier fragment holding it too)."""
        return self._rows.get(key) == fragment.first + row

    def values(self, keys: list[str], columns: list[str]) -> dict[str, dict[str, Any]]:
        """Some columns' stored values for these ids (read per fragment, codes never needed)."""
        by_fragment: dict[Fragment, list[tuple[str, int]]] = {}
        for key in keys:
            fragment, row = self.locate(key)
            by_fragment.setdefault(fragment, []).append((key, row))
        out = {}
        for fragment, items in by_fragment.items():
            try:
                table = pq.read_table(fragment.path, columns=columns)
            except Exception as e:
                raise StoreError(f"{fragment.path}: not a readable store fragment ({e})") from None
            for key, row in items:
                out[key] = {name: table.column(name)[row].as_py() for name in columns}
        return out
