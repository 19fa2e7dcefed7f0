"""The store's Lance dataset at one version, and the rule that gives each id one row: the first in the dataset's order.

The order is the manifest's list of fragments, row by row: a commit appends its fragments at the end, and
compaction rewrites runs of neighbouring fragments in place, so the order is the order of commits and never
changes. Writers never replace a row, so the first row of an id, once committed, stays first: every reader of
every later version reads the same row for it. A later row of the same id (a writer that lost a race, see
`writer`) is shadowed: never read, not counted, deleted by its writer and dropped by compaction.

Finding an id's row is a B-tree index lookup (fragments written since the index was last brought up to date are
scanned). A damaged file fails the query. If the query succeeds without the index, the index is damaged: ids are
found by scanning (a warning) until `repair` rebuilds it. Otherwise a data file is: the query is made fragment by
fragment, ids in the damaged file (read from its id column alone, or from the index) raise a StoreError naming
it, and every other id reads. When neither can say which ids a damaged file held, it is taken to hold none of
those found elsewhere and an id found nowhere is absent (a warning names the file): readers are not blocked,
writers may store such an id again (first in every readable version), and a resumed corpus job computes the
ids it held again after `repair` drops it. (Restoring such a file after that would bring its rows back first.)
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import StoreError
from .format import COLUMNS, ID_INDEX
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
        if version is not None:
            raise location.error(f"open the store at version {version}", e) from None
        raise open_failure(location, e) from None


def open_failure(location: Location, error: BaseException) -> StoreError:
    """The latest version does not open: why, in the user's terms (a damaged newest manifest named)."""
    return location.error("open the store", error,
                          "" if explain(error)[0] is not None else newest_manifest_damage(location))


MAX_U64 = (1 << 64) - 1


def manifest_versions(location: Location) -> dict[int, str]:
    """Version -> its manifest file (`_versions/`), from the file names: Lance names them `<version>.manifest`, or
    (its newer naming, listing newest first) `<2^64 - 1 - version>.manifest`."""
    try:
        names = location.files().list("_versions")
    except LANCE_ERRORS:
        return {}
    out = {}
    for name in names:
        stem = name.rsplit("/", 1)[-1].removesuffix(".manifest")
        if stem.isdigit():
            number = int(stem)
            out[MAX_U64 - number if number > 1 << 63 else number] = name
    return out


def newest_manifest_damage(location: Location) -> str:
    """Why the latest version does not open, if its manifest is damaged (cut short, changed) and the previous one
    opens: what to say, naming both; "" otherwise."""
    versions = manifest_versions(location)
    if len(versions) < 2:
        return ""
    newest, previous = sorted(versions)[-2:][::-1]
    try:
        lance.dataset(location.lance(), version=previous, storage_options=location.storage_options)
    except LANCE_ERRORS:
        return ""
    return (f"; the newest manifest, {versions[newest]} (version {newest}), is damaged: version {previous} opens "
            f"(ContextStore(..., version={previous}), read-only); restore that file from a copy, or move it aside "
            f"to make version {previous} the latest (the commit of version {newest} is then lost)")


def lost_versions(location: Location, latest: int) -> str | None:
    """What is wrong if versions newer than `latest` were committed and their manifests are gone (deleted: the store
    rolled back without a word), from Lance's hint file, which names the newest version committed; None if not."""
    hint = location.read_whole("_versions/latest_version_hint.json")
    try:
        hinted = int(json.loads(hint)["version"]) if hint else 0
    except (ValueError, KeyError, TypeError):
        return None
    if hinted <= latest or max(manifest_versions(location), default=0) >= hinted:  # a commit landed meanwhile
        return None
    gone = f"the manifest of version {hinted} is" if hinted == latest + 1 else \
        f"the manifests of versions {latest + 1} to {hinted} are"
    return (f"version {hinted} was committed (_versions/latest_version_hint.json) but the newest manifest is "
            f"version {latest}: {gone} gone, and with them what those commits stored (restore the files from a copy "
            "before anyone commits; else a resumed corpus job computes their ids again)")


class StoreDamageWarning(UserWarning):
    """Damage a store's reads go around (the id index, a data file whose ids are unknown), or that opening it found
    (newer versions whose manifests are gone, a conversion that stopped part-way): `verify` lists it."""


@dataclass(frozen=True)
class Damaged:
    """A data file a query could not read: its fragment, file and what failed; `located` the asked ids it holds (None
    when neither its id column nor the id index can say)."""

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
        self.notes: set[str] = set()  # damage reads went around (see `damage`)

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
        latest = self.latest_version()
        if latest == self.version:
            return self
        try:
            table = StoreTable(self.location, self.ds.checkout_version(latest))
        except LANCE_ERRORS as e:
            raise self.location.error("look for new versions", e) from None
        table._census = self._census  # counted incrementally from here
        return table

    def latest_version(self) -> int:
        try:
            return self.ds.latest_version
        except LANCE_ERRORS as e:
            raise self.location.error("look for new versions", e) from None

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
        with no row are left out. StoreError naming the file if a key's row is in a damaged data file."""
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
                table = self._scan_around_damage(chunk, columns)  # a damaged file: the index, or a data file
            out |= self._first(table)
        return out

    def _scan(self, keys: list[str], columns: Sequence[str], fragments: list[Any] | None = None,
              indexed: bool = True) -> pa.Table:
        """The rows of `keys` (`columns` and row addresses). Their addresses first (the id index, and the id column
        of fragments it does not cover yet), then only those rows: one filtered scan of every column would read
        each uncovered fragment whole (35 MB per 8,192 pq contexts at the released sizes)."""
        found = self.ds.scanner(columns=["id"], filter=in_filter("id", keys), with_row_address=True,
                                fragments=fragments, use_scalar_index=indexed).to_table()
        if list(columns) == ["id"]:
            return found
        if not found.num_rows:
            return empty_table([*columns, ADDRESS])
        addresses = ", ".join(map(str, found.column(ADDRESS).to_pylist()))  # integers: nothing to quote
        return self.ds.scanner(columns=list(columns), filter=f"{ADDRESS} IN ({addresses})", with_row_address=True,
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
        """The query without the id index, then fragment by fragment: the rows of readable data files; StoreError
        naming the damaged files and the ids that are in them, before any healthier row of theirs.

        A damaged index (every data file reads without it) is a warning: ids are found by scanning until `repair`
        rebuilds it. A damaged data file whose ids cannot be read (neither its id column nor the index says) is
        taken to hold none of the ids found in readable files, and an id found nowhere is absent: a warning names
        the file (`verify`, then `repair`; a resumed corpus job computes the ids it held again)."""
        try:
            table = self._scan(keys, columns, indexed=False)
        except LANCE_ERRORS:
            table = None
        if table is not None:
            self.damage(f"the id index cannot be read (`arccompress store verify {self.location}` lists it; "
                        "`repair` rebuilds it): ids are found by scanning every data file meanwhile")
            return table
        found, damaged = [], []
        for fragment in self.fragments():
            try:
                found.append(self._scan_fragment(keys, columns, fragment))
            except LANCE_ERRORS as e:
                damaged.append(Damaged(fragment.fragment_id, data_file(fragment), cause(e),
                                       self._located(keys, fragment)))
        if damaged and self.latest_version() != self.version:
            raise StoreError(f"{self.location}: version {self.version} cannot be read: {damaged[0].file} is gone "
                             f"({damaged[0].error}; cleaned up since, if the version is old: the latest is "
                             f"{self.latest_version()}, see ContextStore.versions())")
        table = pa.concat_tables(found) if found else empty_table([*columns, ADDRESS])
        rows = self._first(table)
        places = self.positions()
        hurt: dict[str, Damaged] = {}
        for key in keys:
            here = places.get(fragment_of(rows[key][ADDRESS]), len(places)) if key in rows else len(places)
            for d in damaged:
                if d.located is not None and places.get(d.fragment, -1) < here and key in d.located:
                    hurt[key] = d
                    break
        if hurt:
            files = "; ".join(sorted({f"{d.file} ({d.error})" for d in hurt.values()}))
            named = ", ".join(map(repr, list(hurt)[:5])) + (f" and {len(hurt) - 5} more" if len(hurt) > 5 else "")
            raise StoreError(f"{self.location}: ids {named} are in damaged data files: {files}; run "
                             f"`arccompress store verify {self.location}`, then `repair`")
        for d in damaged:
            if d.located is None:
                self.damage(f"{d.file} cannot be read ({d.error}) and its ids are unknown: ids not found may have "
                            f"been there; run `arccompress store verify {self.location}`, then `repair` (a resumed "
                            "corpus job computes them again)")
        return table

    def _scan_fragment(self, keys: list[str], columns: Sequence[str], fragment: Any) -> pa.Table:
        """The query in one fragment: through the id index, else (the index damaged) by scanning it."""
        try:
            return self._scan(keys, columns, [fragment])
        except LANCE_ERRORS:
            return self._scan(keys, columns, [fragment], indexed=False)

    def damage(self, note: str) -> None:
        """Warn, once per version and note, of damage reads go around."""
        if note not in self.notes:
            self.notes.add(note)
            warnings.warn(f"{self.location}: {note}", StoreDamageWarning, stacklevel=2)

    def _located(self, keys: list[str], fragment: Any) -> frozenset[str] | None:
        """Which of `keys` a damaged fragment holds: from its id column alone (which may survive), else from the id
        index (without reading the data file); None when neither can say."""
        try:
            return frozenset(self._scan(keys, ["id"], [fragment], indexed=False).column("id").to_pylist())
        except LANCE_ERRORS:
            pass
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
            table = pa.concat_tables(parts) if parts else empty_table([*columns, ADDRESS])
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


def empty_table(columns: Sequence[str]) -> pa.Table:
    """No rows, with the store's column types (and row addresses')."""
    types = dict(COLUMNS) | {ADDRESS: pa.uint64()}
    return pa.schema([(c, types[c]) for c in columns]).empty_table()


def index_segments(dataset: lance.LanceDataset) -> dict[str, list[tuple[str, set[int]]]]:
    """Each index's segments: (uuid, the fragments it covers)."""
    return {d.name: [(str(s.uuid), set(s.fragment_ids)) for s in d.segments] for d in dataset.describe_indices()}


def data_file(fragment: Any) -> str:
    """A fragment's data file, as a path under the store (`data/<name>.lance`)."""
    files = fragment.metadata.files
    return f"data/{files[0].path}" if files else f"fragment {fragment.fragment_id}"
