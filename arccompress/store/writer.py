"""Writing a store: rows from contexts (the GPU-friendly batch path), the queue, and the commit protocol.

Rows from contexts: per batch one `torch.cat` of the contexts' vectors where the compressor made them, one
finiteness and range check, one copy to the host, then the codec; no per-context host math.

The commit: a writer writes its rows to a temporary fragment (the slow part, unlocked), then, holding the
store's lock, indexes the fragments committed since it last looked, checks its ids against them, drops rows
whose id is stored (identical rows, a retried task, count as written; different rows are refused), and
hard-links the fragment into `data/`, which fails rather than replace a committed file. So of two writers
committing one id exactly one succeeds, and the other is told which ids were refused by `IdClashError`
(after committing the rest of its rows).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..codec import FLOAT_QUANTIZERS, Codec
from ..context import CompressedContext, check_finite
from ..errors import InputError, StoreError
from .files import link_new, store_lock, temporary_path
from .format import (COLUMNS, DATA, FIELDS, MANIFEST, FragmentIdentity, checksums, cont_added, fragment_name,
                     row_schema, write_fragment)
from .index import FragmentIndex
from .spaces import HeadOn, Space

MAX_CHUNK_BYTES = 1 << 30  # a binary Arrow array holds < 2 GiB: larger tables get several chunks
SHOWN = 5  # ids named in a message


def show(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(map(repr, keys[:SHOWN])) + more


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
    """What a commit did: the ids it stored, the ids already stored with identical rows, the fragment's name."""

    committed: list[str]
    identical: list[str]
    fragment: str | None


# ---------------------------------------------------------------------------- rows from contexts


@dataclass
class Batch:
    """Contexts turned into row fields and codec-space vectors, on the host, in the codec's storage dtype."""

    keys: list[str]
    columns: dict[str, list]  # num_tokens, num_embeddings, chunk_size, text_sha256, text_bytes
    vectors: torch.Tensor  # (sum of lengths, dim)
    lengths: list[int]
    starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.starts = [0, *itertools.accumulate(self.lengths)]

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, first: int, last: int) -> Batch:
        """Contexts first..last-1 (their vectors a view, not a copy)."""
        return Batch(self.keys[first:last], {k: v[first:last] for k, v in self.columns.items()},
                     self.vectors[self.starts[first]: self.starts[last]], self.lengths[first:last])


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

    def add(self, batch: Batch) -> None:
        b = len(self.batches)
        self.batches.append(batch)
        self._where.update((key, (b, i)) for i, key in enumerate(batch.keys))

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

    def clear(self) -> None:
        self.batches.clear()
        self._where.clear()


# ---------------------------------------------------------------------------- rows from elsewhere


def checked_rows(table: pa.Table, identity: FragmentIdentity) -> pa.Table:
    """Rows to commit (from `ContextStore.encode`, a worker, another process), checked: the columns of a
    fragment, distinct non-empty ids, codes of the codec's size, and every row's checksum."""
    if not isinstance(table, pa.Table):
        raise StoreError(f"rows to commit must be a pyarrow Table, not {type(table).__name__}")
    if table.schema.names != list(FIELDS):
        raise StoreError(f"rows to commit have columns {table.schema.names}, not a store fragment's {list(FIELDS)}")
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
    wanted = pc.multiply(pc.subtract(table.column("num_embeddings"), cont_added(identity.cont_stored)),
                         identity.bytes_per_vector)
    bad = pc.or_kleene(pc.or_kleene(pc.less(table.column("num_tokens"), 1),
                                    pc.less(wanted, identity.bytes_per_vector)),
                       pc.not_equal(pc.binary_length(table.column("codes")), wanted))
    bad = pc.fill_null(bad, True).to_pylist()
    if any(bad):
        i = bad.index(True)
        codes = table.column("codes")[i].as_py()
        raise StoreError(f"row {keys[i]!r}: {len(codes or b'')} bytes of codes for "
                         f"{table.column('num_embeddings')[i].as_py()} embeddings and "
                         f"{table.column('num_tokens')[i].as_py()} tokens ({identity.codec} needs "
                         f"{identity.bytes_per_vector} bytes per vector)")
    stored = table.column("checksum").to_pylist()
    for key, want, got in zip(keys, checksums(table), stored):
        if want != got:
            raise StoreError(f"row {key!r}: its checksum does not match its values (changed or damaged on the way)")
    return table


# ---------------------------------------------------------------------------- the commit


def commit(folder: Path, identity: FragmentIdentity, table: pa.Table, index: FragmentIndex) -> CommitResult:
    """Commit checked rows as one fragment of the store at `folder` (see the module's docstring)."""
    if not table.num_rows:
        return CommitResult([], [], None)
    data = folder / DATA
    data.mkdir(exist_ok=True)
    temporary = [temporary_path(data / fragment_name(table.column("id")))]
    try:
        write_fragment(table, temporary[0], identity)
        with store_lock(folder):
            _check_manifest(folder, identity)
            index.refresh()  # every fragment committed so far: the lock keeps new ones out
            keys = table.column("id").to_pylist()
            stored = [i for i, key in enumerate(keys) if key in index]
            identical, refused, same_text = [], [], []
            if stored:
                found = index.values([keys[i] for i in stored], ["checksum", "text_sha256"])
                ours = table.select(["checksum", "text_sha256"]).take(stored).to_pylist()
                for i, row in zip(stored, ours):
                    theirs = found[keys[i]]
                    if theirs["checksum"] == row["checksum"]:
                        identical.append(keys[i])
                    else:
                        refused.append(keys[i])
                        if row["text_sha256"] is not None and theirs["text_sha256"] == row["text_sha256"]:
                            same_text.append(keys[i])
                keep = sorted(set(range(len(keys))) - set(stored))
                table = table.take(pa.array(keep, pa.int64()))
                if keep:  # the fragment again, without the stored ids (and so under another name)
                    temporary.append(temporary_path(data / fragment_name(table.column("id"))))
                    write_fragment(table, temporary[-1], identity)
            name = None
            if table.num_rows:
                name = fragment_name(table.column("id"))
                try:
                    link_new(temporary[-1], data / name)
                except FileExistsError:
                    raise StoreError(f"{data / name} appeared while this writer held the store's lock: another "
                                     "writer does not lock it (an older arccompress?)") from None
                index.add(data / name, table.column("id"))
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
    committed = table.column("id").to_pylist()
    if refused:
        same = f"; {len(same_text)} of them hold the same text (compressed again)" if same_text else ""
        raise IdClashError(f"{folder}: ids already stored with other contents, not written: {show(refused)}{same}; "
                           f"the batch's {len(committed)} other contexts were committed"
                           + (f" ({len(identical)} already stored identically)" if identical else ""),
                           refused, same_text, committed)
    return CommitResult(committed, identical, name)


def _check_manifest(folder: Path, identity: FragmentIdentity) -> None:
    """StoreError unless the folder still holds the store this writer was made for."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"{folder / MANIFEST}: unreadable ({e}): the store is gone or damaged") from None
    if not isinstance(data, dict) or data.get("store_id") != identity.store_id or \
            data.get("codec_sha256") != identity.codec_sha256:
        raise StoreError(f"{folder} now holds another store than the one this writer was opened for")


# ---------------------------------------------------------------------------- the write-task handle


_INDEXES: dict[tuple[str, FragmentIdentity], FragmentIndex] = {}  # per process: a reused worker indexes once


@dataclass(frozen=True)
class FragmentWriter:
    """A light, picklable handle that commits rows to a store: the store's path and identity, nothing else.

    What a Ray write task (or any worker) holds instead of a ContextStore: `commit(table)` checks the rows,
    writes one fragment and commits it under the store's lock. The id index it needs is built from the
    fragments' `id` columns once per process and kept up to date."""

    path: str
    identity: FragmentIdentity

    def commit(self, table: pa.Table) -> CommitResult:
        """Commit rows of the store's format (from `ContextStore.encode`); IdClashError for ids stored with other
        contents (the other rows are committed); ids stored with identical rows are skipped as written."""
        table = checked_rows(table, self.identity)
        folder = Path(self.path)
        key = (str(folder.resolve()), self.identity)
        index = _INDEXES.get(key)
        if index is None:
            if len(_INDEXES) >= 4:
                _INDEXES.clear()
            index = _INDEXES[key] = FragmentIndex(folder / DATA, self.identity)
        return commit(folder, self.identity, table, index)
