"""arccompress benchmarks: encoder throughput against the machine's matmul rate, chunked long documents,
load time and host memory, end-to-end compress + generate against reading the full text.

    python benchmarks/bench.py --preset cpu              # these 2-core machines, small-but-real shapes
    python benchmarks/bench.py --preset gpu              # real ARC8 sizes (3B encoder, 7B decoder), bf16, CUDA
    python benchmarks/bench.py --preset gpu --scale small --out /tmp/x   # the gpu preset's code at toy sizes

Weights are random (nothing is downloaded): speed does not depend on their values. Results go to
<out>/<preset>.json and <out>/<preset>.md (default benchmarks/results/), rewritten as each section finishes.
MFU is counted with `EncoderConfig.compress_flops` against the matmul rate measured in the same run and, on
CUDA in bf16, against the H200's 989 TFLOP/s dense bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from arccompress import Compressor, Generator
from arccompress.compressor import padding_fraction, plan_batches
from arccompress.encoder import ARCEncoder, EncoderConfig
from arccompress.tiny import byte_level_tokenizer

try:
    from arccompress.devices import synchronize
except ImportError:  # bench_store.py runs format 3 with the package as it was (0.3), where it lived in runtime
    from arccompress.runtime import synchronize

ARC8 = EncoderConfig(dim=3072, n_layers=26, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192, norm_eps=1e-5,
                     rope_theta=500000.0, vocab_size=128256, pooling_factor=8, num_decoders=1,
                     bridge_hidden_dim=2048, decoder_hidden_size=4096)
CPU_ENCODER = replace(ARC8, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, hidden_dim=1536,
                      vocab_size=32000, bridge_hidden_dim=512, decoder_hidden_size=512)
SMALL_ENCODER = replace(CPU_ENCODER, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                        bridge_hidden_dim=128, decoder_hidden_size=128)

PRESETS = {
    # encoder, decoder sizes, passages (count, min, max), documents (count, tokens, chunk), end to end
    # the cpu decoder keeps the real pair's proportion: about 2.7x the encoder's blocks (7B vs 2.6B)
    "cpu": dict(encoder=CPU_ENCODER, decoder=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=22,
                                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
                passages=(64, 20, 400), documents=(2, 4096, 512), e2e=dict(batch=4, context=512, new_tokens=32),
                matmul=2048, dtype=torch.float32, repeats=5, load=replace(ARC8, n_layers=4)),
    "gpu": dict(encoder=ARC8, decoder=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
                passages=(1000, 100, 300), documents=(16, 32768, 1024), e2e=dict(batch=8, context=2048, new_tokens=64),
                matmul=8192, dtype=torch.bfloat16, repeats=3, load=ARC8),
}
H200_PEAK_FLOPS = 989e12  # dense bf16 matmul, NVIDIA H200 (SXM) datasheet
SMALL = dict(encoder=SMALL_ENCODER, decoder=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=32000),
             passages=(12, 20, 120), documents=(2, 1024, 256), e2e=dict(batch=2, context=128, new_tokens=6),
             matmul=512, repeats=1, load=SMALL_ENCODER)


def best_time(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def paired_best_times(fn_a, fn_b, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best times of two alternatives measured in alternation, so that machine noise hits both alike."""
    fn_a(), fn_b()
    a_times, b_times = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, a_times), (fn_b, b_times)):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return min(a_times), min(b_times)


def matmul_rate(n: int, cfg: EncoderConfig, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of the best of two matrix products on random data: the machine's practical ceiling.

    One is n x n x n, the other the encoder's own MLP shape (4096 tokens x dim x hidden_dim).
    """
    best = 0.0
    reps = 10 if device.type == "cuda" else 3
    for m, k, n_ in ((n, n, n), (4096, cfg.dim, cfg.hidden_dim)):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n_, device=device, dtype=dtype)
        seconds = best_time(lambda: [a @ b for _ in range(reps)], device, repeats) / reps
        best = max(best, 2 * m * k * n_ / seconds)
    return best


def built_in(dtype: torch.dtype, device: torch.device, build):
    """Construct a module directly in `dtype` on `device` (no float32 copy of a 7B model on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(previous)


def release_memory(device: torch.device | str) -> None:
    """Free what dropped models held: collect their cycles, and hand CUDA's cached blocks back to the driver, where
    another engine (vLLM) or the next measurement can have them."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def random_encoder(cfg: EncoderConfig, device: torch.device, dtype: torch.dtype) -> Compressor:
    torch.manual_seed(0)
    model = built_in(dtype, device, lambda: ARCEncoder(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.02)
    model.eval().requires_grad_(False)
    # a fixed fingerprint: hashing 6 GB of random weights is not what the timings below measure
    return Compressor(model, byte_level_tokenizer(), name=f"random-{cfg.dim}x{cfg.n_layers}", fingerprint="random")


def random_decoder(sizes: dict, device: torch.device, dtype: torch.dtype):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**sizes, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    model = built_in(dtype, device, lambda: MistralForCausalLM(config))
    return model.eval().requires_grad_(False)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet's dense peak the MFU is also reported against: the H200's, for bf16 on CUDA."""
    return H200_PEAK_FLOPS if device.type == "cuda" and dtype == torch.bfloat16 else None


def utilisation(flops: float, seconds: float, rate: float, peak: float | None) -> dict:
    """FLOP/s achieved, as a fraction of the measured matmul rate and of the datasheet peak (None off CUDA bf16)."""
    achieved = flops / seconds
    return {"model_flop_per_s": achieved, "fraction_of_matmul_rate": achieved / rate,
            "fraction_of_peak": achieved / peak if peak else None}


def bench_passages(comp: Compressor, spec: tuple[int, int, int], rate: float, peak: float | None, device, repeats,
                   single: bool) -> dict:
    count, low, high = spec
    rng = random.Random(0)
    seqs = [[rng.randrange(3, comp.model.config.vocab_size) for _ in range(rng.randint(low, high))] for _ in range(count)]
    lengths = [len(s) for s in seqs]
    budget = 65536 if device.type == "cuda" else 8192
    batch_size = 512 if device.type == "cuda" else 64
    run_batched = lambda: comp.compress_ids(seqs, batch_size=batch_size, max_tokens_per_batch=budget)  # noqa: E731
    if single:
        batched, singles = paired_best_times(run_batched, lambda: [comp.compress_ids(s) for s in seqs], device, repeats)
    else:
        batched = best_time(run_batched, device, repeats)
    out = {
        "passages": count, "tokens": sum(lengths), "length_range": [low, high],
        "batched_s": batched, "tokens_per_s": sum(lengths) / batched,
        **utilisation(comp.model.config.compress_flops(lengths), batched, rate, peak),
        "padding_fraction": padding_fraction(lengths, plan_batches(lengths, batch_size, budget)),
        "batches": len(plan_batches(lengths, batch_size, budget)),
    }
    if single:
        out |= {"single_calls_s": singles, "batched_speedup_over_single": singles / batched}
    return out


def bench_documents(comp: Compressor, spec: tuple[int, int, int], rate: float, peak: float | None, device,
                    repeats) -> dict:
    count, tokens, chunk = spec
    rng = random.Random(1)
    docs = [[rng.randrange(3, comp.model.config.vocab_size) for _ in range(tokens)] for _ in range(count)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    budget = 32768 if device.type == "cuda" else 8192
    seconds = best_time(lambda: comp.compress_ids(docs, chunk_size=chunk, max_tokens_per_batch=budget), device, repeats)
    chunk_lengths = [min(chunk, tokens - i) for _ in docs for i in range(0, tokens, chunk)]
    out = {"documents": count, "tokens_each": tokens, "chunk_size": chunk, "seconds": seconds,
           "tokens_per_s": count * tokens / seconds,
           **utilisation(comp.model.config.compress_flops(chunk_lengths), seconds, rate, peak)}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def bench_end_to_end(comp: Compressor, decoder_sizes: dict, spec: dict, device, dtype, repeats) -> dict:
    """Compress + generate against the same decoder reading the full text, batch of contexts."""
    model = random_decoder(decoder_sizes, device, dtype)
    gen = Generator(model, byte_level_tokenizer(), comp)
    rng = random.Random(2)
    batch, context, new = spec["batch"], spec["context"], spec["new_tokens"]
    vocab = decoder_sizes["vocab_size"]
    enc_ids = [[rng.randrange(3, comp.model.config.vocab_size) for _ in range(context)] for _ in range(batch)]
    question = [rng.randrange(3, vocab) for _ in range(24)]
    # the full-text baseline reads as many decoder tokens as the context's encoder tokens (similar tokenizers)
    full_ids = torch.tensor([[1] + [rng.randrange(3, vocab) for _ in range(context)] + question for _ in range(batch)],
                            device=device)
    kwargs = dict(do_sample=False, pad_token_id=0)

    def compressed(max_new: int):
        contexts = comp.compress_ids(enc_ids)
        inputs = gen.prepare_inputs([["", c] for c in contexts])
        q = model.get_input_embeddings()(torch.tensor(question, device=device)).expand(batch, -1, -1)
        embeds = torch.cat([inputs["inputs_embeds"], q.to(inputs["inputs_embeds"].dtype)], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(batch, len(question), device=device, dtype=torch.long)], 1)
        return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new,
                              min_new_tokens=max_new, **kwargs)

    def full(max_new: int):
        return model.generate(input_ids=full_ids, attention_mask=torch.ones_like(full_ids), max_new_tokens=max_new,
                              min_new_tokens=max_new, **kwargs)

    out: dict = {"batch": batch, "context_tokens": context, "new_tokens": new}
    for name, fn in (("compressed", compressed), ("full_text", full)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            ttft = best_time(lambda: fn(1), device, repeats)
            total = best_time(lambda: fn(new), device, repeats)
        positions = (comp.compress_ids(enc_ids[0]).num_embeddings + 1 + len(question)) if name == "compressed" \
            else full_ids.shape[1]
        cfg = model.config
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) \
            * (positions + new) * batch * torch.finfo(dtype).bits // 8
        out[name] = {"ttft_s": ttft, "total_s": total, "decode_tokens_per_s": batch * (new - 1) / max(total - ttft, 1e-9),
                     "prompt_positions": positions, "kv_cache_bytes": kv_bytes}
        if device.type == "cuda":
            out[name]["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out["ttft_ratio"] = out["compressed"]["ttft_s"] / out["full_text"]["ttft_s"]
    out["decode_rate_ratio"] = out["compressed"]["decode_tokens_per_s"] / out["full_text"]["decode_tokens_per_s"]

    # Generator.generate against transformers' own generate on the same inputs_embeds
    contexts = comp.compress_ids(enc_ids)
    prompts = [["Question about the document: ", c, " Answer:"] for c in contexts]
    inputs = gen.prepare_inputs(prompts)
    with torch.inference_mode():
        raw, ours = paired_best_times(
            lambda: model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, **kwargs),
            lambda: gen.generate(prompts, max_new_tokens=new, min_new_tokens=new, **kwargs), device, repeats)
    out["generator_overhead"] = {"raw_generate_s": raw, "generator_generate_s": ours, "overhead": ours / raw - 1}
    return out  # the decoder is freed with this frame; main() collects


def bench_load(cfg: EncoderConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Write a float32 hub-layout checkpoint of `cfg` (random), load it in `dtype` in a fresh process."""
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix="arc-load-"))
    model_args = {"dim": cfg.dim, "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim, "n_heads": cfg.n_heads,
                  "n_kv_heads": cfg.n_kv_heads, "n_layers": cfg.n_layers + 2, "norm_eps": cfg.norm_eps,
                  "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size}
    config = {"model_args": model_args, "empty_init": 1,
              "embedder_args": {"compress_rates": [-cfg.pooling_factor], "n_truncated_layers": 2, "cont_tok": True,
                                "pooling_module": {"pool_type": "mean_pooled_queries", "where": "before"}},
              "bridge_args": {"bridge_type": "mlp", "in_dim": cfg.dim, "hidden_dim": cfg.bridge_hidden_dim,
                              "out_dim": cfg.decoder_hidden_size}}
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ARCEncoder(cfg).state_dict().items()}
    # shards of about 2 GB, written one at a time so that the writer itself stays small
    names, shard, size, files, weight_map = sorted(shapes), {}, 0, 0, {}
    for k in names + [None]:
        if k is None or size > 2e9:
            file = f"model-{files:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map |= {n: file for n in shard}
            shard, size, files = {}, 0, files + 1
        if k is not None:
            key = ("bridge_module." + k.removeprefix("bridge_module.0.")) if k.startswith("bridge_module.") else f"embedder.{k}"
            shard[key] = torch.randn(shapes[k]) * 0.02
            size += shard[key].numel() * 4
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    code = (
        "import json, shutil, sys, time, torch\n"
        "from arccompress.checkpoint import load_model, read_checkpoint\nfrom arccompress.hub import cache_dir\n"
        # VmHWM is this process's own peak; ru_maxrss would inherit the parent's across fork + exec
        "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1e6\n"
        "base = hwm()\n"
        f"ckpt = read_checkpoint('x', __import__('pathlib').Path({str(folder)!r}))\n"
        f"load = lambda: load_model(ckpt, device=torch.device({str(device)!r}), dtype=torch.{str(dtype).split('.')[-1]})\n"
        f"sync = lambda: torch.cuda.synchronize() if {device.type == 'cuda'} else None\n"
        "t = time.perf_counter(); m, fp = load(); sync(); first = time.perf_counter() - t\n"
        "peak = hwm(); del m\n"
        "t = time.perf_counter(); m, fp2 = load(); sync(); cached = time.perf_counter() - t\n"
        "shutil.rmtree(cache_dir() / 'fingerprints')\n"
        "t = time.perf_counter(); fp3 = ckpt.fingerprint(); alone = time.perf_counter() - t\n"
        "assert fp == fp2 == fp3\n"
        "print(json.dumps({'load_s': first, 'load_cached_fingerprint_s': cached, 'fingerprint_alone_s': alone, "
        "'rss_before_load_gb': base, 'peak_rss_gb': peak}))\n"
    )
    env = os.environ | {"ARCCOMPRESS_CACHE": str(folder / "cache")}  # a cold fingerprint cache
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       env=env).stdout)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
    shutil.rmtree(folder)
    return result | {"checkpoint_gb_float32": disk / 1e9, "largest_tensor_gb_float32": largest / 1e9, "model_gb_loaded": params * torch.finfo(dtype).bits / 8e9,
                     "target": f"{device} {str(dtype).split('.')[-1]}"}


def arguments(doc: str, presets: dict | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --preset (when it has presets), --scale and --out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), required=True)
    parser.add_argument("--scale", choices=["full", "small"], default="full", help="small: toy sizes, to check the code")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser


def step(name: str) -> None:
    """A timestamped progress line on stderr (results go to --out)."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)


def page_start(title: str, r: dict, decoder: dict | None = None) -> list[str]:
    """The first lines of a results page: its title with the preset and scale, then the machine (and the random
    decoder, given its sizes) as the start of a paragraph that the page goes on with."""
    m = r["machine"]
    line = f"Machine: {m.get('gpu', m['cpu'])} ({m['cores']} cores), torch {m['torch']}."
    if decoder is not None:
        line += (f" Decoder: Mistral architecture, hidden {decoder['hidden_size']}, {decoder['num_hidden_layers']} "
                 f"layers, {r['dtype']}, random weights.")
    return [f"# {title} — preset `{r['preset']}`{' (small scale)' if r['scale'] == 'small' else ''}", "", line]


def save_results(out: str | Path, name: str, result: dict, text: str, *, echo: bool = True) -> None:
    """<out>/<name>.json and <out>/<name>.md, each replaced whole (a kill never leaves half a file), and the
    markdown on stdout when `echo`. Benchmarks call it after every section, so a late failure loses nothing."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for file, content in ((out / f"{name}.json", json.dumps(result, indent=2)), (out / f"{name}.md", text)):
        partial = file.with_name(f".{file.name}.partial")
        partial.write_text(content)
        os.replace(partial, file)
    if echo:
        print(text)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["cores"] = os.cpu_count()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def rate_text(x: dict) -> str:
    """"N% of matmul rate", and of the datasheet peak when there is one."""
    text = f"{100 * x['fraction_of_matmul_rate']:.0f}% of matmul rate"
    if x.get("fraction_of_peak") is not None:
        text += f", {100 * x['fraction_of_peak']:.0f}% of the H200's {H200_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 peak"
    return text


def markdown(preset: str, r: dict) -> str:
    """The results table: one row per measure of the sections finished so far."""
    lines = [
        f"# arccompress benchmark — preset `{preset}`{' (small scale)' if r['scale'] == 'small' else ''}",
        "",
        f"Machine: {r['machine'].get('gpu', r['machine']['cpu'])}, {r['machine']['threads']} torch threads, "
        f"torch {r['machine']['torch']}. Encoder: dim {r['encoder']['dim']}, {r['encoder']['n_layers']} blocks, "
        f"{r['dtype']}, random weights."
        + (f" Matmul rate measured in the same run: {r['matmul_flop_per_s'] / 1e9:.1f} GFLOP/s."
           if "matmul_flop_per_s" in r else ""),
        "",
        "| measure | value |",
        "| --- | --- |",
    ]
    if "passages" in r:
        p = r["passages"]
        lines += [
            f"| encoder, {p['passages']} passages of {p['length_range'][0]}–{p['length_range'][1]} tokens, batched | "
            f"{p['tokens_per_s']:,.0f} tokens/s, {p['model_flop_per_s'] / 1e9:.1f} GFLOP/s = {rate_text(p)} |",
            f"| padding fraction (length-sorted batches) | {100 * p['padding_fraction']:.1f}% in {p['batches']} batches |",
        ]
        if "single_calls_s" in p:
            lines.append(f"| same passages, one call each | {p['single_calls_s']:.3f} s vs {p['batched_s']:.3f} s "
                         f"batched (batched {p['batched_speedup_over_single']:.2f}x) |")
    if "documents" in r:
        d = r["documents"]
        lines.append(f"| chunked: {d['documents']} documents of {d['tokens_each']:,} tokens, chunk_size={d['chunk_size']} "
                     f"| {d['tokens_per_s']:,.0f} tokens/s, {rate_text(d)}"
                     + (f", peak GPU {d['peak_gpu_gb']:.1f} GB" if "peak_gpu_gb" in d else "") + " |")
    if "end_to_end" in r:
        e = r["end_to_end"]
        c, f = e["compressed"], e["full_text"]
        lines += [
            f"| end to end, batch {e['batch']}, {e['context_tokens']}-token contexts: time to first token | "
            f"{c['ttft_s']:.3f} s compressed vs {f['ttft_s']:.3f} s full text (ratio {e['ttft_ratio']:.2f}) |",
            f"| total for {e['new_tokens']} new tokens | {c['total_s']:.3f} s compressed vs {f['total_s']:.3f} s full text |",
            f"| decode rate | {c['decode_tokens_per_s']:,.0f} vs {f['decode_tokens_per_s']:,.0f} tokens/s "
            f"(ratio {e['decode_rate_ratio']:.2f}) |",
            f"| prompt positions / KV cache | {c['prompt_positions']} / {c['kv_cache_bytes'] / 1e6:.1f} MB compressed vs "
            f"{f['prompt_positions']} / {f['kv_cache_bytes'] / 1e6:.1f} MB full text |",
            f"| Generator.generate vs model.generate, same inputs_embeds | "
            f"{e['generator_overhead']['generator_generate_s']:.3f} s vs {e['generator_overhead']['raw_generate_s']:.3f} s "
            f"({100 * e['generator_overhead']['overhead']:+.1f}%) |",
        ]
        if "peak_gpu_gb" in c:
            lines.append(f"| peak GPU memory, end to end | {c['peak_gpu_gb']:.1f} GB compressed, "
                         f"{f['peak_gpu_gb']:.1f} GB full text |")
    if "load" in r:
        ld = r["load"]
        lines.append(f"| load a {ld['checkpoint_gb_float32']:.2f} GB float32 checkpoint to {ld['target']} | "
                     f"{ld['load_s']:.1f} s; host RSS {ld['rss_before_load_gb']:.2f} GB before, peak "
                     f"{ld['peak_rss_gb']:.2f} GB (loaded model {ld['model_gb_loaded']:.2f} GB, largest float32 "
                     f"tensor {ld['largest_tensor_gb_float32']:.2f} GB) |")
        lines.append(f"| weights fingerprint (sha256 of every byte) | hashed while loading: {ld['load_s']:.1f} s first load "
                     f"vs {ld['load_cached_fingerprint_s']:.1f} s with the cached fingerprint; "
                     f"{ld['fingerprint_alone_s']:.1f} s to fingerprint without loading |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = arguments(__doc__, PRESETS)
    parser.add_argument("--skip-load", action="store_true", help="skip the checkpoint loading measurement")
    args = parser.parse_args()

    spec = dict(PRESETS[args.preset])
    if args.scale == "small":
        spec |= SMALL
    device = torch.device("cuda" if args.preset == "gpu" and torch.cuda.is_available() else "cpu")
    dtype = spec["dtype"] if device.type == "cuda" or args.preset == "cpu" else torch.float32
    repeats = spec["repeats"]
    peak = peak_flops(device, dtype)
    result: dict = {"preset": args.preset, "scale": args.scale, "machine": machine(), "dtype": str(dtype).split(".")[-1],
                    "encoder": asdict(spec["encoder"]), "peak_flop_per_s": peak}

    def section_done() -> None:  # what is measured so far, on disk
        save_results(args.out, args.preset, result, markdown(args.preset, result), echo=False)

    step("matmul rate")
    rate = matmul_rate(spec["matmul"], spec["encoder"], dtype, device, repeats)
    step("encoder: passages")
    comp = random_encoder(spec["encoder"], device, dtype)
    # measured again after a warm-up of the whole machine; the best of both is the ceiling used
    rate = max(rate, matmul_rate(spec["matmul"], spec["encoder"], dtype, device, repeats))
    result["matmul_flop_per_s"] = rate
    result["passages"] = bench_passages(comp, spec["passages"], rate, peak, device, repeats,
                                        single=args.preset == "cpu")
    section_done()
    step("encoder: chunked documents")
    result["documents"] = bench_documents(comp, spec["documents"], rate, peak, device, repeats)
    section_done()
    step("end to end")
    result["end_to_end"] = bench_end_to_end(comp, spec["decoder"], spec["e2e"], device, dtype, repeats)
    section_done()
    del comp
    release_memory(device)
    if not args.skip_load:
        step("loading")
        result["load"] = bench_load(spec["load"], device, torch.bfloat16)

    save_results(args.out, args.preset, result, markdown(args.preset, result))


if __name__ == "__main__":
    main()
