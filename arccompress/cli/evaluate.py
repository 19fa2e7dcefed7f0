"""`arccompress eval`: exact match and F1 on a QA set, compressed vs full text vs closed book."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_encoder_options, load_compressor, positive_int, resolve_models


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval", parents=[common],
                       help="exact match and F1 on a QA set: compressed vs full text vs closed book")
    add_encoder_options(p, decoder=True)
    p.add_argument("--data", required=True, help="JSONL or Parquet rows {question, answers, passages or passage_ids}")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--quantization", choices=["4bit", "8bit"], help="transformers: bitsandbytes; vllm: 4bit only")
    p.add_argument("--modes", default="compressed,full,closed", help="comma-separated: compressed, full, closed")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples per prompt (default 5, as the paper)")
    p.add_argument("--limit", type=positive_int, help="score only the first N questions (a quick look)")
    p.add_argument("--seed", type=int, default=0, help="which rows become the few-shot examples")
    p.add_argument("--chunk-size", type=positive_int, help="compress passages in chunks of this many tokens")
    p.add_argument("--store", help="a context store holding the rows' passage_ids")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--output", help="folder for predictions (resumable), report.json, report.md, report.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import evaluate, load_rows

    resolve_models(args)
    comp = load_compressor(args)
    if args.backend == "vllm":
        from ..vllm import VLLMGenerator

        kwargs = {"quantization": "bitsandbytes"} if args.quantization else {}
        gen = VLLMGenerator.from_pretrained(args.decoder, compressor=comp, **kwargs)
    else:
        from ..generation import Generator

        gen = Generator.from_pretrained(args.decoder, compressor=comp, quantization=args.quantization,
                                        local_files_only=args.offline or None)
    store = None
    if args.store:
        from ..store import ContextStore

        store = ContextStore(args.store, compressor=comp)
    report = evaluate(load_rows(args.data), generator=gen, modes=args.modes.split(","), shots=args.shots,
                      limit=args.limit, seed=args.seed, chunk_size=args.chunk_size, store=store, output=args.output,
                      max_new_tokens=args.max_new_tokens, show_progress=not args.no_progress)
    print(report.table())
    if args.output:
        print(f"\nreport: {Path(args.output) / 'report.md'}, {Path(args.output) / 'report.json'}, "
              f"{Path(args.output) / 'report.png'}")
    return 0
