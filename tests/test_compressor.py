"""Compressor behaviour on tiny checkpoints built in fixtures: loading, batching, chunking, bad input."""

from __future__ import annotations

import json
import shutil
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from arccompress import CheckpointError, CompressedContext, Compressor
from arccompress.encoder import ARCEncoder
from arccompress.tiny import TINY_ENCODER, byte_level_tokenizer

from .conftest import TEST_DEVICE, TEST_DTYPE, assert_close

TEXTS = [
    "Short one.",
    "A somewhat longer text that spans more than a few pooling groups of eight tokens each, surely.",
    "x",
    "Twelve bytes",
    "Paris is the capital of France. " * 9,
]


def load(path, **kwargs) -> Compressor:
    """A Compressor on the test device, in the test dtype (conftest: CPU float32 unless asked otherwise)."""
    return Compressor.from_pretrained(path, **({"device": TEST_DEVICE, "dtype": TEST_DTYPE} | kwargs))


@pytest.fixture(scope="module")
def comp(tiny_dir) -> Compressor:
    return load(tiny_dir / "hub")


def test_str_gives_one_list_gives_list_in_order(comp):
    one = comp.compress(TEXTS[1])
    assert isinstance(one, CompressedContext)
    many = comp.compress(TEXTS)
    assert [c.text for c in many] == TEXTS
    assert comp.compress([]) == []
    lengths = [len(t.encode()) for t in TEXTS]  # byte-level tokenizer: one token per byte
    assert [c.num_tokens for c in many] == lengths
    assert [c.num_embeddings for c in many] == [max(1, -(-n // 8)) + 1 for n in lengths]


def test_context_fields_and_repr(comp):
    ctx = comp.compress(TEXTS[1])
    assert ctx.embeddings.shape == (ctx.num_embeddings, comp.decoder_hidden_size)
    assert ctx.embeddings.device == comp.device == TEST_DEVICE and ctx.dtype == comp.dtype == TEST_DTYPE
    assert ctx.compression_ratio == pytest.approx(ctx.num_tokens / ctx.num_embeddings)
    assert ctx.encoder == str(comp.name) and ctx.head == 0 and ctx.chunk_size is None
    assert ctx.pooling_factor == 8 and ctx.encoder_fingerprint == comp.fingerprint
    assert "embeddings" in repr(ctx) and "ratio" in repr(ctx)
    assert "pooling_factor=8" in repr(comp)


def test_batch_invariance(comp):
    alone = [comp.compress(t).embeddings for t in TEXTS]
    for batch_size, budget in ((64, 16384), (2, 16384), (64, 200)):
        batched = comp.compress(TEXTS, batch_size=batch_size, max_tokens_per_batch=budget)
        for i, (a, b) in enumerate(zip(alone, batched)):
            assert_close(b.embeddings, a, what=f"text {i}, batch_size={batch_size}, budget={budget}")


def test_result_does_not_depend_on_neighbours(comp):
    text = TEXTS[1]
    base = comp.compress(text).embeddings
    for others in (["a" * 300], ["b"], ["c" * 97, "d" * 5]):
        assert_close(comp.compress(others + [text])[-1].embeddings, base, what=f"beside {len(others)} others")


def test_repeated_runs_are_bitwise_identical(comp):
    """The same batch twice gives the same bits, on any device: pooling sums in a fixed order (no atomics)."""
    texts = TEXTS + ["Bitwise " * k for k in (3, 40, 111)]
    for chunk_size in (None, 16):
        first, second = (comp.compress(texts, chunk_size=chunk_size, batch_size=4) for _ in range(2))
        for a, b in zip(first, second):
            assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.pooled, b.pooled)
            assert torch.equal(a.bottleneck, b.bottleneck)


def test_bottleneck_is_kept_from_the_head_on_the_device(comp):
    """ctx.bottleneck is the head's first layer of ctx.pooled, computed where the compressor runs, in its own
    storage; the embeddings are the head's second layer of it, then <Cont>."""
    head = comp.model.head(0)
    for ctx in comp.compress(TEXTS):
        b = ctx.bottleneck
        assert b.device == ctx.pooled.device == comp.device and b.dtype == comp.dtype
        assert tuple(b.shape) == (ctx.num_embeddings - 1, comp.model.config.bridge_hidden_dim)
        assert b.untyped_storage().nbytes() == b.numel() * b.element_size()  # not a view of the whole batch
        with torch.no_grad():
            assert_close(b, head.bottleneck(ctx.pooled), what="bottleneck")
            assert_close(ctx.embeddings, torch.cat([head.bridge.layer2(b), head.cont_row()]), what="embeddings")


def test_the_cont_row_is_computed_once_and_again_after_a_weight_changes(comp):
    head = comp.model.head(0)
    first = head.cont_row()
    assert head.cont_row() is first  # kept: a store's reads do not pay the whole head for one row
    cont = head.cont.detach().clone()
    with torch.no_grad():
        head.cont.add_(1.0)  # in place, as load_state_dict does
        try:
            changed = head.cont_row()
            assert not torch.equal(changed, first)
            assert_close(changed, head.bridge(head.cont), what="<Cont> row")
        finally:
            head.cont.copy_(cont)


def test_compress_reads_nothing_back_from_the_device():
    """The encoder loop and the head queue work without waiting on the device: with the model on the meta device,
    where every read of a value (.item(), .tolist(), bool(), nonzero, a copy to the host) raises, compress runs."""
    with torch.device("meta"):
        model = ARCEncoder(TINY_ENCODER).eval()
    comp = Compressor(model, byte_level_tokenizer(), name="meta", fingerprint="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.zeros(2, device="meta").tolist()  # what the test relies on
    lengths = [1, 7, 8, 9, 40, 40, 130]  # equal and unequal lengths: dense and padded batches
    out = comp.compress_ids([[5] * n for n in lengths], batch_size=3)
    assert [c.num_embeddings for c in out] == [max(1, -(-n // 8)) + 1 for n in lengths]
    assert all(c.embeddings.is_meta and c.bottleneck.is_meta for c in out)
    assert comp.compress_ids([6] * 100, chunk_size=32).num_embeddings == 4 + 4 + 4 + 1 + 1


def test_chunking_concatenates_chunks_then_one_cont(comp):
    ids = comp.tokenize([TEXTS[4]])[0]
    chunk = 40
    ctx = comp.compress_ids(ids, chunk_size=chunk)
    with torch.inference_mode():
        pooled = comp.encode_sequences([ids[i:i + chunk] for i in range(0, len(ids), chunk)], 64, 10_000)
        head = comp.model.head(0)
        expected = head.bridge(torch.cat(pooled + [head.cont]))
    assert ctx.num_embeddings == sum(-(-len(ids[i:i + chunk]) // 8) for i in range(0, len(ids), chunk)) + 1
    assert_close(ctx.embeddings, expected, float32_atol=1e-6)
    assert ctx.chunk_size == chunk
    # chunks at least as long as the text change nothing
    whole = comp.compress_ids(ids).embeddings
    assert_close(comp.compress_ids(ids, chunk_size=len(ids)).embeddings, whole, float32_atol=1e-6)
    # many texts chunked together equal each alone
    both = comp.compress([TEXTS[4], TEXTS[1]], chunk_size=16)
    assert_close(both[0].embeddings, comp.compress(TEXTS[4], chunk_size=16).embeddings)


def test_compress_ids_matches_compress(comp):
    ids = comp.tokenize(TEXTS)
    by_ids = comp.compress_ids(ids)
    by_text = comp.compress(TEXTS)
    for a, b in zip(by_ids, by_text):
        assert torch.equal(a.embeddings, b.embeddings) and a.text is None
    assert isinstance(comp.compress_ids(ids[0]), CompressedContext)
    assert isinstance(comp.compress_ids(torch.tensor(ids[0])), CompressedContext)


def test_bad_inputs_raise_clear_errors_and_leave_compressor_usable(comp):
    before = comp.compress(TEXTS[0]).embeddings
    with pytest.raises(ValueError, match="empty"):
        comp.compress("")
    with pytest.raises(ValueError, match="index 1"):
        comp.compress(["fine", ""])
    with pytest.raises(TypeError, match="index 1.*int"):
        comp.compress(["fine", 3])
    with pytest.raises(TypeError):
        comp.compress(42)
    with pytest.raises(ValueError, match="outside the encoder vocabulary"):
        comp.compress_ids([1, 2, comp.model.config.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        comp.compress_ids([[5, 6], [-1]])
    with pytest.raises(ValueError, match="empty"):
        comp.compress_ids([[5, 6], []])
    with pytest.raises(TypeError, match="ints"):
        comp.compress_ids([1.5, 2])
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size"):
            comp.compress("text", chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size"):
        comp.compress("text", chunk_size=2.5)
    with pytest.raises(ValueError, match="batch_size"):
        comp.compress("text", batch_size=0)
    assert torch.equal(comp.compress(TEXTS[0]).embeddings, before)


def test_both_layouts_and_shards_load_the_same_weights(tiny_dir, comp):
    research = load(tiny_dir / "research")
    sharded = load(tiny_dir / "sharded")
    ref = comp.compress(TEXTS[1]).embeddings
    assert torch.equal(research.compress(TEXTS[1]).embeddings, ref)
    assert torch.equal(sharded.compress(TEXTS[1]).embeddings, ref)
    assert research.checkpoint.layout == "research" and comp.checkpoint.layout == "hub"


def test_research_layout_needs_backbone_params(tiny_dir, tmp_path):
    target = tmp_path / "research"
    shutil.copytree(tiny_dir / "research", target)
    backbone = target / "backbone" / "params.json"
    moved = tmp_path / "llama-3.2-3b-params.json"
    backbone.rename(moved)
    with pytest.raises(FileNotFoundError, match="backbone_params"):
        Compressor.from_pretrained(target)
    loaded = Compressor.from_pretrained(target, backbone_params=moved)
    as_dict = Compressor.from_pretrained(target, backbone_params=json.loads(moved.read_text()))
    assert loaded.model.config == as_dict.model.config
    assert loaded.model.config.hidden_dim == 192  # derived from multiple_of and ffn_dim_multiplier


def test_two_head_encoder_needs_a_choice(tiny_dir):
    open_choice = load(tiny_dir / "multi")
    assert open_choice.head is None and open_choice.num_heads == 2
    with pytest.raises(ValueError, match="decoder heads"):
        open_choice.compress("text")
    open_choice.select_head("llama")
    llama = open_choice.compress("some text here")
    assert llama.head == 0
    mistral = load(tiny_dir / "multi", head="mistral").compress("some text here")
    assert mistral.head == 1
    assert not torch.allclose(llama.embeddings, mistral.embeddings)
    assert torch.equal(load(tiny_dir / "multi", head=1).compress("some text here").embeddings, mistral.embeddings)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Compressor.from_pretrained(tiny_dir / "multi", head=2)
    with pytest.raises(ValueError, match="choices"):
        Compressor.from_pretrained(tiny_dir / "multi", head="gpt")
    with pytest.raises(ValueError, match="out of range"):
        Compressor.from_pretrained(tiny_dir / "hub", head=1)


def test_dtypes(tiny_dir):
    bf16 = load(tiny_dir / "hub", dtype=torch.bfloat16)
    f32 = load(tiny_dir / "hub", dtype="float32")
    a, b = bf16.compress(TEXTS[1]), f32.compress(TEXTS[1])
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    rel = (a.embeddings.float() - b.embeddings).norm() / b.embeddings.norm()
    assert rel < 3e-2
    with pytest.raises(ValueError, match="dtype"):
        Compressor.from_pretrained(tiny_dir / "hub", dtype=torch.int8)


# ----------------------------------------------------------------------------- broken checkpoints


@pytest.fixture
def hub_copy(tiny_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_dir / "hub", target)
    return target


def test_missing_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no encoder folder at"):
        Compressor.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="no encoder folder at runs/ckpt, and as a hub id: 'runs/ckpt'"):
        Compressor.from_pretrained("runs/ckpt", local_files_only=True)  # a mistyped folder or a hub id: both said
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="kyutai/ARC8_Encoder_Mistral.*not in the Hugging Face cache"):
        Compressor.from_pretrained("kyutai/ARC8_Encoder_Mistral", local_files_only=True)


def test_truncated_safetensors(hub_copy):
    weights = hub_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Compressor.from_pretrained(hub_copy)


def test_unreadable_config(hub_copy):
    (hub_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        Compressor.from_pretrained(hub_copy)
    (hub_copy / "config.json").write_text(json.dumps({"model_args": {}}))
    with pytest.raises(CheckpointError, match="embedder_args"):
        Compressor.from_pretrained(hub_copy)


def test_missing_unexpected_and_misshaped_tensors(hub_copy):
    file = hub_copy / "model.safetensors"
    original = {k: v.clone() for k, v in load_file(file).items()}  # in memory: the file is rewritten below
    tensors = dict(original)
    del tensors["embedder.layers.1.attention.wq.weight"]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.1\.attention\.wq\.weight'"):
        Compressor.from_pretrained(hub_copy)
    tensors = dict(original)
    tensors["embedder.layers.0.feed_forward.w1.weight"] = torch.zeros(3, 3)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"feed_forward\.w1\.weight.*model\.safetensors.*\[3, 3\]"):
        Compressor.from_pretrained(hub_copy)
    tensors = dict(original)
    tensors["embedder.extra.weight"] = torch.zeros(3, 3)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'embedder\.extra\.weight'"):
        Compressor.from_pretrained(hub_copy)
    tensors = dict(original)
    tensors["embedder.layers.7.attention.wq.weight"] = torch.zeros(3, 3)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"says 2 encoder blocks, the weight files hold 8"):
        Compressor.from_pretrained(hub_copy)


def test_pickle_only_checkpoint_is_refused(hub_copy):
    (hub_copy / "model.safetensors").unlink()
    (hub_copy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        Compressor.from_pretrained(hub_copy)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("embedder_args", "causal_embedder", True, "causal"),
        ("embedder_args", "memory_tokens", 8, "memory tokens"),
        ("embedder_args", "pooling_module", {"pool_type": "metric_cosine", "where": "before"}, "pool_type"),
        ("embedder_args", "pooling_module", {"pool_type": "mean_pooled_queries", "where": "between"}, "where"),
        ("embedder_args", "compress_rates", [4], "compress_rates"),
        ("bridge_args", "bridge_type", "rms", "bridge_type"),
    ],
)
def test_unsupported_configurations_are_refused(hub_copy, section, key, value, message):
    cfg = json.loads((hub_copy / "config.json").read_text())
    cfg[section][key] = value
    (hub_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"unsupported.*{message}"):
        Compressor.from_pretrained(hub_copy)


def test_other_pooling_factor_is_computed(hub_copy):
    cfg = json.loads((hub_copy / "config.json").read_text())
    cfg["embedder_args"]["compress_rates"] = [-4]
    (hub_copy / "config.json").write_text(json.dumps(cfg))
    comp = Compressor.from_pretrained(hub_copy)
    assert comp.pooling_factor == 4
    assert comp.compress("x" * 21).num_embeddings == 6 + 1


def test_tokenizer_argument(tiny_dir, hub_copy):
    from arccompress.tiny import byte_level_tokenizer

    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hub_copy / f).unlink()
    comp = Compressor.from_pretrained(hub_copy, tokenizer=byte_level_tokenizer())
    assert comp.compress("abc").num_tokens == 3
    comp = Compressor.from_pretrained(hub_copy, tokenizer=tiny_dir / "hub")
    assert comp.compress("abc").num_tokens == 3
    with pytest.raises(TypeError, match="tokenizer"):
        Compressor.from_pretrained(hub_copy, tokenizer=123)


def test_progress_bar_runs(comp, capsys):
    comp.compress(TEXTS, show_progress_bar=True, batch_size=2)
    assert "compress" in capsys.readouterr().err


def _fake_hub_cache(root, repo_id: str, source) -> None:
    """Lay out `source`'s files as a Hugging Face cache snapshot of `repo_id` (what a download leaves)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def test_hub_id_from_the_cache_with_default_tokenizer(tiny_dir, llama3_tokenizer, tmp_path):
    """A hub id resolves through the HF cache offline; without tokenizer files the default Llama 3 one is used."""
    import os
    import subprocess
    import sys

    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_dir / "hub", encoder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (encoder / f).unlink()
    tokenizer_dir = tmp_path / "llama3-tokenizer"
    llama3_tokenizer.save_pretrained(tokenizer_dir)
    (tokenizer_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))  # as in the real repository
    _fake_hub_cache(tmp_path / "hf", "kyutai/ARC8_Encoder_Tiny", encoder)
    _fake_hub_cache(tmp_path / "hf", "meta-llama/Llama-3.2-3B", tokenizer_dir)
    script = (
        "from arccompress import Compressor\n"
        "comp = Compressor.from_pretrained('kyutai/ARC8_Encoder_Tiny')\n"
        "print(comp.name, comp.tokenizer('Paris', add_special_tokens=False)['input_ids'])\n"
        "try:\n    comp.compress('Paris')\nexcept ValueError as e:\n    print('ValueError', e)\n"
    )
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kyutai/ARC8_Encoder_Tiny [60704]" in out.stdout  # the real Llama 3 tokenizer, from the cache
    # the tiny encoder's vocabulary is smaller than Llama 3's: a clear error, not an IndexError
    assert "ValueError" in out.stdout and "vocabulary" in out.stdout


def test_out_of_memory_splits_the_batch_with_identical_results(tiny_dir, monkeypatch):
    comp = load(tiny_dir / "hub")
    texts = [f"text number {i} of a batch of similar lengths" for i in range(10)]
    expected = comp.compress(texts)
    forward = comp.model.forward
    calls, failed = [], []

    def small_device(ids, lengths):  # a device that fits two sequences at a time
        calls.append(len(lengths))
        if len(lengths) > 2:
            activations = torch.empty(1024, device=ids.device)  # what a failed forward pass holds when it fails
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        # the halves run outside the except block: no exception in flight, the failed passes' tensors freed
        assert sys.exc_info() == (None, None, None)
        assert all(ref() is None for ref in failed)
        return forward(ids, lengths)

    monkeypatch.setattr(comp.model, "forward", small_device)
    got = comp.compress(texts)
    assert calls[0] == 10 and sum(n for n in calls if n <= 2) == 10  # retried in halves down to what fits
    assert failed and all(ref() is None for ref in failed)
    for a, b in zip(expected, got):
        assert_close(b.embeddings, a.embeddings, what="split batch")
    calls.clear()
    monkeypatch.setattr(comp.model, "forward", lambda ids, lengths: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(torch.OutOfMemoryError, match="chunk_size"):
        comp.compress("one text")


def test_chunked_mode_bounds_each_forward(tiny_dir, monkeypatch):
    comp = load(tiny_dir / "hub")
    forward = comp.model.forward
    seen = []

    def spy(ids, lengths):
        seen.append(int(lengths.max()) * len(lengths))
        return forward(ids, lengths)

    monkeypatch.setattr(comp.model, "forward", spy)
    ctx = comp.compress("a long document " * 400, chunk_size=64, max_tokens_per_batch=256)
    assert ctx.num_tokens == 6400 and max(seen) <= 256 and len(seen) >= 6400 // 256
