"""Stores of earlier arccompress versions, copied once into the current format (a Lance dataset).

arccompress 0.1 kept decoder vectors: they are read as contexts and added to a new decoder-space store.
Formats 2 and 3 (arccompress 0.2 and 0.3) kept the current rows in Parquet files: the new store gets their
identity, codec and codec file, and their rows, codes unchanged (format 2's rows gain their checksums), one commit
per old file, each id holding the row the old store read. The new store's description says where it came from and
whether the conversion finished (set by a last commit): a stopped one says so on open and in `verify`, and
converting again finishes it (rows already there count as written).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .codec import parse_codec
from ..errors import StoreError
from .legacy import parse_manifest, read_manifest, read_v1, rows
from .location import LANCE_ERRORS, Location
from .manifest import CONVERTED_FROM, Manifest, unfinished
from .states import OpenStore, check_new_folder, create_store, store_exists
from .table import StoreDamageWarning
from .writer import checked_rows


def convert(cls: Any, old: Path, new: Location, codec: str | None, kwargs: dict[str, Any]) -> Any:
    """ContextStore.convert: a new store at `new` holding what the old store at `old` holds."""
    if (old / "index.jsonl").exists():
        return _from_v1(cls, old, new, codec or "float16", kwargs)
    if not old.is_dir():
        raise StoreError(f"{old}: no such store folder")
    data = read_manifest(old)
    if data.get("version") not in (2, 3):
        raise StoreError(f"{old}: store format {data.get('version')!r}, not one of arccompress 0.1 to 0.3: nothing "
                         "to convert")
    return _from_parquet(cls, old, new, data, codec, kwargs)


def _check_target(new: Location) -> None:
    if store_exists(new):
        raise StoreError(f"{new} already holds a store: convert into a new one")
    check_new_folder(new)


def _from_v1(cls: Any, old: Path, new: Location, codec: str, kwargs: dict[str, Any]) -> Any:
    if parse_codec(codec)[0] != "decoder":
        raise StoreError(f"a 0.1 store holds decoder vectors only: convert it with a decoder-space codec, "
                         f"not {codec!r} (or compress the texts again)")
    _check_target(new)
    target = cls(new, codec=codec, **kwargs)
    for key, ctx in read_v1(old):
        target.add(key, ctx)
    target.close()
    return target


def _from_parquet(cls: Any, old: Path, new: Location, data: dict[str, Any], codec: str | None,
                  kwargs: dict[str, Any]) -> Any:
    source = parse_manifest(old, data)
    if codec is not None and ("-".join(parse_codec(codec)) != source.codec.name
                              or kwargs.get("bits_per_dim", source.codec.bits_per_dim) != source.codec.bits_per_dim):
        raise StoreError(f"{old} is copied with its own codec, {source.codec.label}: leave the codec out")
    kwargs = {k: v for k, v in kwargs.items() if k != "bits_per_dim"}
    store = _resumed(new, old) or _started(new, old, source, data)
    for _, table in rows(old, data):  # resumed: rows committed before count as written (identical)
        store.commit(checked_rows(table, store.rules))
    description = store.manifest | {CONVERTED_FROM: {"store": str(old), "complete": True}}
    try:
        store.table.ds.update_schema_metadata(Manifest.of_data(description))
    except LANCE_ERRORS as e:
        raise new.error("mark the conversion complete", e) from None
    return cls(new.uri, storage_options=new.storage_options, **kwargs)


def _started(new: Location, old: Path, source: Manifest, data: dict[str, Any]) -> OpenStore:
    """The new store, marked as a conversion of `old` not complete yet (until its last commit)."""
    _check_target(new)
    manifest, blob = Manifest.describe(source.identity, source.codec, source.space, source.heads,
                                       data["codec"].get("trained_on_vectors"))
    manifest.data[CONVERTED_FROM] = {"store": str(old), "complete": False}
    try:
        return create_store(new, manifest, blob, None, None)
    except FileExistsError:
        raise StoreError(f"{new} was created meanwhile by another writer: convert into a new store") from None


def _resumed(new: Location, old: Path) -> OpenStore | None:
    """The store a conversion of `old` into `new` left part-way, to finish (None if there is none)."""
    if not store_exists(new):
        return None
    with warnings.catch_warnings():  # that it is unfinished is why we are here
        warnings.simplefilter("ignore", StoreDamageWarning)
        store = OpenStore.open(new, None, None, None, None, None)
    if unfinished(store.manifest) != str(old):
        raise StoreError(f"{new} already holds a store: convert into a new one")
    return store
