"""Saving contexts and the resumable ContextStore: exact round trips, metadata, compatibility, crashes."""

from __future__ import annotations

import json

import pytest
import torch

from arccompress import CompressedContext, Compressor, ContextStore, Generator, StoreError

TEXTS = {f"doc-{i}": f"Document number {i} says something about topic {i * 7}. " * (i + 1) for i in range(7)}


@pytest.fixture(scope="module")
def comp(tiny_dir) -> Compressor:
    return Compressor.from_pretrained(tiny_dir / "hub")


def test_context_save_load_round_trip(comp, tmp_path):
    ctx = comp.compress(TEXTS["doc-3"], chunk_size=16)
    ctx.save(tmp_path / "c.safetensors")
    back = CompressedContext.load(tmp_path / "c.safetensors")
    assert torch.equal(back.embeddings, ctx.embeddings)
    for field in ("num_tokens", "encoder", "decoder_index", "pooling_factor", "chunk_size", "encoder_fingerprint"):
        assert getattr(back, field) == getattr(ctx, field)
    assert back.text is None
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


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_store_round_trips_exactly(comp, tmp_path, dtype):
    contexts = comp.compress(list(TEXTS.values()))
    with ContextStore(tmp_path / "s", dtype=dtype, flush_every=3) as store:
        store.add_many(list(TEXTS), contexts)
    store = ContextStore(tmp_path / "s")
    assert len(store) == len(TEXTS) and list(store) == list(TEXTS) and "doc-2" in store
    want = getattr(torch, dtype)
    for (key, got), ctx in zip(store.items(), contexts):
        assert torch.equal(got.embeddings, ctx.embeddings.to(want)), key
        assert got.num_tokens == ctx.num_tokens and got.encoder_fingerprint == comp.fingerprint
    assert len(list((tmp_path / "s" / "shards").glob("*.safetensors"))) == 3  # 3 + 3 + 1
    stats = store.stats()
    assert stats["tokens"] == sum(c.num_tokens for c in contexts)
    assert stats["embedding_bytes"] == sum(c.num_embeddings for c in contexts) * 64 * want.itemsize
    assert stats["text_bytes"] == sum(len(t.encode()) for t in TEXTS.values())
    assert stats["bytes_per_token"] == pytest.approx(stats["embedding_bytes"] / stats["tokens"])
    with pytest.raises(KeyError):
        store["nope"]


def test_store_resumes_after_a_crash(comp, tmp_path):
    keys = list(TEXTS)
    store = ContextStore(tmp_path / "s", flush_every=100)
    store.add_many(keys[:4], comp.compress([TEXTS[k] for k in keys[:4]]))
    store.flush()
    store.add_many(keys[4:6], comp.compress([TEXTS[k] for k in keys[4:6]]))  # in flight, never flushed
    del store  # the process dies
    index = tmp_path / "s" / "index.jsonl"
    index.write_bytes(index.read_bytes() + b'{"id": "doc-9", "sha')  # and a line was cut mid-write
    reopened = ContextStore(tmp_path / "s")
    assert list(reopened) == keys[:4]
    todo = [k for k in keys if k not in reopened]
    reopened.add_many(todo, comp.compress([TEXTS[k] for k in todo]))
    reopened.close()
    final = ContextStore(tmp_path / "s")
    assert list(final) == keys
    assert torch.allclose(final["doc-5"].embeddings, comp.compress(TEXTS["doc-5"]).embeddings, atol=1e-5)


def test_store_refuses_foreign_contexts(comp, tiny_dir, tmp_path):
    with ContextStore(tmp_path / "s") as store:
        store.add("a", comp.compress("text a"))
        with pytest.raises(KeyError, match="already"):
            store.add("a", comp.compress("text a"))
        other_head = Compressor.from_pretrained(tiny_dir / "multi", decoder=1)
        with pytest.raises(StoreError, match="encoder_fingerprint"):
            store.add("b", other_head.compress("text b"))
        with pytest.raises(TypeError):
            store.add("c", "not a context")
    with pytest.raises(StoreError, match="encoder_fingerprint"):
        ContextStore(tmp_path / "s", compressor=other_head)
    with pytest.raises(StoreError, match="float32"):
        ContextStore(tmp_path / "s", dtype="float16")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a context store"):
        ContextStore(tmp_path / "junk")
    with pytest.raises(ValueError, match="storage dtype"):
        ContextStore(tmp_path / "new", dtype="int8")


def test_stored_contexts_answer_through_a_generator(comp, tiny_dir, tmp_path):
    gen = Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp)
    ctx = comp.compress(TEXTS["doc-2"])
    with ContextStore(tmp_path / "s") as store:
        store.add("d", ctx)
    loaded = ContextStore(tmp_path / "s", compressor=comp)["d"]
    prompt = ["Document: ", loaded, "\nQuestion: what?\nAnswer:"]
    assert gen.generate_ids(prompt, max_new_tokens=6) == gen.generate_ids(["Document: ", ctx, "\nQuestion: what?\nAnswer:"], max_new_tokens=6)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["encoder_fingerprint"] == comp.fingerprint and manifest["hidden_size"] == 64
