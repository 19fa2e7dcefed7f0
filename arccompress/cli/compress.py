"""`arccompress compress`: a corpus into a context store, resumable, in this process or on Ray."""

from __future__ import annotations

import argparse
import sys

from .info import print_store
from .options import add_encoder_options, add_storage_options, compressor_kwargs, positive_int, resolve_models, \
    storage_options


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
    p.add_argument("--store", required=True,
                   help="the store (created or continued): a folder or an s3://, gs://, az:// URI")
    add_storage_options(p)
    p.add_argument("--codec", help="how a new store keeps contexts: bottleneck-float16 (default), int8, pq, float16, "
                                   "encoder-float16, ... (see the README)")
    p.add_argument("--bits-per-dim", type=float, help="pq codec: 2, 1 (default) or 0.5 bits per dimension")
    p.add_argument("--store-dtype", choices=["float32", "float16", "bfloat16"], help=argparse.SUPPRESS)  # 0.1's name
    p.add_argument("--chunk-size", type=positive_int, help="compress in chunks of this many tokens")
    p.add_argument("--batch-size", type=positive_int, default=256, help="texts per work unit and fragment")
    p.add_argument("--on-bad-row", choices=["raise", "skip"], default="raise",
                   help="a row whose id is not a string or an integer, whose text is empty or unreadable, or whose id "
                        "another row carries too: stop before compressing anything (raise, the default), or leave "
                        "it out and list it (skip)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="this process, or a Ray cluster")
    p.add_argument("--address", help="--engine ray: the cluster to join (e.g. auto); default: a new local one")
    p.add_argument("--num-workers", type=positive_int, help="--engine ray: encoder actors (default: one per GPU)")
    p.add_argument("--num-gpus-per-worker", type=float, help="--engine ray: GPUs per actor (default 1 with GPUs)")
    p.add_argument("--num-cpus-per-worker", type=float, help="--engine ray: CPUs per actor (default 1 with GPUs, "
                                                             "else a share of the cluster's)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..corpus import compress_corpus
    from ..sources import TextFiles

    resolve_models(args)
    source = TextFiles(args.files, fields=(args.id_field, args.text_field)) if args.files else \
        args.jsonl or args.parquet
    summary = compress_corpus(
        source, args.store, encoder=args.encoder, codec=args.codec or args.store_dtype, bits_per_dim=args.bits_per_dim,
        engine=args.engine, num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
        num_cpus_per_worker=args.num_cpus_per_worker, batch_size=args.batch_size, chunk_size=args.chunk_size,
        on_bad_row=args.on_bad_row, id_field=args.id_field, text_field=args.text_field, address=args.address,
        show_progress=not args.no_progress, verbose=args.verbose, storage_options=storage_options(args),
        **compressor_kwargs(args),
    )
    print(summary)
    for row in summary.bad_rows[:20]:
        print(f"  left out {row}", file=sys.stderr)
    if len(summary.bad_rows) > 20:
        print(f"  ... and {len(summary.bad_rows) - 20} more bad rows", file=sys.stderr)
    return print_store(args.store, storage_options(args))
