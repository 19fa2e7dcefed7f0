"""The store's Lance dataset at one version, and the rule that gives each id one row: the first in the dataset's order.

The order is the manifest's list of fragments, row by row: a commit appends its fragments at the end, and
compaction rewrites runs of neighbouring fragments in place, so the order is the order of commits and never
changes. Writers never replace a row, so the first row of an id, once committed, stays first: every reader of
every later version reads the same row for it. A later row of the same id (a writer that lost a race, see
`writer`) is shadowed: never read, not counted, deleted by its writer and dropped by compaction.

Finding an id's row is a B-tree index lookup (fragments written since the index was last brought up to date are
scanned). A data file that is missing or damaged fails the query; the query is then made fragment by fragment,
so that only the ids that may be in that file raise a StoreError naming it, and every other id reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import StoreError
from .format import ID_INDEX
from .location import LANCE_ERRORS, Location, cause, explain

QUERY_KEYS = 4096  # ids per index query
ADDRESS = "_rowaddr"  # Lance's row address: fragment id << 32 | row offset in the fragment
DAMAGE_HINT = "; a data file may be damaged: run `arccompress store verify {store}`"


def fragment_of(address: int) -> int:
    return address >> 32


def in_filter(column: str, values: Sequence[Any]) -> pc.Expression:
    """`column IN values` as an Arrow expression: any value, any size, nothing quoted into SQL."""
    return pc.field(column).isin(pa.array(values, pa.string()))


def open_dataset(location: Location, version: int | None = None) -> lance.LanceDataset:
    """The store's Lance dataset (at `version`, else the latest), or a StoreError in the user's terms."""
    try:
        return lance.dataset(location.lance(), version=version, storage_options=location.storage_options)
    except LANCE_ERRORS as e:
        if version is not None and "not found" in str(e).lower() and "version" in str(e).lower():
            raise StoreError(f"{location}: no version {version} (cleaned up, or never written; see "
                             "ContextStore.versions())") from None
        raise location.error(f"open the store{'' if version is None else f' at version {version}'}", e) from None


@dataclass(frozen=True)
class Damaged:
    """A data file a query could not read: its fragment, file and what failed; `located` the ids the id index
    places in it (None when the index does not cover it: any id may be there)."""

    fragment: int
    file: str
    error: str
    located: frozenset[str] | None


class StoreTable:
    """The store's Lance dataset at one version: each id's row, the ids, how many, and the shadowed rows."""

    def __init__(self, location: Location, dataset: lance.LanceDataset):
        self.location = location
        self.dataset: lance.LanceDataset | None = dataset
        self.version: int = dataset.version
        self._pid = os.getpid()
        self._positions: dict[int, int] | None = None
        self._census: Census | None = None

    @classmethod
    def open(cls, location: Location, version: int | None = None) -> StoreTable:
        return cls(location, open_dataset(location, version))

    @property
    def ds(self) -> lance.LanceDataset:
        """The Lance dataset, opened again in a process forked from the one that opened it (Lance's own handles
        belong to the process that made them)."""
        if self.dataset is None or self._pid != os.getpid():
            self.dataset = open_dataset(self.location, self.version)
            self._pid = os.getpid()
        return self.dataset

    def release(self) -> None:
        """Let go of Lance's handles (files, caches); the next use opens the dataset again."""
        self.dataset = None

    def latest(self) -> StoreTable:
        """The table at the latest version: this one if it is, else a new one (sharing Lance's caches)."""
        try:
            latest = self.ds.latest_version
            if latest == self.version:
                return self
            table = StoreTable(self.location, self.ds.checkout_version(latest))
        except LANCE_ERRORS as e:
            raise self.location.error("look for new versions", e) from None
        table._census = self._census  # counted incrementally from here
        return table

    def at(self, dataset: lance.LanceDataset) -> StoreTable:
        """The table at the version of `dataset` (one this process just committed)."""
        table = StoreTable(self.location, dataset)
        table._census = self._census
        return table

    # ------------------------------------------------------------------ the dataset's order

    def fragments(self) -> list[Any]:
        try:
            return self.ds.get_fragments()
        except LANCE_ERRORS as e:
            raise self.location.error("list the store's data files", e) from None

    def positions(self) -> dict[int, int]:
        """Fragment id -> its place in the manifest's list (the dataset's order)."""
        if self._positions is None:
            self._positions = {f.fragment_id: i for i, f in enumerate(self.fragments())}
        return self._positions

    def order(self, addresses: np.ndarray) -> np.ndarray:
        """Sort keys of row addresses in the dataset's order: (fragment's place, row offset)."""
        places = self.positions()
        ids = np.fromiter(sorted(places), np.int64, len(places))
        place = np.fromiter((places[i] for i in ids.tolist()), np.int64, len(places))
        addresses = addresses.astype(np.int64)
        return (place[np.searchsorted(ids, addresses >> 32)] << 32) | (addresses & 0xFFFFFFFF)

    def in_order(self, table: pa.Table) -> pa.Table:
        """Rows (with their addresses) sorted in the dataset's order."""
        order = self.order(table.column(ADDRESS).to_numpy())
        if len(order) > 1 and not bool(np.all(order[1:] > order[:-1])):
            table = table.take(pa.array(np.argsort(order, kind="stable")))
        return table

    def indexed_fragments(self) -> set[int]:
        """Fragments the id index covers (rows in others are found by scanning them)."""
        return {f for _, fragments in index_segments(self.ds).get(ID_INDEX, []) for f in fragments}

    # ------------------------------------------------------------------ rows of ids

    def rows(self, keys: Sequence[str], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The row each key reads (its first in the dataset's order) as {column: value, "_rowaddr": address}; keys
        with no row are left out. StoreError naming the file if a key's row may be in a damaged data file."""
        out: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(keys))
        columns = list(dict.fromkeys(["id", *columns]))
        for first in range(0, len(unique), QUERY_KEYS):
            chunk = unique[first: first + QUERY_KEYS]
            try:
                table = self._scan(chunk, columns)
            except LANCE_ERRORS as e:
                if explain(e)[0] is not None:  # the environment's failure (descriptors, access), not the files'
                    raise self.location.error("read the store", e) from None
                table = self._scan_around_damage(chunk, columns)  # a damaged data file: which, and whom it concerns
            out |= self._first(table)
        return out

    def _scan(self, keys: list[str], columns: Sequence[str], fragments: list[Any] | None = None) -> pa.Table:
        return self.ds.scanner(columns=list(columns), filter=in_filter("id", keys), with_row_address=True,
                               fragments=fragments).to_table()

    def _first(self, table: pa.Table) -> dict[str, dict[str, Any]]:
        if not table.num_rows:
            return {}
        keys = table.column("id").to_pylist()
        if len(set(keys)) < len(keys):  # a shadowed row came along: keep each id's first in the dataset's order
            table = self.in_order(table)
        out: dict[str, dict[str, Any]] = {}
        for row in table.to_pylist():
            out.setdefault(row["id"], row)
        return out

    def _scan_around_damage(self, keys: list[str], columns: Sequence[str]) -> pa.Table:
        """The query fragment by fragment: the rows of readable ones; StoreError naming the damaged files and the
        ids that are (or, where the index cannot say, may be) in them, before any healthier row of theirs."""
        found, damaged = [], []
        for fragment in self.fragments():
            try:
                found.append(self._scan(keys, columns, [fragment]))
            except LANCE_ERRORS as e:
                damaged.append(Damaged(fragment.fragment_id, data_file(fragment), cause(e),
                                       self._located(keys, fragment)))
        table = pa.concat_tables(found) if found else pa.table({c: [] for c in [*columns, ADDRESS]})
        rows = self._first(table)
        places = self.positions()
        hurt: dict[str, Damaged] = {}
        for key in keys:
            here = places.get(fragment_of(rows[key][ADDRESS]), len(places)) if key in rows else len(places)
            for d in damaged:
                if places.get(d.fragment, -1) < here and (d.located is None or key in d.located):
                    hurt[key] = d
                    break
        if hurt:
            how = "are in" if all(d.located is not None for d in hurt.values()) else "may be in"
            files = "; ".join(sorted({f"{d.file} ({d.error})" for d in hurt.values()}))
            named = ", ".join(map(repr, list(hurt)[:5])) + (f" and {len(hurt) - 5} more" if len(hurt) > 5 else "")
            raise StoreError(f"{self.location}: ids {named} {how} damaged data files: {files}; run "
                             f"`arccompress store verify {self.location}`, then `repair`")
        return table

    def _located(self, keys: list[str], fragment: Any) -> frozenset[str] | None:
        """Which of `keys` the id index places in `fragment`, asked without reading its data file; None when the
        index does not cover the fragment (any of them may be there)."""
        if fragment.fragment_id not in self.indexed_fragments():
            return None

        def there(some: list[str]) -> bool:
            return bool(self.ds.scanner(columns=[], filter=in_filter("id", some), with_row_address=True,
                                        fragments=[fragment]).to_table().num_rows)

        try:
            return frozenset(k for k in keys if there([k])) if there(keys) else frozenset()
        except LANCE_ERRORS:
            return None

    # ------------------------------------------------------------------ every id

    def scan(self, columns: Sequence[str], readable_only: bool = False) -> pa.Table:
        """`columns` (and row addresses) of every row, in the dataset's order, shadowed rows included;
        `readable_only`: of the data files that can be read (damaged ones are `verify`'s business)."""
        try:
            table = self.ds.scanner(columns=list(columns), with_row_address=True, scan_in_order=True).to_table()
        except LANCE_ERRORS as e:
            if not readable_only or explain(e)[0] is not None:
                raise self.location.error("read the store's rows", e, DAMAGE_HINT.format(store=self.location)) \
                    from None
            parts = []
            for fragment in self.fragments():
                try:
                    parts.append(self.ds.scanner(columns=list(columns), with_row_address=True,
                                                 fragments=[fragment]).to_table())
                except LANCE_ERRORS:
                    continue
            table = pa.concat_tables(parts) if parts else pa.table({c: [] for c in [*columns, ADDRESS]})
        return self.in_order(table)

    def visible(self, columns: Sequence[str]) -> pa.Table:
        """`columns` of the rows ids read (each id's first), in the dataset's order."""
        table = self.scan(sorted({"id", *columns}))
        keep = first_of_each(table.column("id"))
        if keep is not None:
            table = table.filter(keep)
        return table.select(list(columns))

    def ids(self) -> Iterator[str]:
        return iter(self.visible(["id"]).column("id").to_pylist())

    def shadowed(self, readable_only: bool = False) -> pa.Table:
        """Ids and addresses of the rows that are shadowed (an earlier row holds their id)."""
        table = self.scan(["id"], readable_only)
        keep = first_of_each(table.column("id"))
        if keep is None:
            return table.slice(0, 0)
        return table.filter(pc.invert(keep))

    def count(self) -> int:
        """How many ids the store holds (rows less shadowed ones); incremental over appended fragments."""
        fragments = [(f.fragment_id, f.metadata.physical_rows, f.metadata.num_deletions) for f in self.fragments()]
        census = self._census
        if census is None or fragments[: len(census.fragments)] != census.fragments:
            census = Census(fragments, len(self.shadowed(readable_only=True)))
        elif len(fragments) > len(census.fragments):  # fragments appended since: are any of their rows shadowed?
            new = [f for f in self.fragments() if f.fragment_id in {i for i, _, _ in fragments[len(census.fragments):]}]
            try:
                added = self.ds.scanner(columns=["id"], with_row_address=True, fragments=new).to_table()
            except LANCE_ERRORS as e:
                raise self.location.error("read the ids of new data files", e) from None
            winners = self.rows(added.column("id").to_pylist(), ["id"])
            lost = sum(1 for key, address in zip(added.column("id").to_pylist(), added.column(ADDRESS).to_pylist())
                       if winners[key][ADDRESS] != address)
            census = Census(fragments, census.shadowed + lost)
        self._census = census
        try:
            rows = self.ds.count_rows()
        except LANCE_ERRORS as e:
            raise self.location.error("count the store's rows", e) from None
        return rows - census.shadowed


@dataclass(frozen=True)
class Census:
    """The shadowed rows of a version, counted, and the fragments they were counted over."""

    fragments: list[tuple[int, int, int]]  # id, rows, deleted rows
    shadowed: int


def first_of_each(ids: pa.ChunkedArray) -> pa.Array | None:
    """A mask keeping the first occurrence of each id (None when every id occurs once)."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    _, first = np.unique(ids.to_numpy(zero_copy_only=False), return_index=True)
    mask = np.zeros(len(ids), dtype=bool)
    mask[first] = True
    return pa.array(mask)


def index_segments(dataset: lance.LanceDataset) -> dict[str, list[tuple[str, set[int]]]]:
    """Each index's segments: (uuid, the fragments it covers)."""
    return {d.name: [(str(s.uuid), set(s.fragment_ids)) for s in d.segments] for d in dataset.describe_indices()}


def data_file(fragment: Any) -> str:
    """A fragment's data file, as a path under the store (`data/<name>.lance`)."""
    files = fragment.metadata.files
    return f"data/{files[0].path}" if files else f"fragment {fragment.fragment_id}"
