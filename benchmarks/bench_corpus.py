"""Corpus compression: one process against Ray Data with several actors.

    python benchmarks/bench_corpus.py --preset cpu    # this machine: 2 actors of one thread vs one process
    python benchmarks/bench_corpus.py --preset gpu    # one node: one actor per GPU vs one process on one GPU

A random encoder in the hub layout (cpu: the cpu preset's dim 512 x 8 blocks; gpu: the released ARC8 size,
bfloat16) with the real Llama 3 tokenizer, and passages of the Python standard library's docstrings
(cpu: 2,000 of ~100 words; gpu: 50,000) written into a store (bottleneck-float16). Reported: encoder tokens/s
of the whole job for `engine="local"` and `engine="ray"`, the cluster's start time, and what each actor pays
before its first batch (loading the encoder) next to a batch's compute time. Results are rewritten as each
section finishes.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import ARC8, CPU_ENCODER, SMALL_ENCODER, arguments, machine, save_results, step  # noqa: E402
from bench_store import corpus  # noqa: E402

PRESETS = {"cpu": dict(encoder=CPU_ENCODER, passages=2000, words=(80, 120), batch=128, dtype=torch.float32),
           "gpu": dict(encoder=ARC8, passages=50_000, words=(80, 120), batch=1024, dtype=torch.bfloat16)}
SMALL = dict(encoder=SMALL_ENCODER, passages=300, words=(20, 40), batch=32)


def save_encoder(cfg, dtype: torch.dtype, folder: Path) -> Path:
    """A random encoder of `cfg` in the hub layout, with the Llama 3 tokenizer beside it."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from arccompress.compressor import bundled_llama3_tokenizer
    from arccompress.encoder import ARCEncoder

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ARCEncoder(cfg).state_dict().items()}
    tensors = {}
    for k, shape in shapes.items():
        key = ("bridge_module." + k.removeprefix("bridge_module.0.")) if k.startswith("bridge_module.") else f"embedder.{k}"
        tensors[key] = (torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape) * 0.02).to(dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"model_args": {"dim": cfg.dim, "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim,
                             "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "n_layers": cfg.n_layers + 2,
                             "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size},
              "empty_init": 1,
              "embedder_args": {"compress_rates": [-cfg.pooling_factor], "n_truncated_layers": 2, "cont_tok": True,
                                "pooling_module": {"pool_type": "mean_pooled_queries", "where": "before"}},
              "bridge_args": {"bridge_type": "mlp", "in_dim": cfg.dim, "hidden_dim": cfg.bridge_hidden_dim,
                              "out_dim": cfg.decoder_hidden_size}}
    (folder / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(bundled_llama3_tokenizer()).save_pretrained(folder)
    return folder


def main() -> None:
    args = arguments(__doc__, PRESETS).parse_args()
    import random

    import ray

    from arccompress import Compressor, compress_corpus
    from arccompress.devices import synchronize

    spec = dict(PRESETS[args.preset]) | (SMALL if args.scale == "small" else {})
    gpus = torch.cuda.device_count() if args.preset == "gpu" else 0
    device = "cuda" if gpus else "cpu"
    with tempfile.TemporaryDirectory(prefix="arc-bench-corpus-") as work:
        work = Path(work)
        from arccompress.compressor import bundled_llama3_tokenizer
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(bundled_llama3_tokenizer()))
        cfg = replace(spec["encoder"], vocab_size=vocab)
        encoder = save_encoder(cfg, spec["dtype"], work / "encoder")
        rng = random.Random(0)
        paragraphs = corpus(400)
        rows = [(f"p{i}", " ".join((paragraphs[i % len(paragraphs)] + " " + paragraphs[(7 * i + 3) % len(paragraphs)])
                                   .split()[: rng.randint(*spec["words"])])) for i in range(spec["passages"])]
        step("encoder load time")
        t = time.perf_counter()
        comp = Compressor.from_pretrained(encoder, device=device, dtype=spec["dtype"])
        synchronize(comp.device)
        load_s = time.perf_counter() - t
        batch = [text for _, text in rows[: spec["batch"]]]
        comp.compress(batch)  # warm-up
        synchronize(comp.device)
        t = time.perf_counter()
        comp.compress(batch)
        synchronize(comp.device)  # the device's queued work is part of the batch's time
        batch_s = time.perf_counter() - t
        del comp
        result: dict = {"preset": args.preset, "scale": args.scale, "machine": machine(), "encoder": asdict(cfg),
                        "passages": len(rows), "batch_size": spec["batch"], "encoder_load_s": load_s,
                        "one_batch_compute_s": batch_s}
        stem = f"corpus-{args.preset}" + ("-small" if args.scale == "small" else "")
        step("engine=local")
        local = compress_corpus(rows, work / "local", encoder=encoder, batch_size=spec["batch"], show_progress=False,
                                dtype=spec["dtype"], device=device)
        result["local"] = {"seconds": local.seconds, "tokens": local.tokens, "tokens_per_s": local.tokens_per_s}
        save_results(args.out, stem, result, markdown(result), echo=False)
        shutil.rmtree(work / "local")
        step("engine=ray")
        t = time.perf_counter()
        ray.init(num_cpus=None if gpus else torch.get_num_threads(), include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t
        workers = gpus or 2
        remote = compress_corpus(rows, work / "ray", encoder=encoder, batch_size=spec["batch"], engine="ray",
                                 num_workers=workers, show_progress=False, dtype=spec["dtype"])
        ray.shutdown()
        result["ray"] = {"workers": workers, "gpus_per_worker": 1 if gpus else 0, "ray_init_s": init_s,
                         "seconds": remote.seconds, "tokens": remote.tokens, "tokens_per_s": remote.tokens_per_s}
        result["ray_over_local"] = remote.tokens_per_s / local.tokens_per_s
    save_results(args.out, stem, result, markdown(result))


def markdown(r: dict) -> str:
    """The results table, with the sections finished so far."""
    e, lo = r["encoder"], r["local"]
    lines = [
        f"# Corpus compression benchmark — preset `{r['preset']}`{' (small scale)' if r['scale'] == 'small' else ''}", "",
        f"Machine: {r['machine'].get('gpu', r['machine']['cpu'])}, {r['machine']['cores']} cores, torch "
        f"{r['machine']['torch']}. Encoder: dim {e['dim']} x {e['n_layers']} blocks, random weights, Llama 3 "
        f"tokenizer. {r['passages']:,} passages, work units of {r['batch_size']}, codec bottleneck-float16.", "",
        "| measure | value |", "| --- | --- |",
        f"| `engine=\"local\"` (this process, {r['machine']['threads']} threads) | {lo['tokens_per_s']:,.0f} tokens/s "
        f"({lo['tokens']:,} tokens in {lo['seconds']:.1f} s) |",
    ]
    if "ray" in r:
        ra = r["ray"]
        workers = f"{ra['workers']} actors" + (f" x {ra['gpus_per_worker']} GPU" if ra["gpus_per_worker"] else
                                              " of one thread each")
        lines += [f"| `engine=\"ray\"`, {workers} | {ra['tokens_per_s']:,.0f} tokens/s ({ra['seconds']:.1f} s; "
                  f"{r['ray_over_local']:.2f}x local) |",
                  f"| starting the local Ray cluster | {ra['ray_init_s']:.1f} s |"]
    lines.append(f"| per actor, before its first batch: loading the encoder | {r['encoder_load_s']:.2f} s (one batch of "
                 f"{r['batch_size']} passages computes in {r['one_batch_compute_s']:.2f} s) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
