"""`arccompress info` (a checkpoint or a store) and `arccompress convert` (a store of arccompress 0.1 to 0.3, once)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import NotFoundError
from .options import add_storage_options, storage_options


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("info", parents=[common], help="describe an ARC-Encoder checkpoint or a context store")
    p.add_argument("name", help="hub id or local folder of a checkpoint, or a store (a folder or an s3://, gs://, "
                                "az:// URI)")
    p.add_argument("--backbone-params", help="research layout: the backbone's params.json")
    p.add_argument("--revision", help="hub revision")
    p.add_argument("--token", help="Hugging Face token")
    p.add_argument("--offline", action="store_true", help="use only the local Hugging Face cache")
    add_storage_options(p)
    p.set_defaults(run=run_info)

    p = sub.add_parser("convert", parents=[common],
                       help="copy a store of arccompress 0.1, 0.2 or 0.3 into the current format (a Lance dataset), "
                            "once")
    p.add_argument("old", help="the old store folder (0.1: index.jsonl and safetensors shards; 0.2 and 0.3: "
                               "manifest.json and data/*.parquet)")
    p.add_argument("new", help="the new store: a folder or an s3://, gs://, az:// URI (--storage-option reaches it)")
    p.add_argument("--codec", help="0.1 stores only: a decoder-space codec (float32, float16 (default), bfloat16, "
                                   "decoder-int8); a 0.2 or 0.3 store keeps its own")
    add_storage_options(p)
    p.set_defaults(run=run_convert)


def print_rows(rows: list[tuple[str, str]]) -> int:
    """`name  value` lines, the values aligned."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def print_store(path: str | Path, options: dict[str, str] | None = None) -> int:
    from ..store import ContextStore
    from ..store.manifest import unfinished, unfinished_advice

    store = ContextStore(path, storage_options=options)
    s = store.stats()
    m = store.manifest or {}
    rows = [
        ("store", f"{path} (version {s['version']})"), ("contexts", f"{s['contexts']:,}"), ("codec", s["codec"]),
        ("encoder", f"{m.get('encoder')} (weights {m.get('encoder_fingerprint')})"),
        ("head", "every head" if m.get("head") is None else str(m.get("head"))),
        ("tokens", f"{s['tokens']:,} -> {s['embeddings']:,} embeddings"),
        ("on disk", f"{s['data_bytes'] / 1e6:,.2f} MB in {s['fragments']} data files "
                    f"(+ {s['codec_bytes'] / 1e6:.2f} MB codec file)"),
        ("bytes per token", f"{s['bytes_per_token']:.2f} stored vs " + (
            f"{s['text_bytes_per_token']:.2f} of raw UTF-8 text" if s["text_bytes_per_token"] is not None else
            "raw text of unknown size (its contexts were stored without their text)")),
    ]
    if s["text_bytes_per_token"] is not None and s["text_tokens"] < s["tokens"]:
        rows.append(("raw text", f"known for {s['text_tokens']:,} of the {s['tokens']:,} tokens"))
    if s["duplicates"]:
        rows.append(("shadowed", f"{s['duplicates']} rows repeat an id (the first committed is read; `arccompress "
                                 "store compact` drops them)"))
    source = unfinished(m)
    if source is not None:
        rows.append(("INCOMPLETE", unfinished_advice(store.location, source)))
    return print_rows(rows)


def run_info(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import ENCODER_FILES, read_checkpoint
    from ..encoder import ARCEncoder, num_parameters
    from ..hub import is_hub_id, resolve_folder
    from ..store import ContextStore

    path = Path(args.name)
    if "://" in args.name or ContextStore.exists(path):
        return print_store(args.name, storage_options(args))
    if not path.exists() and not is_hub_id(args.name):
        raise NotFoundError(f"{args.name}: no such folder (neither a context store nor a checkpoint)")
    directory = resolve_folder(args.name, what="checkpoint", revision=args.revision, token=args.token,
                               local_files_only=args.offline or None, allow_patterns=ENCODER_FILES)
    ckpt = read_checkpoint(args.name, directory, backbone_params=args.backbone_params)
    c = ckpt.config
    with torch.device("meta"):
        params = num_parameters(ARCEncoder(c))
    heads = "0 = Llama-3.1-8B, 1 = Mistral-7B" if c.num_decoders == 2 else "1"
    rows = [
        ("checkpoint", args.name), ("directory", str(directory)), ("layout", ckpt.layout),
        ("weights dtype", ckpt.disk_dtype()), ("weights hash", ckpt.fingerprint()),
        ("parameters", f"{params:,}"),
        ("encoder", f"{c.n_layers} blocks, dim {c.dim}, {c.n_heads} heads / {c.n_kv_heads} kv, head dim "
                    f"{c.head_dim}, MLP {c.hidden_dim}, vocab {c.vocab_size}, rope theta {c.rope_theta:g}"),
        ("pooling factor", str(c.pooling_factor)),
        ("decoder heads", heads), ("decoder hidden size", str(c.decoder_hidden_size)),
        ("head MLP", f"{c.dim} -> {c.bridge_hidden_dim} -> {c.decoder_hidden_size} (no activation)"),
    ]
    return print_rows(rows)


def run_convert(args: argparse.Namespace) -> int:
    from ..store import ContextStore

    ContextStore.convert(args.old, args.new, codec=args.codec, storage_options=storage_options(args))
    return print_store(args.new, storage_options(args))
