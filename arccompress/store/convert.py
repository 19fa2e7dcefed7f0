"""Stores of earlier arccompress versions, copied once into the current format.

arccompress 0.1 kept decoder vectors in safetensors shards listed by `index.jsonl`: they are read as contexts
and added to a new decoder-space store. arccompress 0.2 (store format 2) kept the current layout without row
checksums: its manifest, codec file and codes are copied as they are, each row gaining its checksum.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from safetensors import safe_open

from ..codec import parse_codec
from ..context import CompressedContext
from ..errors import StoreError
from .format import DATA, FIELDS, FORMAT, MANIFEST, METADATA_KEY, with_checksums
from .manifest import Manifest, read_json
from .states import check_new_folder


def convert(cls: Any, old: Path, new: Path, codec: str | None, kwargs: dict[str, Any]) -> Any:
    """ContextStore.convert: a new store at `new` holding what the old store at `old` holds."""
    if (old / "index.jsonl").exists():
        return _from_v1(cls, old, new, codec or "float16", kwargs)
    data = read_json(old)
    if data.get("version") != 2:
        raise StoreError(f"{old}: store format {data.get('version')!r}, not one of arccompress 0.1 or 0.2: "
                         "nothing to convert")
    return _from_v2(cls, old, new, data, codec, kwargs)


def _from_v1(cls: Any, old: Path, new: Path, codec: str, kwargs: dict[str, Any]) -> Any:
    if parse_codec(codec)[0] != "decoder":
        raise StoreError(f"a 0.1 store holds decoder vectors only: convert it with a decoder-space codec, "
                         f"not {codec!r} (or compress the texts again)")
    target = cls(new, codec=codec, **kwargs)
    if len(target):
        raise StoreError(f"{new} is not empty")
    for key, ctx in read_v1(old):
        target.add(key, ctx)
    target.close()
    return target


def read_v1(path: Path) -> Iterator[tuple[str, CompressedContext]]:
    """(id, context) of an arccompress 0.1 store, in index order."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        lines = (path / "index.jsonl").read_bytes().split(b"\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not a readable arccompress 0.1 store ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise StoreError(f"{path}: not an arccompress 0.1 store")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            shard = path / "shards" / entry["shard"]
            with safe_open(shard, framework="pt") as f:
                emb = f.get_tensor(entry["key"])
        except Exception as e:  # a line cut by a crash ends the usable index
            if n == len(lines):
                break
            raise StoreError(f"{path / 'index.jsonl'}:{n}: unreadable entry ({e})") from None
        meta = {k: "" if v is None else str(v) for k, v in (manifest | entry).items()}
        yield entry["id"], CompressedContext.from_metadata(emb, meta, f"{path}:{entry['id']}")


def _from_v2(cls: Any, old: Path, new: Path, data: dict[str, Any], codec: str | None, kwargs: dict[str, Any]) -> Any:
    source = Manifest.parse(old, data)
    if codec is not None and (f"{'-'.join(parse_codec(codec))}" != source.codec.name
                              or kwargs.get("bits_per_dim", source.codec.bits_per_dim) != source.codec.bits_per_dim):
        raise StoreError(f"{old} is copied with its own codec, {source.codec.label}: leave the codec out")
    kwargs = {k: v for k, v in kwargs.items() if k != "bits_per_dim"}
    check_new_folder(new)
    if (new / MANIFEST).exists():
        raise StoreError(f"{new} is not empty")
    Manifest.create(new, source.identity, source.codec, source.space, source.heads,
                    data["codec"].get("trained_on_vectors"))
    target = cls(new, **kwargs)
    seen: set[str] = set()
    files = sorted((f.stat().st_mtime_ns, f.name, f) for f in (old / DATA).glob("*.parquet")
                   if not f.name.startswith("."))
    for _, _, file in files:
        try:
            pf = pq.ParquetFile(file)
            found = json.loads((pf.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}"))
            table = pf.read()
        except Exception as e:
            raise StoreError(f"{file}: not a readable store fragment ({e})") from None
        if found.get("store_id") != data["store_id"]:
            raise StoreError(f"{file}: fragment of another store (store_id {found.get('store_id')!r})")
        if table.schema.names != list(FIELDS[:-1]):
            raise StoreError(f"{file}: columns {table.schema.names} are not a format-2 fragment's")
        keep = [key not in seen for key in table.column("id").to_pylist()]  # the first fragment read kept an id
        table = table.filter(keep)
        seen.update(table.column("id").to_pylist())
        if table.num_rows:
            target.append(with_checksums(table.replace_schema_metadata(None)))
    return target
