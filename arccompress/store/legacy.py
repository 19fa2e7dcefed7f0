"""Readers of the stores earlier arccompress versions wrote on local folders, for `convert` only.

    0.1 (format 1)   manifest.json, index.jsonl, shards/*.safetensors: decoder vectors, one tensor per context
    0.2 (format 2)   manifest.json, codec-<sha>.safetensors, data/part-<hash>.parquet: rows without checksums
    0.3 (format 3)   the same, each row with its xxh3-128 checksum, each fragment's footer naming its store

A format-2 or -3 id reads the row of the first fragment holding it, fragments taken by modification time and
then name (what those versions' index did): `rows` yields each fragment's rows in that order, each id once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors import safe_open

from ..context import CompressedContext
from ..errors import StoreError
from .format import CHECKED, FIELDS, FORMAT, METADATA_KEY, checksums, with_checksums
from .manifest import Manifest, read_codec_file

MANIFEST = "manifest.json"


def read_manifest(folder: Path) -> dict[str, Any]:
    """An older store's manifest.json, if it is an arccompress store manifest (of any format version)."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path}: not an arccompress store manifest")
    return data


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


def parse_manifest(folder: Path, data: dict[str, Any]) -> Manifest:
    """A format-2 or -3 store's manifest, with its codec file (checked against its SHA-256)."""

    def codec_file(d: dict[str, Any]) -> dict[str, Any]:
        name = d.get("codec_file")
        if name is None:
            return {}
        path = folder / str(name)
        if Path(str(name)).name != name or not path.is_file():
            raise StoreError(f"{folder / MANIFEST}: codec file {name!r} is missing")
        return read_codec_file(path.read_bytes(), d.get("codec_sha256"), str(path))

    return Manifest.parse(str(folder), data, codec_file)


def rows(folder: Path, data: dict[str, Any]) -> Iterator[tuple[Path, pa.Table]]:
    """(fragment, its rows with checksums) of a format-2 or -3 store, in its index's order, each id once: the first
    fragment holding it keeps it. StoreError naming a fragment that is unreadable, of another store, of other
    columns, or (format 3) holding a row that does not match its checksum."""
    version = data["version"]
    names = list(FIELDS) if version == 3 else list(FIELDS[:-1])
    files = sorted((f.stat().st_mtime_ns, f.name, f) for f in (folder / "data").glob("*.parquet")
                   if not f.name.startswith("."))
    seen: set[str] = set()
    for _, _, file in files:
        try:
            pf = pq.ParquetFile(file)
            found = json.loads((pf.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}"))
            table = pf.read()
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
            raise StoreError(f"{file}: not a readable store fragment ({e})") from None
        if found.get("store_id") != data["store_id"]:
            raise StoreError(f"{file}: fragment of another store (store_id {found.get('store_id')!r})")
        if table.schema.names != names:
            raise StoreError(f"{file}: columns {table.schema.names} are not a format-{version} fragment's")
        table = table.replace_schema_metadata(None)
        if version == 3:
            bad = [k for k, want, got in zip(table.column("id").to_pylist(), checksums(table.select(list(CHECKED))),
                                             table.column("checksum").to_pylist()) if want != got]
            if bad:
                raise StoreError(f"{file}: context {bad[0]!r} does not match its checksum (the file is damaged)")
        else:
            table = with_checksums(table)
        keep = pc.invert(pc.is_in(table.column("id"), value_set=pa.array(list(seen), pa.string())))
        table = table.filter(keep)
        seen.update(table.column("id").to_pylist())
        if table.num_rows:
            yield file, table
