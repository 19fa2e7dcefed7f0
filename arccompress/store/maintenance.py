"""Keeping a store in shape: compaction, the id indices, old versions; and finding (verify) and removing (repair)
damaged data files.

After every commit the writer looks at the version it made (`after_commit`), so that a commit's cost stays flat
however many came before: once `AUTO_COMPACT_FRAGMENTS` small data files (fewer than `SMALL_ROWS` rows: one-context
commits, a service adding documents as they come) are not yet indexed, it merges them (Lance's compaction keeps
the dataset's order); once `AUTO_INDEX_FRAGMENTS` other data files, or `AUTO_INDEX_ROWS` rows, are not in the
indices, it indexes them as a new segment of each index (its cost: the new rows), and once an index has
`MAX_INDEX_SEGMENTS` segments it merges them (its cost: the store, that often). Lance removes versions beyond the
last `KEEP_VERSIONS` every `CLEANUP_INTERVAL` commits (the dataset's `lance.auto_cleanup.*` settings); `cleanup`
removes older ones on demand. `compact` merges everything, drops shadowed rows and makes the indices anew.
`verify` reads every row and checks every index against them; `repair` drops damaged data files and rebuilds a
damaged index. Two writers doing the same
upkeep at once conflict harmlessly: one of them gives way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import lance
import numpy as np
import pyarrow as pa
from lance.commit import CommitConflictError
from lance.fragment import LanceFragment

from ..errors import StoreError
from .format import (
    CHECKED,
    FIELDS,
    ID_INDEX,
    TEXT_INDEX,
    cont_added,
    row_checksum,
)
from .location import LANCE_ERRORS, Location, cause, explain
from .manifest import description, unfinished, unfinished_advice
from .table import (
    ADDRESS,
    StoreTable,
    data_file,
    in_filter,
    index_segments,
    lost_versions,
)

SMALL_ROWS = 256  # fragments with fewer rows are merged automatically (a writer's usual commit is 256 rows)
AUTO_COMPACT_FRAGMENTS = 8
AUTO_INDEX_FRAGMENTS = 8
AUTO_INDEX_ROWS = 65536
MAX_INDEX_SEGMENTS = 8
COMPACT_ROWS = 1 << 20  # rows per fragment after `compact`
KEEP_VERSIONS, CLEANUP_INTERVAL = 256, 64  # each open lists the versions kept: ~1 µs each
AUTO_CLEANUP = {"lance.auto_cleanup.interval": str(CLEANUP_INTERVAL),
                "lance.auto_cleanup.retain_versions": str(KEEP_VERSIONS)}
INDICES = {ID_INDEX: "id", TEXT_INDEX: "text_sha256"}


def conflict(error: BaseException) -> bool:
    """Whether Lance refused a commit because a concurrent one came first (its error types vary by operation)."""
    return isinstance(error, CommitConflictError) or "commit conflict" in str(error).lower()


def settle(dataset: lance.LanceDataset) -> None:
    """A new store's indices and automatic cleanup of old versions."""
    dataset.update_config(AUTO_CLEANUP)
    for name, column in INDICES.items():
        dataset.create_scalar_index(column, "BTREE", name=name)


def delete(location: Location, dataset: lance.LanceDataset, addresses: list[int], why: str,
           fragments: list[int] = ()) -> lance.LanceDataset:
    """Commit a version without these rows (by address) and these whole fragments (their files unread)."""
    by_fragment: dict[int, list[int]] = {}
    for address in addresses:
        if address >> 32 not in fragments:
            by_fragment.setdefault(address >> 32, []).append(address & 0xFFFFFFFF)
    updated, deleted = [], list(fragments)
    for fid, offsets in by_fragment.items():
        metadata = LanceFragment(dataset, fid).delete_rows(offsets)
        if metadata is None:
            deleted.append(fid)
        else:
            updated.append(metadata)
    return lance.LanceDataset.commit(dataset, lance.LanceOperation.Delete(updated, deleted, why),
                                     read_version=dataset.version, storage_options=location.storage_options)


def delete_rows(location: Location, dataset: lance.LanceDataset, addresses: list[int], why: str) -> bool:
    """Delete rows (by address) in a new version; False if a concurrent change to their fragments came first
    (compaction drops them later)."""
    try:
        delete(location, dataset, addresses, why)
    except LANCE_ERRORS as e:
        if conflict(e):
            return False
        warnings.warn(f"{location}: could not delete {len(addresses)} {why} ({cause(e)}); they stay shadowed "
                      "(never read) until `arccompress store compact`", stacklevel=3)
        return False
    return True


def after_commit(location: Location, dataset: lance.LanceDataset) -> None:
    """The upkeep a writer does after its commit (see the module's docstring); a failure is a warning: the
    commit stands."""
    try:
        _upkeep(dataset)
    except LANCE_ERRORS as e:
        if conflict(e):
            return  # another writer did the same at the same time
        warnings.warn(f"{location}: automatic compaction or indexing failed ({cause(e)}); the commit stands; run "
                      f"`arccompress store compact {location}`", stacklevel=3)


def _upkeep(dataset: lance.LanceDataset) -> None:
    fragments = dataset.get_fragments()
    segments = index_segments(dataset)
    indexed = {f for _, covered in segments.get(ID_INDEX, []) for f in covered}
    unindexed = [f for f in fragments if f.fragment_id not in indexed]
    small = [f for f in unindexed if f.metadata.physical_rows < SMALL_ROWS]
    if len(small) >= AUTO_COMPACT_FRAGMENTS:
        keep = [f.fragment_id for f in fragments if f.fragment_id in indexed or f.metadata.physical_rows >= SMALL_ROWS]
        dataset.optimize.compact_files(target_rows_per_fragment=SMALL_ROWS, excluded_fragment_ids=keep)
        dataset = dataset.checkout_version(dataset.latest_version)
        unindexed = [f for f in dataset.get_fragments() if f.fragment_id not in indexed]
    if set(INDICES) - set(segments):
        for name, column in INDICES.items():
            if name not in segments:
                dataset.create_scalar_index(column, "BTREE", name=name)
        return
    settled = [f for f in unindexed if f.metadata.physical_rows >= SMALL_ROWS]
    if len(settled) >= AUTO_INDEX_FRAGMENTS or sum(f.metadata.physical_rows for f in unindexed) >= AUTO_INDEX_ROWS:
        dataset.optimize.optimize_indices(num_indices_to_merge=0)  # a new segment: the new rows only
    most = max((len(s) for s in segments.values()), default=0)
    if most >= MAX_INDEX_SEGMENTS:
        dataset.optimize.optimize_indices(num_indices_to_merge=most)
    if any(dataset.config().get(k) != v for k, v in AUTO_CLEANUP.items()):
        dataset.update_config(AUTO_CLEANUP)


# ---------------------------------------------------------------------------- on demand


def compact(location: Location) -> dict[str, Any]:
    """Drop shadowed rows, merge fragments into ones of up to `COMPACT_ROWS` rows (the dataset's order kept),
    make the indices anew (a damaged one is made whole); what it did."""
    table = StoreTable.open(location)
    before = (table.version, len(table.fragments()))
    shadowed = table.shadowed()
    try:
        if shadowed.num_rows and not delete_rows(location, table.ds, shadowed.column(ADDRESS).to_pylist(),
                                                 "shadowed rows (compaction)"):
            raise StoreError(f"{location}: another writer compacted or repaired the store at the same time; run "
                             "compact again")
        dataset = table.ds.checkout_version(table.ds.latest_version)
        try:
            dataset.optimize.compact_files(target_rows_per_fragment=COMPACT_ROWS)
        except LANCE_ERRORS as e:  # compaction moves the indices' rows: a damaged index is made whole first
            if conflict(e) or explain(e)[0] is not None:
                raise
            dataset = rebuild_indices(dataset)
            dataset.optimize.compact_files(target_rows_per_fragment=COMPACT_ROWS)
        dataset = rebuild_indices(dataset.checkout_version(dataset.latest_version))
    except LANCE_ERRORS as e:
        if conflict(e):
            raise StoreError(f"{location}: another writer compacted the store at the same time; run compact again") \
                from None
        raise location.error("compact", e) from None
    return {"version_before": before[0], "version": dataset.version, "fragments_before": before[1],
            "fragments": len(dataset.get_fragments()), "shadowed_rows_dropped": shadowed.num_rows}


def cleanup(location: Location, older_than: timedelta) -> dict[str, Any]:
    """Remove the versions older than `older_than` (but the latest, and tagged ones) and the files only they used;
    time travel to them ends. Returns Lance's counts."""
    dataset = StoreTable.open(location).ds
    try:
        stats = dataset.cleanup_old_versions(older_than=older_than, error_if_tagged_old_versions=False)
    except LANCE_ERRORS as e:
        raise location.error("clean up old versions", e) from None
    return {"versions_removed": stats.old_versions, "bytes_removed": stats.bytes_removed,
            "data_files_removed": stats.data_files_removed}


# ---------------------------------------------------------------------------- damage


@dataclass
class Damage:
    """A damaged data file: what is wrong, and the ids whose rows it held (`ids` None: neither the file's id column
    nor the id index can say; `rows` of them, ids unknown). offsets: the damaged rows (None: all)."""

    file: str
    fragment: int
    error: str
    rows: int
    ids: list[str] | None
    offsets: list[int] | None = None
    lookalike: str | None = None  # a data file of nearly the same name, not listed: the manifest may be damaged

    def __str__(self) -> str:
        held = f"{len(self.ids)} ids: {', '.join(map(repr, self.ids[:5]))}{' ...' if len(self.ids) > 5 else ''}" \
            if self.ids is not None else f"{self.rows} rows whose ids are unknown (the file's ids cannot be read and " \
                                         "the id index does not cover it: a resumed corpus job computes every id it " \
                                         "does not find)"
        if self.lookalike:
            return (f"{self.file}: {self.error}; {self.lookalike} is in the folder, not listed, its name one or two "
                    "characters off: the manifest (not the file) is probably damaged: do not repair (it would drop "
                    "the rows); open an earlier version (ContextStore(..., version=)) or restore the manifest")
        return f"{self.file}: {self.error} ({held})"


@dataclass
class VerifyReport:
    """What `verify` found at one version: damaged data files, and damaged indices (`repair` rebuilds them)."""

    store: str
    version: int
    fragments: int
    rows: int
    damaged: list[Damage] = field(default_factory=list)
    indices: list[str] = field(default_factory=list)
    history: str | None = None  # newer versions whose manifests are gone (nothing repair can bring back)
    conversion: str | None = None  # a conversion into this store that stopped part-way (`convert` finishes it)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.indices and self.history is None and self.conversion is None

    @property
    def lost_ids(self) -> list[str]:
        return [k for d in self.damaged for k in d.ids or ()]


def verify(location: Location, bytes_per_vector: int, cont_stored: bool, version: int | None = None) -> VerifyReport:
    """Read every row of every data file: each file readable, each row of the right size and matching its checksum;
    the damaged files, with their ids (from the file, its id column alone, or the id index when the file cannot be
    read); and every index against the rows read (`IndexCheck`)."""
    table = StoreTable.open(location, version)
    fragments = table.fragments()
    report = VerifyReport(str(location), table.version, len(fragments), 0)
    need = bytes_per_vector
    checks = [IndexCheck(table, index, column) for index, column in INDICES.items()]
    for fragment in fragments:
        name = data_file(fragment)
        bad: list[tuple[int, str]] = []
        seen: dict[str, list[Any]] = {column: [] for column in (ADDRESS, *INDICES.values())}
        try:
            count = 0
            for batch in table.ds.scanner(columns=list(FIELDS), with_row_address=True, fragments=[fragment],
                                          batch_size=1024, use_scalar_index=False).to_batches():
                for row in batch.to_pylist():
                    count += 1
                    codes = row["codes"] or b""
                    wanted = (row["num_embeddings"] - cont_added(cont_stored)) * need
                    if len(codes) != wanted or wanted < need or \
                            row_checksum(tuple(row[c] for c in CHECKED)) != row["checksum"]:
                        bad.append((row[ADDRESS] & 0xFFFFFFFF, row["id"]))
                    for column, found in seen.items():
                        found.append(row[column])
            report.rows += count
        except LANCE_ERRORS as e:
            rows = fragment.metadata.physical_rows
            report.damaged.append(Damage(name, fragment.fragment_id, f"unreadable: {cause(e)}", rows,
                                         _ids_of_unreadable(table, fragment), lookalike=_lookalike(table, name)))
            continue
        for check in checks:
            check.fragment(fragment.fragment_id, seen[ADDRESS], seen[check.column])
        if bad:
            report.damaged.append(Damage(name, fragment.fragment_id, f"{len(bad)} rows do not match their checksum",
                                         len(bad), [k for _, k in bad], [o for o, _ in bad]))
    report.indices = [f"index {c.index!r} on {c.column!r}: {c.problem}" for c in checks if c.problem]
    report.history = lost_versions(location, table.version)
    source = unfinished(description(table.ds.schema.metadata))
    report.conversion = None if source is None else unfinished_advice(location, source)
    return report


def _lookalike(table: StoreTable, name: str) -> str | None:
    """A data file not listed whose name differs from `name` (a listed file that cannot be read) in one or two
    characters: what a changed byte in the manifest makes of a file's name."""
    listed = {data_file(f) for f in table.fragments()}
    try:
        present = [f"data/{n.rsplit('/', 1)[-1]}" for n in table.location.files().list("data")]
    except LANCE_ERRORS:
        return None
    return next((n for n in present if n not in listed and len(n) == len(name)
                 and sum(a != b for a, b in zip(n, name)) <= 2), None)


def _index_pages(table: StoreTable, uuid: str) -> Any:
    """An index segment's values and row addresses (Lance's B-tree page file), its lookup page read too."""
    files = table.location.files()
    files.open_reader(f"_indices/{uuid}/page_lookup.lance").read_all()
    return files.open_reader(f"_indices/{uuid}/page_data.lance").read_all().to_table()


class IndexCheck:
    """One index checked against the rows, a fragment at a time: each row of a fragment it covers must be under
    its value (a changed byte in the index would make reads through it miss the row). `problem`: the first found."""

    def __init__(self, table: StoreTable, index: str, column: str):
        self.table, self.index, self.column = table, index, column
        self.segments = index_segments(table.ds).get(index, [])
        self.pages: dict[str, tuple[np.ndarray, pa.Array]] = {}  # uuid -> (addresses sorted, their values)
        self.problem: str | None = None

    def fragment(self, fragment: int, addresses: list[int], values: list[str | None]) -> None:
        uuid = next((u for u, covered in self.segments if fragment in covered), None)
        if uuid is None or self.problem is not None:
            return
        try:
            indexed, indexed_values = self._pages(uuid)
        except (*LANCE_ERRORS, KeyError) as e:
            self.problem = f"segment {uuid} cannot be read ({cause(e)})"
            return
        rows = [(a, v) for a, v in zip(addresses, values) if v is not None]
        if not rows:
            return
        wanted = np.asarray([a for a, _ in rows], np.uint64)
        at = np.minimum(np.searchsorted(indexed, wanted), max(len(indexed) - 1, 0))
        got = indexed_values.take(pa.array(at)).to_pylist() if len(indexed) else [None] * len(rows)
        for (address, value), place, held in zip(rows, at.tolist(), got):
            if not len(indexed) or indexed[place] != address or held != value:
                self.problem = f"segment {uuid} does not hold {value!r} where the data does (damaged)"
                return

    def _pages(self, uuid: str) -> tuple[np.ndarray, pa.Array]:
        if uuid not in self.pages:
            pages = _index_pages(self.table, uuid)
            addresses = pages.column("ids").to_numpy()
            order = np.argsort(addresses, kind="stable")
            self.pages[uuid] = addresses[order], pages.column("values").combine_chunks().take(pa.array(order))
        return self.pages[uuid]


def rebuild_indices(dataset: lance.LanceDataset) -> lance.LanceDataset:
    """Every index made anew from the rows (a version): what `repair` does to a damaged one, and `compact` does."""
    for name, column in INDICES.items():
        dataset.create_scalar_index(column, "BTREE", name=name, replace=True)
    return dataset.checkout_version(dataset.latest_version)


def _ids_of_unreadable(table: StoreTable, fragment: LanceFragment) -> list[str] | None:
    """The ids of a data file that cannot be read whole: its id column alone (it may survive), else the id index's."""
    try:
        return table.ds.scanner(columns=["id"], fragments=[fragment], use_scalar_index=False).to_table() \
            .column("id").to_pylist()
    except LANCE_ERRORS:
        return _indexed_ids(table, fragment.fragment_id)


def _indexed_ids(table: StoreTable, fragment: int) -> list[str] | None:
    """The ids the id index holds for a fragment (read from the index's own pages: its values and row addresses);
    None when the index does not cover the fragment or cannot be read so."""
    try:
        uuid = next(u for u, covered in index_segments(table.ds).get(ID_INDEX, []) if fragment in covered)
        pages = _index_pages(table, uuid)
        addresses = pages.column("ids").to_numpy()
        return pages.column("values").filter(addresses >> np.uint64(32) == fragment).to_pylist()
    except (StopIteration, KeyError, *LANCE_ERRORS):
        return None


def repair(location: Location, report: VerifyReport) -> dict[str, Any]:
    """A new version without the damaged files and rows of `report` (and without later rows of their ids), so that
    every id reads or is absent; the ids to compute again (a resumed corpus job does), and how many rows of
    unknown ids were dropped."""
    if not report.damaged and not report.indices:  # whole; or lost versions, a stopped conversion: nothing to remove
        return {"version": report.version, "ids": [], "unknown_rows": 0}
    table = StoreTable.open(location)
    if not report.damaged:
        return {"version": _rebuilt(location, table.ds).version, "ids": [], "unknown_rows": 0}
    present = {data_file(f): f for f in table.fragments()}
    for d in report.damaged:
        if d.lookalike:
            raise StoreError(f"{location}: not repaired: {d}")
        if present.get(d.file) is None or present[d.file].fragment_id != d.fragment:
            raise StoreError(f"{location}: {d.file} changed since it was verified (version {report.version}; now "
                             f"{table.version}): run verify again")
    whole = [d.fragment for d in report.damaged if d.offsets is None]
    addresses = [(d.fragment << 32) | o for d in report.damaged if d.offsets is not None for o in d.offsets]
    lost = report.lost_ids
    if lost:  # later rows of the lost ids would come to light: they go too
        healthy = [f for f in table.fragments() if f.fragment_id not in whole]
        later = table.ds.scanner(columns=[], filter=in_filter("id", lost), with_row_address=True,
                                 fragments=healthy, use_scalar_index=False).to_table() if healthy else None
        if later is not None:
            seen = set(addresses)
            addresses += [a for a in later.column(ADDRESS).to_pylist() if a not in seen]
    try:
        dataset = delete(location, table.ds, addresses, "repair", whole)
    except LANCE_ERRORS as e:
        if conflict(e):
            raise StoreError(f"{location}: the store changed during the repair: run verify and repair again") \
                from None
        raise location.error("repair", e) from None
    if report.indices:
        dataset = _rebuilt(location, dataset)
    return {"version": dataset.version, "ids": lost,
            "unknown_rows": sum(d.rows for d in report.damaged if d.ids is None)}


def _rebuilt(location: Location, dataset: lance.LanceDataset) -> lance.LanceDataset:
    try:
        return rebuild_indices(dataset)
    except LANCE_ERRORS as e:
        raise location.error("rebuild the indices", e) from None
