"""Saved contexts and the ContextStore: codecs, identity checks, crashes, concurrent writers, tampering."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import numpy as np
import torch

from arccompress import CompressedContext, Compressor, ContextStore, Generator, InputError, StoreError
from arccompress.store.codec import Codec, CodecError, parse_codec
from arccompress.store import row_schema

TEXTS = {f"doc-{i}": f"Document number {i} says something about topic {i * 7}. " * (i % 9 + 1) for i in range(60)}


@pytest.fixture(scope="module")
def comp(tiny_dir) -> Compressor:
    return Compressor.from_pretrained(tiny_dir / "hub")


@pytest.fixture(scope="module")
def contexts(comp) -> list[CompressedContext]:
    return comp.compress(list(TEXTS.values()))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- single contexts


def test_context_save_load_round_trip(comp, tmp_path):
    ctx = comp.compress(TEXTS["doc-3"], chunk_size=16)
    ctx.save(tmp_path / "c.safetensors")
    back = CompressedContext.load(tmp_path / "c.safetensors")
    assert back == CompressedContext.load(tmp_path / "c.safetensors") and back.text is None
    assert torch.equal(back.embeddings, ctx.embeddings) and len(back) == ctx.num_embeddings
    for field in ("num_tokens", "encoder", "head", "pooling_factor", "chunk_size", "encoder_fingerprint"):
        assert getattr(back, field) == getattr(ctx, field)
    ctx.save(tmp_path / "t.safetensors", include_text=True, dtype=torch.float16)
    half = CompressedContext.load(tmp_path / "t.safetensors")
    assert half.text == ctx.text and half.dtype == torch.float16
    assert torch.equal(half.embeddings, ctx.embeddings.half())
    assert CompressedContext.load(tmp_path / "t.safetensors", dtype=torch.float32).dtype == torch.float32
    with pytest.raises(FileNotFoundError):
        CompressedContext.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        CompressedContext.load(tmp_path / "bad.safetensors")


def test_context_equality_and_length(comp):
    a, b = comp.compress("same text"), comp.compress("same text")
    assert a == b and a is not b and len(a) == a.num_embeddings
    assert a != comp.compress("other text") and a != a.to(dtype=torch.float16)
    with pytest.raises(TypeError):
        hash(a)


def test_context_files_are_checked(comp, tmp_path):
    from safetensors.torch import save_file

    ctx = comp.compress("a text")
    meta = ctx.metadata()
    cases = {
        "no-tokens": ({"embeddings": ctx.embeddings}, {k: v for k, v in meta.items() if k != "num_tokens"}, "num_tokens"),
        "one-d": ({"embeddings": ctx.embeddings[0]}, meta, "non-empty"),
        "empty": ({"embeddings": ctx.embeddings[:0]}, meta, "non-empty"),
        "nan": ({"embeddings": torch.full_like(ctx.embeddings, float("nan"))}, meta, "NaN"),
        "ints": ({"embeddings": ctx.embeddings.to(torch.int32)}, meta, "floating point"),
        "no-tensor": ({"other": ctx.embeddings}, meta, "no 'embeddings'"),
        "bad-number": ({"embeddings": ctx.embeddings}, meta | {"num_tokens": "many"}, "bad metadata"),
    }
    for name, (tensors, m, message) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors", metadata=m)
        with pytest.raises(ValueError, match=message):
            CompressedContext.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ctx.save(tmp_path / "no" / "such" / "dir" / "c.safetensors")
    big = ctx.to()
    big.embeddings = big.embeddings * 1e6
    with pytest.raises(ValueError, match="float16"):
        big.save(tmp_path / "big.safetensors", dtype=torch.float16)
    assert not (tmp_path / "big.safetensors").exists()


# ----------------------------------------------------------------------------- codecs


def test_codec_names_and_sizes():
    assert parse_codec("float16") == ("decoder", "float16")
    assert parse_codec("pq") == ("bottleneck", "pq") and parse_codec("int8") == ("bottleneck", "int8")
    assert parse_codec("encoder-float16") == ("encoder", "float16")
    with pytest.raises(CodecError, match="unknown codec 'float8'"):
        parse_codec("float8")
    with pytest.raises(CodecError) as e:
        parse_codec("fp16")
    assert str(e.value) == (
        "unknown codec 'fp16': choose float32, float16, bfloat16, bottleneck-float16 (the default), int8, pq or "
        "encoder-float16 (a codec is an optional space, decoder, bottleneck or encoder, then a quantizer: e.g. "
        "bottleneck-int8); did you mean 'float16'?")
    assert Codec("bottleneck", "pq", 2048, 1.0).bytes_per_vector == 256  # the released bottleneck at 1 bit/dim
    assert Codec("bottleneck", "pq", 2048, 0.5).bytes_per_vector == 128
    assert Codec("bottleneck", "int8", 2048).bytes_per_vector == 2052
    with pytest.raises(CodecError, match="possible"):
        Codec("bottleneck", "pq", 48, 0.3)
    with pytest.raises(CodecError, match="pq codec only"):
        Codec("decoder", "float16", 64, 1.0)


def test_int8_codes_are_computed_where_the_vectors_are_and_leave_them_alone():
    """int8 scales and rounds with torch (on a GPU, on the device): the same bytes as the rule written in numpy
    (a float32 scale per vector, max |x| / 127; a zero vector's scale 1), for bfloat16 and float32 input."""
    torch.manual_seed(0)
    x = torch.randn(300, 64) * torch.rand(300, 1) * 10
    x[5] = 0
    codec = Codec("bottleneck", "int8", 64)
    for vectors in (x, x.bfloat16(), x * 1e-30):
        before = vectors.clone()
        values = vectors.float().numpy()
        scale = np.abs(values).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        codes = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
        expected = np.concatenate([codes.view(np.uint8), scale.astype("<f4").view(np.uint8)], axis=1)
        assert np.array_equal(codec.encode(vectors), expected)
        assert torch.equal(vectors, before)  # worked on a copy


def test_pq_decodes_what_faiss_decodes():
    """The pq lookup (a row of the flattened codebook per sub-quantizer) gives faiss's own reconstruction."""
    torch.manual_seed(0)
    codec = Codec("bottleneck", "pq", 64, 2.0)  # 16 sub-quantizers of 4 dimensions
    codec.train(torch.randn(2000, 64))
    x = torch.randn(37, 64)
    codes = codec.encode(x)
    expected = codec._quantizer().decode(codes)  # faiss's ProductQuantizer with the same centroids
    assert np.array_equal(codec.decode(codes).numpy(), expected)


EXACT_CODECS = ["float32", "bottleneck-float32", "encoder-float32"]


@pytest.mark.parametrize("codec", EXACT_CODECS + ["float16", "bfloat16", "bottleneck-float16", "int8"])
def test_codecs_round_trip(comp, contexts, tmp_path, codec):
    with ContextStore(tmp_path / "s", compressor=comp, codec=codec, flush_every=16) as store:
        store.add_many(list(TEXTS), contexts)
    store = ContextStore(tmp_path / "s")  # no codec, no compressor: the manifest says it all
    assert store.codec.name == "-".join(parse_codec(codec)) and len(store) == len(TEXTS) and list(store) == list(TEXTS)
    got = store.get_many(list(TEXTS))
    for key, g, c in zip(TEXTS, got, contexts):
        assert g.num_tokens == c.num_tokens and g.encoder_fingerprint == comp.fingerprint and g.head == 0
        if codec == "float32":
            assert torch.equal(g.embeddings, c.embeddings), key
        elif codec in EXACT_CODECS:  # the head's layers applied on reading: equal up to float32 rounding
            assert (g.embeddings - c.embeddings).abs().max().item() <= 1e-5, key
        elif codec in ("float16", "bfloat16"):
            assert torch.equal(g.embeddings, c.embeddings.to(getattr(torch, codec)).float()), key
        else:
            assert rel_error(g.embeddings, c.embeddings) < (1e-2 if codec == "int8" else 2e-3), key
    stats = store.stats()
    assert stats["contexts"] == len(TEXTS) and stats["tokens"] == sum(c.num_tokens for c in contexts)
    assert stats["text_bytes"] == sum(len(t.encode()) for t in TEXTS.values())
    assert stats["bytes_per_token"] == pytest.approx(stats["data_bytes"] / stats["tokens"])
    assert stats["fragments"] == 4 and stats["duplicates"] == 0


def test_pq_codebook_is_trained_kept_and_checked(comp, tmp_path):
    texts = {f"p{i}": f"Passage {i} mentions the value {i * 13 % 97} twice: {i * 13 % 97}. " * (1 + i % 4)
             for i in range(120)}
    ids, ctxs = list(texts), comp.compress(list(texts.values()))
    errors = {}
    for bits in (0.5, 1.0, 2.0):
        path = tmp_path / f"pq{bits}"
        store = ContextStore(path, compressor=comp, codec="pq", bits_per_dim=bits, train_size=1000, flush_every=32)
        store.add_many(ids[:10], ctxs[:10])
        with pytest.raises(InputError, match="at least 256 training vectors, got"):
            store.flush()  # too few vectors to train 256 centroids: nothing written, nothing lost
        assert len(store) == 10 and not path.exists()
        store.add_many(ids[10:], ctxs[10:])
        store.close()
        reopened = ContextStore(path)
        manifest = reopened.manifest
        assert manifest["codec"]["bits_per_dim"] == bits and 256 <= manifest["codec"]["trained_on_vectors"] <= 1000
        assert manifest["codec"]["bytes_per_vector"] == 48 * bits / 8  # the tiny bottleneck is 48 wide
        errors[bits] = max(rel_error(g.embeddings, c.embeddings) for g, c in zip(reopened.get_many(ids), ctxs))
    assert errors[2.0] < errors[1.0] < errors[0.5] < 1.0
    with pytest.raises(StoreError, match="keeps bottleneck-pq at 1 bits/dim"):
        ContextStore(tmp_path / "pq1.0", codec="pq", bits_per_dim=2.0)
    codec_file = next((tmp_path / "pq1.0" / "_arccompress").glob("codec-*.safetensors"))
    codec_file.write_bytes(codec_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StoreError, match="codec-.*sha256"):
        ContextStore(tmp_path / "pq1.0")
    # train() on given texts creates the store at once
    trained = ContextStore(tmp_path / "trained", compressor=comp, codec="pq", train_size=500)
    assert 256 <= trained.train(texts.values()) <= 500 and trained.manifest is not None
    trained.add_many(ids[:3], ctxs[:3])
    trained.close()
    assert len(ContextStore(tmp_path / "trained")) == 3


def test_encoder_codec_serves_both_heads(tiny_dir, tmp_path):
    both = Compressor.from_pretrained(tiny_dir / "multi")
    llama, mistral = (Compressor.from_pretrained(tiny_dir / "multi", head=h) for h in ("llama", "mistral"))
    ctxs = llama.compress(list(TEXTS.values())[:8])
    with ContextStore(tmp_path / "s", compressor=both, codec="encoder-float32") as store:
        store.add_many(list(TEXTS)[:8], ctxs)
    assert ContextStore(tmp_path / "s").manifest["head"] is None
    with pytest.raises(StoreError, match="choose one"):
        ContextStore(tmp_path / "s")["doc-0"]
    for comp, head in ((llama, 0), (mistral, 1)):
        expected = comp.compress(list(TEXTS.values())[:8])
        for store in (ContextStore(tmp_path / "s", head=head), ContextStore(tmp_path / "s", compressor=comp)):
            for g, e in zip(store.get_many(list(TEXTS)[:8]), expected):
                assert g.head == head and (g.embeddings - e.embeddings).abs().max().item() <= 1e-5
    with pytest.raises(StoreError, match="choose one"):
        ContextStore(tmp_path / "other", compressor=both)  # a decoder-space store needs one head


def test_identity_is_checked_on_open_and_add(comp, tiny_dir, contexts, tmp_path):
    with ContextStore(tmp_path / "s", compressor=comp) as store:
        store.add("a", contexts[0])
        with pytest.raises(StoreError, match="already"):
            store.add("a", contexts[1])
        with pytest.raises(TypeError):
            store.add("c", "not a context")
        other = Compressor.from_pretrained(tiny_dir / "multi", head=1)
        with pytest.raises(StoreError, match="encoder_fingerprint.*compress it with that encoder, or store it in a "
                                             "store of its own"):
            store.add("b", other.compress("text b"))
        with pytest.raises(StoreError, match="carries only as"):
            store.add("d", contexts[2].to())  # copies keep `pooled`: drop it as save/load does
            store.add("d2", CompressedContext(contexts[2].embeddings, 5, comp.name, 0, 8,
                                              encoder_fingerprint=comp.fingerprint))
        nan = contexts[4].to()
        nan.bottleneck = nan.bottleneck * float("nan")
        with pytest.raises(ValueError, match="context 'f': bottleneck vectors: NaN"):  # the third of three
            store.add_many(["e", "e2", "f"], [contexts[3], contexts[4], nan])  # none is queued
        assert list(store) == ["a", "d"]
    with pytest.raises(StoreError, match=r"encoder_fingerprint.*: open it with that encoder \(--encoder .+\), or "
                                         "give this one a store of its own"):
        ContextStore(tmp_path / "s", compressor=other)
    with pytest.raises(StoreError, match="keeps bottleneck-float16, not decoder-float16"):
        ContextStore(tmp_path / "s", dtype="float16")
    with pytest.raises(StoreError, match="pass compressor="):
        ContextStore(tmp_path / "new")
    with pytest.raises(ValueError, match="storage dtype"):
        ContextStore(tmp_path / "new", dtype="int8")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a context store"):
        ContextStore(tmp_path / "junk", compressor=comp)
    # a decoder-space store made from contexts alone, as in arccompress 0.1
    with ContextStore(tmp_path / "plain", dtype="float16") as plain:
        plain.add_many(["x", "y"], contexts[:2])
    assert torch.equal(ContextStore(tmp_path / "plain")["y"].embeddings, contexts[1].embeddings.half().float())


def test_any_unicode_id(comp, contexts, tmp_path):
    ids = ["line\u2028sep", "para\u2029sep", "next\u0085line", "tab\tand\nnewline", "emoji 🧭", "quote\"'", " "]
    with ContextStore(tmp_path / "s", compressor=comp) as store:
        store.add_many(ids, contexts[: len(ids)])
        with pytest.raises(ValueError, match="lone surrogate"):
            store.add("bad\udc80id", contexts[10])
        with pytest.raises(TypeError):
            store.add("", contexts[11])
    reopened = ContextStore(tmp_path / "s")
    assert list(reopened) == ids and [reopened[i].num_tokens for i in ids] == [c.num_tokens for c in contexts[:7]]
    with pytest.raises(KeyError, match="'nope'.*'nada'"):
        reopened.get_many(["emoji 🧭", "nope", "nada"])


def test_failed_flush_leaves_nothing_and_can_be_retried(comp, contexts, tmp_path, monkeypatch):
    """A disk that fills up while a data file is written: a StoreError naming the store and the cause; the half
    file is in no version (readers see the committed rows only), the queue is kept, and the retry commits."""
    import errno

    from arccompress.store import writer

    store = ContextStore(tmp_path / "s", compressor=comp, flush_every=1000)
    store.add_many(list(TEXTS)[:5], contexts[:5])
    store.flush()
    store.add_many(list(TEXTS)[5:9], contexts[5:9])
    real = writer.write_fragments

    def disk_full(table, *args, **kwargs):
        real(table.slice(0, 1), *args, **kwargs)  # a data file written, never committed...
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_fragments", disk_full)
    with pytest.raises(StoreError, match=r"s: cannot write data files: no space left on the device"):
        store.flush()
    assert len(ContextStore(tmp_path / "s")) == 5 and len(store) == 9  # readers see the committed rows only
    monkeypatch.setattr(writer, "write_fragments", real)
    store.flush()  # the same batch, retried
    reopened = ContextStore(tmp_path / "s")
    assert list(reopened) == list(TEXTS)[:9] and reopened.stats()["duplicates"] == 0


def test_store_rows_are_read_by_data_tools(comp, contexts, tmp_path):
    """A store is a Lance dataset: a pyarrow Dataset (`store.dataset()`) that DuckDB, polars and pyarrow scan, and
    Lance itself opens; a column a user adds (a retrieval vector) is kept by later commits."""
    import duckdb
    import lance
    import polars as pl
    import pyarrow as pa

    with ContextStore(tmp_path / "s", compressor=comp, flush_every=16) as store:
        store.add_many(list(TEXTS)[:50], contexts[:50])
    tokens = sum(c.num_tokens for c in contexts[:50])
    rows = ContextStore(tmp_path / "s").dataset()
    assert duckdb.sql("SELECT count(*), sum(num_tokens) FROM rows").fetchall() == [(50, tokens)]
    assert pl.scan_pyarrow_dataset(rows).select(pl.col("num_tokens").sum()).collect().item() == tokens
    assert rows.to_table(columns=["id"]).num_rows == 50 and rows.schema.names == list(row_schema().names)
    assert {len(c) for c in rows.to_table(columns=["checksum"]).column(0).to_pylist()} == {16}
    # vectors beside the contexts: a column added with Lance, null for rows written after it
    lance.dataset(tmp_path / "s").add_columns(pa.field("vector", pa.list_(pa.float32(), 4)))
    with ContextStore(tmp_path / "s", compressor=comp) as store:
        store.add_many(list(TEXTS)[50:], contexts[50:])
    back = ContextStore(tmp_path / "s")
    assert len(back) == 60 and torch.equal(back["doc-55"].embeddings, ContextStore(tmp_path / "s")["doc-55"].embeddings)
    assert back.dataset().to_table(columns=["vector"]).column(0).null_count == 60


def test_stored_contexts_answer_through_a_generator(comp, tiny_dir, tmp_path):
    gen = Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp)
    ctxs = comp.compress([TEXTS["doc-2"], TEXTS["doc-3"]])
    with ContextStore(tmp_path / "s", compressor=comp, codec="bottleneck-float32") as store:
        store.add_many(["d", "e"], ctxs)
    loaded = ContextStore(tmp_path / "s", compressor=comp).get_many(["d", "e"])
    assert gen.answer("what?", loaded, max_new_tokens=6) == gen.answer("what?", ctxs, max_new_tokens=6)


# ----------------------------------------------------------------------------- processes: crashes and races


WRITER = textwrap.dedent("""
    import sys, torch
    from arccompress import Compressor, ContextStore
    encoder, store, first, last, codec = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    comp = Compressor.from_pretrained(encoder)
    with ContextStore(store, compressor=comp, codec=codec, flush_every=5) as s:
        todo = [i for i in range(first, last) if f"id-{i}" not in s]
        print("ready", flush=True)
        for i in todo:
            s.add(f"id-{i}", comp.compress(f"text number {i} " * (1 + i % 7)))
""")


def writer(tmp_path, tiny_dir, store, first, last, codec="bottleneck-float32"):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(tiny_dir / "hub"), str(store), str(first), str(last),
                             codec], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_store(comp, path, expected_ids=None):
    store = ContextStore(path)
    ids = list(store)
    assert len(ids) == len(set(ids)) and store.stats()["duplicates"] == 0
    if expected_ids is not None:
        assert sorted(ids) == sorted(expected_ids)
    for key, ctx in zip(ids, store.get_many(ids)):
        i = int(key.split("-")[1])
        assert (ctx.embeddings - comp.compress(f"text number {i} " * (1 + i % 7)).embeddings).abs().max() <= 1e-5, key
    return ids


def test_kill_9_loses_at_most_the_batch_in_flight(comp, tiny_dir, tmp_path):
    path = tmp_path / "s"
    delays = [0.0, 0.05, 0.3, 1.0, 1.5, 2.5]  # the first ones land before or inside the very first flush
    for delay in delays:
        proc = writer(tmp_path, tiny_dir, path, 0, 60)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (path / "manifest.json").exists():
            check_store(comp, path)
        else:  # killed before its first fragment: the folder must still open as a new store
            ContextStore(path, compressor=comp, codec="bottleneck-float32")
    proc = writer(tmp_path, tiny_dir, path, 0, 60)  # and a last run finishes the job
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    check_store(comp, path, [f"id-{i}" for i in range(60)])
    assert not list((path / "data").glob(".tmp-*"))  # dead writers' temporary files are swept


def test_a_create_that_lance_commits_over_another_writers_store_is_undone(comp, contexts, tmp_path, monkeypatch):
    """Met in a race of three writers creating one store: another writer created the store (and committed rows)
    between Lance's existence check and this writer's create, and Lance committed the create as an overwrite on top
    (it rebases an overwrite instead of failing): their rows were gone. Now the overwrite is undone (their version
    restored) and this writer adds to their store."""
    import lance

    path = tmp_path / "raced"
    real = lance.write_dataset
    raced = []

    def create_racing_another_writer(data, uri, *args, mode="create", **kwargs):
        if mode != "create" or raced:
            return real(data, uri, *args, mode=mode, **kwargs)
        raced.append(uri)
        with ContextStore(path, compressor=comp) as theirs:  # the other writer: creates the store, commits rows
            theirs.add_many(["theirs-0", "theirs-1"], contexts[:2])
        return real(data, uri, *args, mode="overwrite", **kwargs)  # what Lance's retry of this create amounts to

    monkeypatch.setattr(lance, "write_dataset", create_racing_another_writer)
    with ContextStore(path, compressor=comp) as ours:
        ours.add_many(["ours-0"], contexts[2:3])
    assert raced
    store = ContextStore(path, compressor=comp)
    assert sorted(store) == ["ours-0", "theirs-0", "theirs-1"]
    assert torch.equal(store["theirs-1"].embeddings, ContextStore(path, compressor=comp).get("theirs-1").embeddings)


def test_concurrent_writers_create_and_fill_one_store(comp, tiny_dir, tmp_path):
    path = tmp_path / "shared"
    procs = [writer(tmp_path, tiny_dir, path, k * 40, (k + 1) * 40) for k in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
    check_store(comp, path, [f"id-{i}" for i in range(120)])
    assert len(list((path / "_arccompress").glob("codec-*.safetensors"))) >= 1 and (path / "_versions").is_dir()
