"""Writing a store: rows from contexts (the GPU-friendly batch path), the queue, and the commit, with one row per id.

Rows from contexts: per batch one `torch.cat` of the contexts' vectors where the compressor made them, one
finiteness and range check, one copy to the host, then the codec; no per-context host math.

The commit takes no lock. A writer looks its ids up in the latest version (ids stored with identical rows, a
retried task, count as written; with other contents they are refused), writes the other rows as Lance data files
(the slow part), and commits them: Lance writes the next version of the manifest only if no other writer wrote
it (put-if-absent, on a local disk, NFS and object stores alike), else adds them after the versions committed
meanwhile. In that case the writer looks again: an id another writer committed first (in one of those versions)
reads the other writer's row, by the rule of `table` (first row wins); this writer's row is shadowed, deleted
right away, and the id counts as written if the rows are identical and is refused (IdClashError) if not. So of
writers racing on one id exactly one row is ever read, by every reader, and every other writer is told.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from lance.fragment import FragmentMetadata, write_fragments

from .codec import FLOAT_QUANTIZERS, Codec
from ..context import CompressedContext, check_finite
from ..errors import InputError, StoreError
from .format import COLUMNS, FIELDS, checksums, cont_added, row_schema
from .location import LANCE_ERRORS, Location
from .maintenance import after_commit, delete_rows
from .manifest import description
from .spaces import HeadOn, Space
from .table import ADDRESS, StoreTable, fragment_of

MAX_CHUNK_BYTES = 1 << 30  # a binary Arrow array holds < 2 GiB: larger tables get several chunks
MAX_ROWS_PER_FILE = 1 << 20  # one data file per commit for any batch a writer makes
SHOWN = 5  # ids named in a message


def show(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(repr(k[:200] + "..." if len(k) > 200 else k) for k in keys[:SHOWN]) + more


class IdClashError(StoreError):
    """Ids a writer tried to commit that the store holds with other contents; its other rows were committed.

    ids: the refused ids; same_text: those whose stored row has the same text (`text_sha256`), i.e. the same
    text compressed twice; committed: the ids this commit stored."""

    def __init__(self, message: str, ids: list[str], same_text: list[str], committed: list[str]):
        super().__init__(message)
        self.ids, self.same_text, self.committed = ids, same_text, committed

    def __reduce__(self) -> tuple:  # crosses process boundaries (a Ray task's error) whole
        return type(self), (str(self), self.ids, self.same_text, self.committed)


@dataclass
class CommitResult:
    """What a commit did: the ids it stored, the ids already stored with identical rows, the version it made
    (None when it had nothing to store)."""

    committed: list[str]
    identical: list[str]
    version: int | None


# ---------------------------------------------------------------------------- rows from contexts


@dataclass
class Batch:
    """Contexts turned into row fields and codec-space vectors, on the host, in the codec's storage dtype."""

    keys: list[str]
    columns: dict[str, list]  # num_tokens, num_embeddings, chunk_size, text_sha256, text_bytes
    vectors: torch.Tensor  # (sum of lengths, dim)
    lengths: list[int]
    absent_at: int | None = None  # a version of the store that held none of these ids (checked when queued)
    starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.starts = [0, *itertools.accumulate(self.lengths)]

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, first: int, last: int) -> Batch:
        """Contexts first..last-1 (their vectors a view, not a copy)."""
        return Batch(self.keys[first:last], {k: v[first:last] for k, v in self.columns.items()},
                     self.vectors[self.starts[first]: self.starts[last]], self.lengths[first:last], self.absent_at)

    def select(self, keep: Sequence[int]) -> Batch:
        """The contexts at these positions (their vectors copied)."""
        vectors = [self.vectors[self.starts[i]: self.starts[i + 1]] for i in keep]
        return Batch([self.keys[i] for i in keep], {k: [v[i] for i in keep] for k, v in self.columns.items()},
                     torch.cat(vectors) if vectors else self.vectors[:0], [self.lengths[i] for i in keep],
                     self.absent_at)


def context_batch(keys: list[str], contexts: list[CompressedContext], space: Space, codec: Codec,
                  head_on: HeadOn) -> Batch:
    """The contexts' vectors of the store's space, checked and brought to the host in one step each."""
    parts, lengths = [], []
    for key, ctx in zip(keys, contexts):
        vectors = space.vectors(ctx, head_on)
        if vectors is None:
            raise StoreError(f"context {key!r}: this store keeps {space.what}, which a context carries only as "
                             "Compressor.compress made it (not after save/load or from a store): add the texts "
                             "with add_texts(), or contexts fresh from compress()")
        want = ctx.num_embeddings - cont_added(space.cont_stored)
        if want < 1 or tuple(vectors.shape) != (want, codec.dim) or not vectors.dtype.is_floating_point:
            raise StoreError(f"context {key!r}: {space.what} of shape {list(vectors.shape)} ({vectors.dtype}); "
                             f"this store keeps ({want}, {codec.dim}) floating-point ones for {ctx.num_embeddings} "
                             "embeddings")
        parts.append(vectors)
        lengths.append(want)
    storage = FLOAT_QUANTIZERS.get(codec.quantizer, torch.float32)
    if not parts:
        return Batch([], _columns([]), torch.empty(0, codec.dim, dtype=storage), [])
    device = parts[0].device
    if any(p.device != device for p in parts):
        parts = [p.to(device) for p in parts]
    x = torch.cat(parts)  # (N, dim) where the compressor made them
    low, high = torch.stack(torch.aminmax(x)).float().tolist()  # the one host wait of the batch
    limit = torch.finfo(storage).max
    if not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) > limit:
        for key, part in zip(keys, parts):  # name the first culprit
            check_finite(part, f"context {key!r}: {space.what}")
            peak = part.abs().max().item()
            if peak > limit:
                raise InputError(f"context {key!r}: {space.what}: values up to {peak:.4g} do not fit in "
                                 f"{codec.quantizer} (max {limit:.4g}); use a float32 or bfloat16 codec")
    host = x.to(dtype=storage).to("cpu")
    return Batch(keys, _columns(contexts), host, lengths)


def _columns(contexts: list[CompressedContext]) -> dict[str, list]:
    texts = [None if c.text is None else c.text.encode("utf-8") for c in contexts]
    return {"num_tokens": [c.num_tokens for c in contexts], "num_embeddings": [c.num_embeddings for c in contexts],
            "chunk_size": [c.chunk_size for c in contexts],
            "text_sha256": [None if t is None else hashlib.sha256(t).hexdigest() for t in texts],
            "text_bytes": [None if t is None else len(t) for t in texts]}


def batch_table(batch: Batch, codec: Codec) -> pa.Table:
    """The batch as store rows: codes from the codec (without copying them into Arrow), checksums computed."""
    codes = np.ascontiguousarray(codec.encode(batch.vectors))  # (N, bytes_per_vector) uint8
    bpv, n = codec.bytes_per_vector, len(batch.keys)
    step = max(1, MAX_CHUNK_BYTES // (max(batch.lengths, default=1) * bpv))  # rows per Arrow chunk
    starts = np.asarray(batch.starts, np.int64)
    chunks = []
    for first in range(0, n, step):
        last = min(first + step, n)
        offsets = ((starts[first: last + 1] - starts[first]) * bpv).astype(np.int32)
        blob = codes[starts[first]: starts[last]]
        chunks.append(pa.Array.from_buffers(pa.binary(), last - first, [None, pa.py_buffer(offsets),
                                                                        pa.py_buffer(blob)]))
    table = pa.table({"id": pa.array(batch.keys, pa.string()), **batch.columns,
                      "codes": pa.chunked_array(chunks, pa.binary())}, schema=pa.schema(COLUMNS[:-1]))
    return table.append_column("checksum", pa.array(checksums(table), pa.binary()))


class Queue:
    """Contexts added and not yet committed, by id, in batches as they came."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self._where: dict[str, tuple[int, int]] = {}  # id -> (batch, position)
        self.num_vectors = 0  # of every queued context (counted: a pq store's queue waits for enough to train on)

    def add(self, batch: Batch) -> None:
        b = len(self.batches)
        self.batches.append(batch)
        self._where.update((key, (b, i)) for i, key in enumerate(batch.keys))
        self.num_vectors += batch.vectors.shape[0]

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self):
        return iter(self._where)

    def vectors(self) -> torch.Tensor:
        return torch.cat([b.vectors for b in self.batches])

    def get(self, key: str) -> tuple[dict[str, Any], torch.Tensor]:
        """A queued context's row fields and vectors."""
        b, i = self._where[key]
        batch = self.batches[b]
        return {name: values[i] for name, values in batch.columns.items()}, \
            batch.vectors[batch.starts[i]: batch.starts[i + 1]]

    def table(self, codec: Codec) -> pa.Table:
        return pa.concat_tables([batch_table(b, codec) for b in self.batches])

    def absent_at(self) -> int | None:
        """A version of the store that held none of the queued ids, if every batch was checked against it."""
        versions = {b.absent_at for b in self.batches}
        return versions.pop() if len(versions) == 1 else None

    def remove(self, keys: Sequence[str]) -> None:
        """Take these ids out of the queue (the others keep their order)."""
        gone = set(keys) & set(self._where)
        if not gone:
            return
        batches = [b.select([i for i, k in enumerate(b.keys) if k not in gone]) for b in self.batches]
        self.clear()
        for batch in batches:
            if len(batch):
                self.add(batch)

    def clear(self) -> None:
        self.batches.clear()
        self._where.clear()
        self.num_vectors = 0


# ---------------------------------------------------------------------------- rows from elsewhere


@dataclass(frozen=True)
class RowRules:
    """What every row of a store must be: of this store (its id), with codes of the codec's size.

    Small and picklable: a write task carries it instead of the store."""

    store_id: str
    codec: str  # e.g. "bottleneck-pq"
    bytes_per_vector: int
    cont_stored: bool  # whether rows keep the <Cont> vector (decoder space) or reading appends it


def checked_rows(table: pa.Table, rules: RowRules) -> pa.Table:
    """Rows to commit (from `ContextStore.encode`, a worker, another process), checked: the store's columns,
    distinct non-empty ids, codes of the codec's size, and every row's checksum."""
    if not isinstance(table, pa.Table):
        raise StoreError(f"rows to commit must be a pyarrow Table, not {type(table).__name__}")
    if table.schema.names != list(FIELDS):
        raise StoreError(f"rows to commit have columns {table.schema.names}, not a store's {list(FIELDS)}")
    try:
        table = table.cast(row_schema())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise StoreError(f"rows to commit: a column has the wrong type ({e})") from None
    ids = table.column("id")
    if ids.null_count or pc.any(pc.equal(pc.binary_length(ids), 0)).as_py():
        raise StoreError("rows to commit: every row needs a non-empty id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        counts = pc.value_counts(ids)
        twice = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        raise StoreError(f"rows to commit: ids given twice: {show(twice)}")
    keys = ids.to_pylist()
    wanted = pc.multiply(pc.subtract(table.column("num_embeddings"), cont_added(rules.cont_stored)),
                         rules.bytes_per_vector)
    bad = pc.or_kleene(pc.or_kleene(pc.less(table.column("num_tokens"), 1),
                                    pc.less(wanted, rules.bytes_per_vector)),
                       pc.not_equal(pc.binary_length(table.column("codes")), wanted))
    bad = pc.fill_null(bad, True).to_pylist()
    if any(bad):
        i = bad.index(True)
        codes = table.column("codes")[i].as_py()
        raise StoreError(f"row {keys[i]!r}: {len(codes or b'')} bytes of codes for "
                         f"{table.column('num_embeddings')[i].as_py()} embeddings and "
                         f"{table.column('num_tokens')[i].as_py()} tokens ({rules.codec} needs "
                         f"{rules.bytes_per_vector} bytes per vector)")
    for key, want, got in zip(keys, checksums(table), table.column("checksum").to_pylist()):
        if want != got:
            raise StoreError(f"row {key!r}: its checksum does not match its values (changed or damaged on the way)")
    return table


# ---------------------------------------------------------------------------- the commit


@dataclass
class Written:
    """Rows written as data files of a store, not committed yet: what a write task hands the committer.

    fragments: Lance's fragment descriptions (JSON), in row order; the rows' ids, checksums, text hashes and
    encoder tokens. Plain values: it crosses processes as an Arrow row (`to_row`, `from_row`)."""

    fragments: list[str]
    ids: list[str]
    checksums: list[bytes]
    text_sha256: list[str | None]
    num_tokens: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def schema() -> pa.Schema:
        """Rows of `to_row`, as an Arrow table holds them."""
        return pa.schema([("fragments", pa.list_(pa.string())), ("ids", pa.list_(pa.string())),
                          ("checksums", pa.list_(pa.binary())), ("text_sha256", pa.list_(pa.string())),
                          ("num_tokens", pa.list_(pa.int64()))])

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Written:
        return cls(**{f.name: list(row[f.name]) for f in fields(cls)})


@dataclass
class Verdicts:
    """Which rows of a commit are stored by it, and what happened to the others."""

    keep: list[bool] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    same_text: list[str] = field(default_factory=list)

    def judge(self, key: str, ours: tuple[bytes, str | None], theirs: tuple[bytes, str | None]) -> None:
        """A row of ours whose id has another row (stored, or earlier in this commit): counted or refused."""
        if ours[0] == theirs[0]:
            self.identical.append(key)
        else:
            self.refused.append(key)
            if ours[1] is not None and ours[1] == theirs[1]:
                self.same_text.append(key)


def write_rows(location: Location, rows: pa.Table) -> Written:
    """Write checked rows as data files of the store at `location` (not committed: invisible until then)."""
    try:
        fragments = write_fragments(rows, location.lance(), schema=row_schema(), mode="append",
                                    max_rows_per_file=MAX_ROWS_PER_FILE, storage_options=location.storage_options)
    except LANCE_ERRORS as e:
        raise location.error("write data files", e) from None
    return Written([json.dumps(f.to_json()) for f in fragments], rows.column("id").to_pylist(),
                   rows.column("checksum").to_pylist(), rows.column("text_sha256").to_pylist(),
                   rows.column("num_tokens").to_pylist())


def latest_table(location: Location, table: StoreTable | None, store_id: str) -> StoreTable:
    """The store's latest version, checked to be the store the writer was made for."""
    table = table.latest() if table is not None else StoreTable.open(location)
    found = description(table.ds.schema.metadata)
    if found.get("store_id") != store_id:
        raise StoreError(f"{location} now holds another store than the one this writer was opened for")
    return table


def judge(table: StoreTable, keys: list[str], marks: list[tuple[bytes, str | None]]) -> Verdicts:
    """Rows of ours (ids, checksums and text hashes) against the stored rows, and against each other."""
    stored = table.rows(keys, ["checksum", "text_sha256"])
    verdicts, first = Verdicts(), {}
    for key, mark in zip(keys, marks):
        theirs = (stored[key]["checksum"], stored[key]["text_sha256"]) if key in stored else first.get(key)
        verdicts.keep.append(theirs is None)
        if theirs is None:
            first[key] = mark
        else:
            verdicts.judge(key, mark, theirs)
    return verdicts


def commit_rows(location: Location, rules: RowRules, rows: pa.Table, table: StoreTable | None = None,
                absent_at: int | None = None) -> tuple[CommitResult, StoreTable]:
    """Commit checked rows (see the module's docstring); return what was stored and the version made. absent_at:
    a version known to hold none of the rows' ids (if it is still the latest, they are not looked up again)."""
    table = latest_table(location, table, rules.store_id)
    keys = rows.column("id").to_pylist()
    if table.version == absent_at:
        verdicts = Verdicts(keep=[True] * len(keys))
    else:
        verdicts = judge(table, keys, list(zip(rows.column("checksum").to_pylist(),
                                               rows.column("text_sha256").to_pylist())))
    rows = rows.filter(pa.array(verdicts.keep))  # ids stored before this commit are not written again
    verdicts.keep = [True] * rows.num_rows
    parts = [write_rows(location, rows)] if rows.num_rows else []
    return _append(location, table, parts, verdicts)


def commit_written(location: Location, rules: RowRules, parts: list[Written], table: StoreTable | None = None
                   ) -> tuple[CommitResult, StoreTable]:
    """Commit rows that write tasks wrote (in this order: an id given twice is stored by its first row)."""
    table = latest_table(location, table, rules.store_id)
    keys = [k for p in parts for k in p.ids]
    marks = [m for p in parts for m in zip(p.checksums, p.text_sha256)]
    return _append(location, table, parts, judge(table, keys, marks))


def _append(location: Location, table: StoreTable, parts: list[Written], verdicts: Verdicts
            ) -> tuple[CommitResult, StoreTable]:
    """Commit the parts' fragments holding a kept row; then look again if other commits came first, delete our
    shadowed rows, and keep the store in shape (`maintenance.after_commit`)."""
    rows: list[tuple[str, bytes, str | None, bool, str, int]] = []  # id, checksum, text hash, kept, file, offset
    fragments: list[FragmentMetadata] = []
    marks = [m for p in parts for m in zip(p.ids, p.checksums, p.text_sha256)]
    for text in (t for p in parts for t in p.fragments):
        fragment = FragmentMetadata.from_json(text)
        path, first = fragment.files[0].path, len(rows)
        rows += [(*mark, keep, path, i) for i, (mark, keep) in
                 enumerate(zip(marks[first: first + fragment.physical_rows], verdicts.keep[first:]))]
        if any(r[3] for r in rows[first:]):
            fragments.append(fragment)
        else:  # written by a task whose every row another commit holds
            _remove_unused(location, path)
    committed = {key: (checksum, text) for key, checksum, text, kept, _, _ in rows if kept}
    if not fragments:
        return _result(location, verdicts, [], None), table
    try:
        dataset = lance.LanceDataset.commit(table.ds, lance.LanceOperation.Append(fragments),
                                            read_version=table.version, storage_options=location.storage_options)
    except LANCE_ERRORS as e:
        raise location.error("commit", e) from None
    new = table.at(dataset)
    mine = {f.files[0].path for f in fragments}
    ours = {f.metadata.files[0].path: f.fragment_id for f in new.fragments()
            if f.metadata.files and f.metadata.files[0].path in mine}
    lost: set[str] = set()
    if new.version != table.version + 1:  # others committed meanwhile: did they commit some of our ids first?
        own = set(ours.values())
        for key, row in new.rows(list(committed), ["checksum", "text_sha256"]).items():
            if fragment_of(row[ADDRESS]) not in own:
                lost.add(key)
                verdicts.judge(key, committed[key], (row["checksum"], row["text_sha256"]))
    shadowed = [(ours[path] << 32) | i for key, _, _, kept, path, i in rows
                if path in ours and (not kept or key in lost)]
    if shadowed:
        delete_rows(location, new.ds, shadowed, "rows whose ids other writers committed first")
    after_commit(location, new.ds)
    return _result(location, verdicts, [k for k in committed if k not in lost], new.version), new


def _remove_unused(location: Location, path: str) -> None:
    """Delete a data file that will never be committed (best effort: Lance's cleanup removes what is left)."""
    try:
        location.files().delete_file(f"data/{path}")
    except LANCE_ERRORS:
        pass


def _result(location: Location, verdicts: Verdicts, committed: list[str], version: int | None) -> CommitResult:
    if verdicts.refused:
        same = f"; {len(verdicts.same_text)} of them hold the same text (compressed again)" \
            if verdicts.same_text else ""
        identical = f" ({len(verdicts.identical)} already stored identically)" if verdicts.identical else ""
        raise IdClashError(f"{location}: ids already stored with other contents, not written: "
                           f"{show(verdicts.refused)}{same}; the batch's {len(committed)} other contexts were "
                           f"committed{identical}", verdicts.refused, verdicts.same_text, committed)
    return CommitResult(committed, verdicts.identical, version)


# ---------------------------------------------------------------------------- the write-task handle


@dataclass(frozen=True)
class FragmentWriter:
    """A light, picklable handle that writes and commits rows to a store: its location and row rules only.

    What a write task (a Ray task, a worker process) holds instead of a ContextStore: `commit(table)` checks rows
    of the store's format (from `ContextStore.encode`) and commits them; `write(table)` only writes them as data
    files, for a committer (the Ray driver) to commit many at once with `commit_written`."""

    location: Location
    rules: RowRules

    def write(self, table: pa.Table) -> Written:
        return write_rows(self.location, checked_rows(table, self.rules))

    def commit(self, table: pa.Table) -> CommitResult:
        """IdClashError for ids stored with other contents (the other rows are committed); ids stored with
        identical rows are skipped as written."""
        return commit_rows(self.location, self.rules, checked_rows(table, self.rules))[0]

    def commit_written(self, parts: Sequence[Written]) -> CommitResult:
        """Commit rows written by `write` (by any process), in one version; an id given twice is stored by its
        first row (the second counts as written if identical, else IdClashError)."""
        return commit_written(self.location, self.rules, list(parts))[0]
