"""The store's commit protocol and checksums, in one process: names, clashes, retries, damage, older formats.

Two ContextStore objects on one folder are two writers (each commit takes the store's lock through its own
file descriptor, as separate processes do); tests/test_store_processes.py races real processes.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from arccompress import CompressedContext, Compressor, ContextStore, StoreError
from arccompress.store import CommitResult, FragmentWriter, IdClashError
from arccompress.store.format import METADATA_KEY, fragment_name, with_checksums

WIDTH = 64


@pytest.fixture(scope="module")
def comp(tiny_dir) -> Compressor:
    return Compressor.from_pretrained(tiny_dir / "hub")


def ctx(seed: int, text: str | None = None, rows: int = 3) -> CompressedContext:
    g = torch.Generator().manual_seed(seed)
    return CompressedContext(torch.randn(rows, WIDTH, generator=g), 8 * rows, "enc", 0, 8,
                             text=f"text {seed}" if text is None else text, encoder_fingerprint="weights")


def new_store(path, **kwargs) -> ContextStore:
    """A decoder-space store (no compressor needed), created."""
    with ContextStore(path, codec="float32", **kwargs) as store:
        store.add("seed", ctx(0))
    return ContextStore(path)


def fragments(path) -> list:
    return sorted((path / "data").glob("part-*.parquet"))


# ----------------------------------------------------------------------------- names


def test_fragment_names_cannot_collide(tmp_path):
    """ids holding NUL: ["a\\0b"] and ["a", "b"] joined with NUL gave one name, and the second flush replaced
    the first fragment."""
    assert fragment_name(pa.array(["a\0b"])) != fragment_name(pa.array(["a", "b"]))
    assert fragment_name(pa.array(["ab", ""])) != fragment_name(pa.array(["a", "b"]))
    assert fragment_name(pa.array(["a", "b"])) == fragment_name(pa.chunked_array([["a"], ["b"]], pa.large_string()))
    store = ContextStore(tmp_path / "s", codec="float32")
    store.add("a\0b", ctx(1))
    store.flush()
    store.add_many(["a", "b"], [ctx(2), ctx(3)])
    store.close()
    back = ContextStore(tmp_path / "s")
    assert sorted(back) == ["a", "a\0b", "b"] and len(fragments(tmp_path / "s")) == 2
    for key, seed in (("a\0b", 1), ("a", 2), ("b", 3)):
        assert torch.equal(back[key].embeddings, ctx(seed).embeddings)


# ----------------------------------------------------------------------------- two writers, one id


def test_second_writer_of_the_same_ids_never_replaces(tmp_path):
    path = tmp_path / "s"
    first, second = new_store(path), ContextStore(path)
    ids = ["x", "y", "z"]
    first.add_many(ids, [ctx(1), ctx(2), ctx(3)])
    second.add_many(ids, [ctx(4), ctx(5), ctx(6)])  # queued before the first commits: the commit decides
    first.flush()
    committed = {f: (f.read_bytes(), f.stat().st_ino) for f in fragments(path)}
    with pytest.raises(IdClashError, match="'x', 'y', 'z'") as e:
        second.flush()
    assert (e.value.ids, e.value.committed, e.value.same_text) == (ids, [], [])
    assert {f: (f.read_bytes(), f.stat().st_ino) for f in fragments(path)} == committed
    assert not list((path / "data").glob(".tmp-*"))
    back = ContextStore(path)
    assert [torch.equal(back[k].embeddings, ctx(s).embeddings) for k, s in zip(ids, (1, 2, 3))] == [True] * 3
    # the same rows again (a retried task) count as written
    third = ContextStore(path)
    third.add_many(["w"], [ctx(7)])
    result = third.append(third.encode(ids, [ctx(1), ctx(2), ctx(3)]))
    assert result == CommitResult([], ids, None)
    third.close()
    assert sorted(ContextStore(path)) == ["seed", "w", "x", "y", "z"]


def test_overlapping_batches_store_each_id_once_and_the_loser_goes_on(tmp_path):
    path = tmp_path / "s"
    a, b = new_store(path, flush_every=100), ContextStore(path, flush_every=100)
    a.add_many(["p", "q", "r"], [ctx(1), ctx(2), ctx(3, text="shared text")])
    b.add_many(["r", "s", "t"], [ctx(4, text="shared text"), ctx(5), ctx(6)])
    a.flush()
    with pytest.raises(IdClashError, match="'r'.*same text.*2 other contexts were committed") as e:
        b.flush()
    assert (e.value.ids, e.value.same_text, e.value.committed) == (["r"], ["r"], ["s", "t"])
    assert len(b) == 6 and "r" in b  # the refused id left b's queue; the store holds a's
    b.add("u", ctx(7))  # later flushes work
    b.close()
    back = ContextStore(path)
    assert sorted(back) == ["p", "q", "r", "s", "seed", "t", "u"] and back.stats()["duplicates"] == 0
    assert torch.equal(back["r"].embeddings, ctx(3).embeddings) and torch.equal(back["s"].embeddings, ctx(5).embeddings)


def test_a_clash_inside_add_many_keeps_the_rest_queued(tmp_path):
    path = tmp_path / "s"
    a, b = new_store(path, flush_every=3), ContextStore(path, flush_every=3)
    b.add_many(["k1", "k2"], [ctx(1), ctx(2)])
    a.add("k2", ctx(9))
    a.flush()
    with pytest.raises(IdClashError) as e:  # b's queue reaches flush_every with k3: its commit meets a's k2
        b.add_many(["k3", "k4", "k5", "k6"], [ctx(3), ctx(4), ctx(5), ctx(6)])
    assert e.value.ids == ["k2"] and e.value.committed == ["k1", "k3"]
    assert sorted(b) == ["k1", "k2", "k3", "k4", "k5", "k6", "seed"]  # k4-k6 wait in b's queue
    b.close()
    assert sorted(ContextStore(path)) == ["k1", "k2", "k3", "k4", "k5", "k6", "seed"]
    assert torch.equal(ContextStore(path)["k2"].embeddings, ctx(9).embeddings)


def test_adding_an_id_another_writer_stored_is_refused_before_queueing(tmp_path):
    path = tmp_path / "s"
    a, b = new_store(path), ContextStore(path)
    a.add("m", ctx(1))
    a.flush()
    with pytest.raises(IdClashError, match="already in the store.*'m'.*nothing was queued"):
        b.add_many(["n", "m"], [ctx(2), ctx(3)])
    assert "n" not in b


def test_append_refuses_other_rows_for_stored_ids(tmp_path):
    path = tmp_path / "s"
    store = new_store(path)
    store.append(store.encode(["a", "b"], [ctx(1), ctx(2)]))
    with pytest.raises(IdClashError, match="'b'") as e:
        store.append(store.encode(["b", "c"], [ctx(3), ctx(4)]))
    assert e.value.committed == ["c"]
    result = store.append(store.encode(["a", "d"], [ctx(1), ctx(5)]))  # "a": the same row, a retried task
    assert result.committed == ["d"] and result.identical == ["a"] and result.fragment.startswith("part-")
    back = ContextStore(path)
    assert sorted(back) == ["a", "b", "c", "d", "seed"]
    assert torch.equal(back["b"].embeddings, ctx(2).embeddings)
    rows = store.encode(["e"], [ctx(6)])
    codes = rows.column("codes").to_pylist()
    bad = rows.set_column(6, "codes", pa.array([codes[0][:-1] + bytes([codes[0][-1] ^ 1])], pa.binary()))
    with pytest.raises(StoreError, match="row 'e': its checksum"):
        store.append(bad)
    with pytest.raises(StoreError, match="columns"):
        store.append(rows.drop_columns(["checksum"]))
    with pytest.raises(StoreError, match="ids given twice: 'e'"):
        store.append(pa.concat_tables([rows, rows]))


def test_fragment_writer_is_a_light_picklable_handle(tmp_path):
    path = tmp_path / "s"
    store = new_store(path)
    writer = store.fragment_writer()
    assert set(vars(writer)) == {"path", "identity"} and len(pickle.dumps(writer)) < 1000
    copy = pickle.loads(pickle.dumps(writer))
    assert copy.commit(store.encode(["f1", "f2"], [ctx(1), ctx(2)])).committed == ["f1", "f2"]
    with pytest.raises(IdClashError) as e:
        copy.commit(store.encode(["f2", "f3"], [ctx(9), ctx(3)]))
    assert e.value.ids == ["f2"] and e.value.committed == ["f3"]
    back = pickle.loads(pickle.dumps(e.value))  # as a Ray task's error reaches the driver
    assert (str(back), back.ids, back.committed, back.same_text) == (str(e.value), ["f2"], ["f3"], [])
    assert copy.commit(store.encode(["f3"], [ctx(3)])).identical == ["f3"]
    assert sorted(ContextStore(path)) == ["f1", "f2", "f3", "seed"]
    ContextStore(tmp_path / "other", codec="float32").add("z", ctx(0))
    with pytest.raises(StoreError, match="no manifest yet"):
        ContextStore(tmp_path / "new", codec="float32").fragment_writer()


# ----------------------------------------------------------------------------- damage


def flip(path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_codes_names_the_file_and_id(tmp_path):
    path = tmp_path / "s"
    with ContextStore(path, codec="float32", flush_every=100) as store:
        store.add_many([f"id-{i}" for i in range(40)], [ctx(i) for i in range(40)])
    fragment = fragments(path)[0]
    code = ctx(33).embeddings.numpy().tobytes()
    flip(fragment, fragment.read_bytes().index(code) + 100, 3)
    store = ContextStore(path)
    assert len(store) == 40  # ids and footer intact: the store opens
    assert torch.equal(store["id-1"].embeddings, ctx(1).embeddings)  # another row group reads fine
    with pytest.raises(StoreError, match=f"{fragment.name}: context 'id-33' does not match its checksum"):
        store.get_many(["id-1", "id-33"])


def test_a_flipped_bit_in_the_ids_is_caught_at_open(tmp_path):
    path = tmp_path / "s"
    with ContextStore(path, codec="float32", flush_every=100) as store:
        store.add_many([f"id-{i}" for i in range(40)], [ctx(i) for i in range(40)])
    fragment = fragments(path)[0]
    column = pq.ParquetFile(fragment).metadata.row_group(0).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    for offset in range(start + column.total_compressed_size - 12, start + column.total_compressed_size - 4):
        original = fragment.read_bytes()
        flip(fragment, offset, 5)
        with pytest.raises(StoreError, match=fragment.name):
            len(ContextStore(path))
        fragment.write_bytes(original)


def test_a_flipped_bit_in_a_footer_is_refused_or_harmless(tmp_path):
    path = tmp_path / "s"
    keys = [f"id-{i}" for i in range(40)]
    with ContextStore(path, codec="float16", flush_every=100) as store:
        store.add_many(keys, [ctx(i) for i in range(40)])
    fragment = fragments(path)[0]
    original = fragment.read_bytes()
    footer = len(original) - 8 - struct.unpack("<I", original[-8:-4])[0]
    flip(fragment, original.index(b'"store_id": "', footer) + 14)  # the fragment's record of its store
    with pytest.raises(StoreError, match=f"{fragment.name}: fragment of another store"):
        len(ContextStore(path))
    fragment.write_bytes(original)
    expected = [c.embeddings for c in ContextStore(path).get_many(keys)]
    for offset in range(footer, len(original) - 8, 23):  # a sample of the footer: refused, or nothing changed
        flip(fragment, offset, offset % 8)
        try:
            got = [c.embeddings for c in ContextStore(path).get_many(keys)]
        except StoreError as e:
            assert fragment.name in str(e)
        else:
            assert all(torch.equal(g, x) for g, x in zip(got, expected)), offset
        fragment.write_bytes(original)


def test_a_manifest_edited_to_another_codec_is_refused(comp, tmp_path):
    path = tmp_path / "s"
    with ContextStore(path, compressor=comp) as store:  # bottleneck-float16
        store.add_many(["a", "b"], comp.compress(["first text", "second text"]))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["codec"] |= {"name": "bottleneck-bfloat16", "quantizer": "bfloat16"}  # same size: the codes fit
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=f"{fragments(path)[0].name}: written with codec 'bottleneck-float16', "
                                         "but the manifest says 'bottleneck-bfloat16'"):
        len(ContextStore(path))


# ----------------------------------------------------------------------------- the write path


def test_stores_keep_the_vectors_the_compressor_made(comp, tmp_path):
    """A bottleneck store keeps ctx.bottleneck as made on the compressor's device (no host matmul from pooled);
    from `pooled` alone the head computes it; without either the context is refused."""
    made = comp.compress(["some text to keep", "another text"])
    poisoned = [c.to() for c in made]
    for c in poisoned:
        c.pooled = torch.full_like(c.pooled, 1e4)  # never read when the bottleneck is there
    pooled_only = [c.to() for c in made]
    for c in pooled_only:
        c.bottleneck = None
    with ContextStore(tmp_path / "s", compressor=comp, codec="bottleneck-float32") as store:
        store.add_many(["a", "b"], poisoned)
        store.add_many(["c", "d"], pooled_only)
        with pytest.raises(StoreError, match="context 'e': this store keeps bottleneck vectors"):
            store.add("e", CompressedContext(made[0].embeddings, 5, comp.name, 0, 8,
                                             encoder_fingerprint=comp.fingerprint))
    back = ContextStore(tmp_path / "s").get_many(["a", "b", "c", "d"])
    for got, want in zip(back, made + made):
        assert (got.embeddings - want.embeddings).abs().max() <= 1e-5
    big = made[0].to()
    big.bottleneck = big.bottleneck.bfloat16() * 1e6
    with pytest.raises(ValueError, match="context 'big': bottleneck vectors: values up to .* do not fit in float16"):
        ContextStore(tmp_path / "h", compressor=comp).add("big", big)


# ----------------------------------------------------------------------------- stores of arccompress 0.2


def test_format_2_stores_are_refused_and_converted(comp, tmp_path):
    old = tmp_path / "old"
    texts = [f"text number {i}" for i in range(5)]
    made = comp.compress(texts)
    with ContextStore(old, compressor=comp, codec="int8", flush_every=3) as store:
        store.add_many([f"k{i}" for i in range(5)], made)
    expected = [c.embeddings for c in ContextStore(old).get_many([f"k{i}" for i in range(5)])]
    manifest = json.loads((old / "manifest.json").read_text())  # rewrite it as arccompress 0.2 wrote it
    (old / "manifest.json").write_text(json.dumps(manifest | {"version": 2}))
    for fragment in fragments(old):
        table = pq.read_table(fragment).drop_columns(["checksum"])
        ident = {"store_id": manifest["store_id"], "codec": "bottleneck-int8", "encoder_fingerprint": comp.fingerprint}
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(ident).encode()}), fragment)
    with pytest.raises(StoreError, match="arccompress 0.2 .*`arccompress convert"):
        ContextStore(old)
    with pytest.raises(StoreError, match="its own codec, bottleneck-int8"):
        ContextStore.convert(old, tmp_path / "bad", codec="float16")
    new = ContextStore.convert(old, tmp_path / "new")
    assert new.codec.name == "bottleneck-int8" and sorted(new) == [f"k{i}" for i in range(5)]
    got = ContextStore(tmp_path / "new", compressor=comp).get_many([f"k{i}" for i in range(5)])
    assert all(torch.equal(g.embeddings, e) for g, e in zip(got, expected))
    assert with_checksums(pq.read_table(fragments(tmp_path / "new")[0])).equals(
        pq.read_table(fragments(tmp_path / "new")[0]).replace_schema_metadata(None))
    assert isinstance(new.fragment_writer(), FragmentWriter)
    # from the command line too, with no codec given: the 0.2 store keeps its own
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "convert", str(old), str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(ContextStore(tmp_path / "cli")) == [f"k{i}" for i in range(5)]


def test_ids_repeated_by_a_writer_ignoring_the_lock(tmp_path):
    """A fragment made outside the protocol (copied in, an old writer) that repeats a stored id: the first
    fragment indexed keeps it, and the repeat is counted; a fragment holding an id twice is refused by name."""

    from arccompress.store.format import write_fragment

    path = tmp_path / "s"
    store = new_store(path)
    store.append(store.encode(["a", "b"], [ctx(1), ctx(2)]))
    first = fragments(path)
    rows = store.encode(["b", "c"], [ctx(3), ctx(4)])
    rogue = path / "data" / fragment_name(rows.column("id"))
    write_fragment(rows, rogue, store.fragment_writer().identity)
    os.utime(rogue, ns=(first[-1].stat().st_mtime_ns + 10**9,) * 2)  # committed after the others
    back = ContextStore(path)
    assert sorted(back) == ["a", "b", "c", "seed"] and back.stats()["duplicates"] == 1
    assert torch.equal(back["b"].embeddings, ctx(2).embeddings) and torch.equal(back["c"].embeddings, ctx(4).embeddings)
    twice = pa.concat_tables([store.encode(["d"], [ctx(5)])] * 2)
    bad = path / "data" / fragment_name(twice.column("id"))
    write_fragment(twice, bad, store.fragment_writer().identity)
    for _ in range(2):  # every look names it, and the rest of the index stays as it was
        with pytest.raises(StoreError, match=f"{bad.name}: an id appears twice"):
            len(back)
        assert torch.equal(back["c"].embeddings, ctx(4).embeddings)
