"""Stores of earlier arccompress versions, copied once into the current format (a Lance dataset).

arccompress 0.1 kept decoder vectors: they are read as contexts and added to a new decoder-space store.
Formats 2 and 3 (arccompress 0.2 and 0.3) kept the current rows in Parquet files: the new store gets their
identity, codec and codec file, and their rows, codes unchanged (format 2's rows gain their checksums), one commit
per old file, each id holding the row the old store read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .codec import parse_codec
from ..errors import StoreError
from .legacy import parse_manifest, read_manifest, read_v1, rows
from .location import Location
from .manifest import Manifest
from .states import check_new_folder, create_store, store_exists
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
    _check_target(new)
    manifest, blob = Manifest.describe(source.identity, source.codec, source.space, source.heads,
                                       data["codec"].get("trained_on_vectors"))
    try:
        store = create_store(new, manifest, blob, None, None)
    except FileExistsError:
        raise StoreError(f"{new} was created meanwhile by another writer: convert into a new store") from None
    for _, table in rows(old, data):
        store.commit(checked_rows(table, store.rules))
    return cls(new.uri, storage_options=new.storage_options, **kwargs)
