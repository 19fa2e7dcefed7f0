"""`arccompress compress`: a corpus into a context store, resumable, in this process or on Ray."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import NotFoundError
from .info import print_store
from .options import add_encoder_options, compressor_kwargs, positive_int, resolve_models


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("compress", parents=[common],
                       help="compress a corpus into a context store (resumable; local or on Ray)")
    add_encoder_options(p, decoder=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jsonl", help="a JSONL file of {id, text} rows")
    src.add_argument("--parquet", help="a Parquet file (or folder of them) with id and text columns")
    src.add_argument("--files", nargs="+", help="text files, one document each (id = file path)")
    p.add_argument("--id-field", default="id", help="field holding the id (default: id)")
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument("--store", required=True, help="the store folder (created or continued)")
    p.add_argument("--codec", help="how a new store keeps contexts: bottleneck-float16 (default), int8, pq, float16, "
                                   "encoder-float16, ... (see the README)")
    p.add_argument("--bits-per-dim", type=float, help="pq codec: 2, 1 (default) or 0.5 bits per dimension")
    p.add_argument("--store-dtype", choices=["float32", "float16", "bfloat16"], help=argparse.SUPPRESS)  # 0.1's name
    p.add_argument("--chunk-size", type=positive_int, help="compress in chunks of this many tokens")
    p.add_argument("--batch-size", type=positive_int, default=256, help="texts per work unit and fragment")
    p.add_argument("--on-bad-row", choices=["raise", "skip"], default="raise",
                   help="a row without id or text, or with a repeated id: stop before compressing (raise) or skip it")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="this process, or a Ray cluster")
    p.add_argument("--address", help="--engine ray: the cluster to join (e.g. auto); default: a new local one")
    p.add_argument("--num-workers", type=positive_int, help="--engine ray: encoder actors (default: one per GPU)")
    p.add_argument("--num-gpus-per-worker", type=float, help="--engine ray: GPUs per actor (default 1 with GPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..corpus import compress_corpus

    resolve_models(args)
    if args.files:
        source = []
        for f in args.files:
            path = Path(f)
            if not path.is_file():
                raise NotFoundError(f"no such file {path}")
            source.append((str(path), path.read_text(encoding="utf-8", errors="surrogateescape")))
    else:
        source = args.jsonl or args.parquet
    summary = compress_corpus(
        source, args.store, encoder=args.encoder, codec=args.codec or args.store_dtype, bits_per_dim=args.bits_per_dim,
        engine=args.engine, num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
        batch_size=args.batch_size, chunk_size=args.chunk_size, on_bad_row=args.on_bad_row, id_field=args.id_field,
        text_field=args.text_field, address=args.address, show_progress=not args.no_progress,
        **compressor_kwargs(args),
    )
    print(summary)
    for row in summary.bad_rows[:20]:
        print(f"  skipped {row}", file=sys.stderr)
    if len(summary.bad_rows) > 20:
        print(f"  ... and {len(summary.bad_rows) - 20} more bad rows", file=sys.stderr)
    return print_store(args.store)
