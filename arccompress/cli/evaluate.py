"""`arccompress eval`: exact match and F1 on a QA set, compressed vs full text vs closed book."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError, NotFoundError
from .options import (add_encoder_options, add_storage_options, load_compressor, load_engine, positive_float,
                      positive_int, resolve_models, storage_options)


def fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], not {text}")
    return value


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval", parents=[common],
                       help="exact match and F1 on a QA set: compressed vs full text vs closed book")
    add_encoder_options(p, decoder=True)
    p.add_argument("--data", required=True, help="JSONL or Parquet rows {question, answers, passages and/or "
                                                 "passage_ids}")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--quantization", choices=["4bit", "8bit"],
                   help="load the decoder quantized (bitsandbytes); --backend vllm: 4bit only")
    p.add_argument("--gpu-memory-utilization", type=fraction,
                   help="--backend vllm on a GPU: vLLM's share of the GPU's memory (vLLM's default 0.9)")
    p.add_argument("--kv-cache-gib", type=positive_float,
                   help="--backend vllm on a CPU: the KV cache's size in GiB (default 1)")
    p.add_argument("--modes", default="compressed,full,closed",
                   help="comma-separated: compressed, full (needs the passages' text), closed")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples per prompt (default 5, as the paper)")
    p.add_argument("--limit", type=positive_int, help="score only the first N questions (a quick look)")
    p.add_argument("--seed", type=int, default=0, help="which rows become the few-shot examples")
    p.add_argument("--chunk-size", type=positive_int, help="compress passages in chunks of this many tokens")
    p.add_argument("--store", help="a context store holding the rows' passage_ids (read in compressed mode): a "
                                   "folder or an s3://, gs://, az:// URI")
    add_storage_options(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--batch-size", type=positive_int, default=16, help="questions generated together (default 16)")
    p.add_argument("--output", help="folder for predictions (resumable), report.json, report.md, report.png")
    p.add_argument("--overwrite", action="store_true",
                   help="--output holds another run's predictions (other data, models or settings): replace them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def check_arguments(args: argparse.Namespace) -> None:
    """Options that cannot work together, refused before anything is loaded."""
    if args.backend == "vllm" and args.quantization == "8bit":
        raise InputError("--quantization 8bit with --backend vllm: vLLM quantizes in flight to 4 bits only "
                         "(bitsandbytes); use --quantization 4bit, or --backend transformers for 8 bits")
    vllm_only = [f"--{k.replace('_', '-')}" for k in ("gpu_memory_utilization", "kv_cache_gib") if getattr(args, k)]
    if vllm_only and args.backend != "vllm":
        raise InputError(f"{' and '.join(vllm_only)} set vLLM's memory: they go with --backend vllm")
    if args.overwrite and not args.output:
        raise InputError("--overwrite replaces the predictions in --output: give --output")


def run(args: argparse.Namespace) -> int:
    from ..eval import Questions, check_modes, evaluate, load_rows, parse_modes
    from ..store import ContextStore

    check_arguments(args)
    resolve_models(args)
    # the data, the modes and the store checked before any model is loaded
    modes = parse_modes([m.strip() for m in args.modes.split(",") if m.strip()])
    rows = load_rows(args.data)
    options = storage_options(args)
    if args.store and not ContextStore.exists(args.store, storage_options=options):
        raise NotFoundError(f"no store at {args.store}")
    questions = Questions.select(len(rows), shots=args.shots, seed=args.seed, limit=args.limit)
    check_modes(modes, rows, questions, ContextStore(args.store, storage_options=options) if args.store else None)
    comp = load_compressor(args)
    gen = load_engine(args, comp)
    store = ContextStore(args.store, compressor=comp, storage_options=options) if args.store else None
    report = evaluate(args.data, generator=gen, modes=modes, shots=args.shots, limit=args.limit, seed=args.seed,
                      chunk_size=args.chunk_size, store=store, output=args.output, batch_size=args.batch_size,
                      overwrite=args.overwrite, max_new_tokens=args.max_new_tokens,
                      show_progress=not args.no_progress)
    print(report.table())
    for note in report.notes:
        print(f"arccompress eval: note: {note}", file=sys.stderr)
    if args.output:
        print(f"\nreport: {', '.join(str(f) for f in report.files)}")
        if report.plot_skipped:
            print(f"arccompress eval: note: no report.png: {report.plot_skipped}", file=sys.stderr)
    return 0
