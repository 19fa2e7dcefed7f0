"""Stores of earlier versions: refused with one line naming `arccompress convert`, and converted once, each id
reading what it read before. The format-3 store in tests/data/format3 was made by arccompress at commit aacab70
(tests/data/format3/make_format3.py); formats 2 and 1 are derived from it or written here as those versions wrote
them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from arccompress import CompressedContext, ContextStore, StoreError
from arccompress.store.format import METADATA_KEY, with_checksums

FORMAT3 = Path(__file__).parent / "data" / "format3"


@pytest.fixture
def old(tmp_path) -> Path:
    """A copy of the format-3 store (conversion must not need to write to it)."""
    shutil.copytree(FORMAT3 / "store", tmp_path / "old")
    return tmp_path / "old"


def expected() -> tuple[dict[str, torch.Tensor], dict[str, str], list[int]]:
    """What the format-3 store read when it was made: decoder inputs per id, the texts, the token counts."""
    with safe_open(FORMAT3 / "expected.safetensors", framework="pt") as f:
        meta = f.metadata()
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["texts"]), json.loads(meta["num_tokens"])


def check_converted(new: ContextStore) -> None:
    embeddings, texts, tokens = expected()
    ids = list(texts)
    assert sorted(new) == sorted(ids) and new.codec.name == "bottleneck-int8" and new.stats()["duplicates"] == 0
    got = new.get_many(ids)
    for key, ctx, n in zip(ids, got, tokens):
        assert torch.equal(ctx.embeddings, embeddings[key]) and ctx.num_tokens == n, key
    assert new.find_texts([texts["doc-4"], texts["quote'id"], "not stored"]) == ["doc-4", "quote'id", None]


def test_a_format_3_store_is_refused_then_converted(old, tmp_path):
    with pytest.raises(StoreError, match=r"arccompress 0.3 \(format 3, Parquet files\): convert it once with "
                                         r"`arccompress convert"):
        ContextStore(old)
    assert ContextStore.exists(old)
    new = ContextStore.convert(old, tmp_path / "new")
    check_converted(new)
    old_rows = pa.concat_tables([pq.read_table(f).replace_schema_metadata(None) for f in (old / "data").iterdir()])
    new_rows = new.dataset().to_table(columns=old_rows.column_names)
    assert new_rows.sort_by("id").equals(old_rows.sort_by("id"))  # codes and checksums copied as they are
    assert json.loads((old / "manifest.json").read_text())["codec_sha256"] == new.manifest["codec_sha256"]
    with pytest.raises(StoreError, match="already holds a store"):
        ContextStore.convert(old, tmp_path / "new")
    with pytest.raises(StoreError, match="its own codec, bottleneck-int8"):
        ContextStore.convert(old, tmp_path / "other", codec="float16")


def test_conversion_from_the_command_line(old, tmp_path):
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "convert", str(old), str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "contexts" in out.stdout and "bottleneck-int8" in out.stdout
    check_converted(ContextStore(tmp_path / "cli"))
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "info", str(old)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "arccompress convert" in out.stderr and "Traceback" not in out.stderr


def test_format_3_damage_and_repeated_ids_are_kept_as_format_3_read_them(old, tmp_path):
    """A row that fails its checksum stops the conversion, naming its file and id; an id repeated in a later file
    (by mtime, as format 3 indexed them) converts to the row format 3 read: the first."""
    first = sorted(old.glob("data/*.parquet"))[0]
    table = pq.read_table(first)
    key = table.column("id")[0].as_py()
    rogue = with_checksums(table.slice(0, 1).replace_schema_metadata(None).set_column(
        6, "codes", pa.array([bytes(len(table.column("codes")[0].as_py()))], pa.binary())))
    later = old / "data" / "part-ffffffffffffffffffffffffffffffff.parquet"
    pq.write_table(rogue.replace_schema_metadata(table.schema.metadata), later)
    newest = max(f.stat().st_mtime_ns for f in (old / "data").iterdir())
    os.utime(later, ns=(newest + 10**9,) * 2)
    check_converted(ContextStore.convert(old, tmp_path / "new"))
    codes = table.column("codes").to_pylist()
    codes[1] = codes[1][:-1] + bytes([codes[1][-1] ^ 1])  # a flipped bit, the old checksum kept
    pq.write_table(table.set_column(6, "codes", pa.array(codes, pa.binary())), first)
    with pytest.raises(StoreError, match=f"{first.name}: context {table.column('id')[1].as_py()!r} does not match"):
        ContextStore.convert(old, tmp_path / "again")
    assert key in ContextStore(tmp_path / "new")


def test_a_stopped_conversion_says_so_and_converting_again_finishes_it(old, tmp_path, monkeypatch):
    """Red team r05, p91: a conversion that stopped (a damaged old file, a kill) left a store that opened, verified
    OK and showed as a normal store; converting again was refused. Now it is marked incomplete on open, in verify
    and in `arccompress info`, and converting again finishes it."""
    from arccompress.store import StoreDamageWarning, legacy

    convert = sys.modules["arccompress.store.convert"]  # the module (the package's `convert` is its function)
    real = legacy.rows

    def stops(folder, data):  # the conversion dies after the first old file
        for i, item in enumerate(real(folder, data)):
            if i == 1:
                raise StoreError("killed")
            yield item

    monkeypatch.setattr(convert, "rows", stops)
    with pytest.raises(StoreError, match="killed"):
        ContextStore.convert(old, tmp_path / "new")
    with pytest.warns(StoreDamageWarning, match="stopped part-way .* run `arccompress convert"):
        partial = ContextStore(tmp_path / "new")
    assert partial.verify().conversion is not None and not partial.verify().ok
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "info", str(tmp_path / "new")],
                         capture_output=True, text=True, timeout=300)
    assert "INCOMPLETE" in out.stdout and "stopped part-way" in out.stdout, out.stderr
    monkeypatch.setattr(convert, "rows", real)
    check_converted(ContextStore.convert(old, tmp_path / "new"))
    assert ContextStore(tmp_path / "new").verify().ok
    with pytest.raises(StoreError, match="already holds a store"):
        ContextStore.convert(old, tmp_path / "new")


def test_a_format_2_store_gains_checksums(old, tmp_path):
    """arccompress 0.2 wrote format 3's files without the checksum column."""
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(manifest | {"version": 2}))
    for fragment in old.glob("data/*.parquet"):
        table = pq.read_table(fragment)
        pq.write_table(table.drop_columns(["checksum"]).replace_schema_metadata(table.schema.metadata), fragment)
    with pytest.raises(StoreError, match=r"arccompress 0.2 \(format 2, without checksums\): convert it once"):
        ContextStore(old)
    check_converted(ContextStore.convert(old, tmp_path / "new"))


def test_v1_stores_are_converted(tmp_path):
    """A store of arccompress 0.1 (safetensors shards + index.jsonl) is refused with advice, and converted once."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    contexts = [CompressedContext(torch.randn(3, 64, generator=g), 24, "enc", 0, 8, encoder_fingerprint="w")
                for _ in range(3)]
    old = tmp_path / "old"
    (old / "shards").mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({
        "format": "arccompress-store", "version": 1, "dtype": "float32", "encoder": "enc",
        "encoder_fingerprint": "w", "decoder_index": 0, "hidden_size": 64, "pooling_factor": 8}))
    save_file({f"c{i}": c.embeddings for i, c in enumerate(contexts)}, old / "shards" / "00000.safetensors")
    index = [{"id": f"k{i}", "shard": "00000.safetensors", "key": f"c{i}", "num_tokens": c.num_tokens,
              "num_embeddings": c.num_embeddings, "chunk_size": None} for i, c in enumerate(contexts)]
    (old / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in index) + '{"id": "cut')
    with pytest.raises(StoreError, match="arccompress 0.1 store: convert it once with `arccompress convert"):
        ContextStore(old)
    new = ContextStore.convert(old, tmp_path / "new", codec="float32")
    assert list(new) == ["k0", "k1", "k2"]
    for i, c in enumerate(contexts):
        assert torch.equal(new[f"k{i}"].embeddings, c.embeddings) and new[f"k{i}"].encoder_fingerprint == "w"
    with pytest.raises(StoreError, match="decoder-space codec"):
        ContextStore.convert(old, tmp_path / "pq", codec="pq")


def test_a_parquet_file_of_another_store_is_refused(old, tmp_path):
    fragment = next(old.glob("data/*.parquet"))
    table = pq.read_table(fragment)
    meta = json.loads(table.schema.metadata[METADATA_KEY]) | {"store_id": "another"}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), fragment)
    with pytest.raises(StoreError, match=f"{fragment.name}: fragment of another store"):
        ContextStore.convert(old, tmp_path / "new")
