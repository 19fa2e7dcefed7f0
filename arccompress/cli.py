"""The `arccompress` command: compress, ask, info, demo."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__

USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError, IsADirectoryError)


def _encoder_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", required=True, help="ARC-Encoder hub id or local directory")
    g.add_argument("--tokenizer", help="encoder tokenizer (path or hub id); default: the checkpoint's or Llama-3.2-3B's")
    g.add_argument("--head", help="encoder head: an index, or llama / mistral for two-head encoders")
    g.add_argument("--backbone-params", help="research layout: the backbone's params.json")
    g.add_argument("--device", help="cuda, cpu, ...; default: cuda when available")
    g.add_argument("--dtype", help="compute dtype; default bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--offline", action="store_true", help="use only the local Hugging Face cache")


def _load_compressor(args: argparse.Namespace):
    from .compressor import Compressor

    head = int(args.head) if args.head is not None and args.head.isdigit() else args.head
    return Compressor.from_pretrained(
        args.encoder, tokenizer=args.tokenizer, decoder=head, device=args.device, dtype=args.dtype,
        backbone_params=args.backbone_params, local_files_only=args.offline or None,
    )


def _read_documents(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(ids, texts) from --jsonl or --files."""
    if args.jsonl:
        ids, texts = [], []
        path = Path(args.jsonl)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
                if args.text_field not in record:
                    raise ValueError(f"{path}:{n}: no {args.text_field!r} field")
                ids.append(str(record.get(args.id_field, n)))
                texts.append(record[args.text_field])
        return ids, texts
    texts = [Path(f).read_text(encoding="utf-8") for f in args.files]
    return [str(f) for f in args.files], texts


def cmd_compress(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .store import ContextStore

    ids, texts = _read_documents(args)
    if len(set(ids)) != len(ids):
        raise ValueError("document ids are not unique")
    comp = _load_compressor(args)
    with ContextStore(args.store, dtype=args.store_dtype, compressor=comp, flush_every=args.batch_size) as store:
        todo = [(i, t) for i, t in zip(ids, texts) if i not in store]
        skipped = len(ids) - len(todo)
        start = time.perf_counter()
        with tqdm(total=len(todo), unit="doc", desc="compress", disable=args.no_progress) as bar:
            for k in range(0, len(todo), args.batch_size):
                batch = todo[k: k + args.batch_size]
                contexts = comp.compress([t for _, t in batch], chunk_size=args.chunk_size, show_progress_bar=False)
                store.add_many([i for i, _ in batch], contexts)
                store.flush()  # one shard per batch: a crash loses at most this batch
                bar.update(len(batch))
        elapsed = time.perf_counter() - start
    stats = store.stats()
    print(f"compressed {len(todo)} documents ({skipped} already stored) in {elapsed:.1f}s into {args.store}")
    print(f"store: {stats['contexts']} contexts, {stats['tokens']} tokens -> {stats['embeddings']} embeddings; "
          f"{stats['bytes_per_token']:.1f} bytes/token stored ({store.manifest['dtype']}) vs "
          f"{stats['text_bytes_per_token']:.1f} bytes/token of raw text")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .generation import Generator, fewshot_qa_prompt, first_answer
    from .store import ContextStore

    comp = _load_compressor(args)
    gen = Generator.from_pretrained(args.decoder, compressor=comp, quantization=args.quantization,
                                    local_files_only=args.offline or None)
    if args.store:
        store = ContextStore(args.store, compressor=comp)
        keys = args.ids or store.keys()
        missing = [k for k in keys if k not in store]
        if missing:
            raise KeyError(f"not in {args.store}: {', '.join(missing[:5])}")
        documents = [store.get(k, device=comp.device) for k in keys]
    else:
        texts = [Path(f).read_text(encoding="utf-8").strip() for f in args.files] if args.files else \
            [t.strip() for t in args.text]
        # compressed once here, so that generating and counting the savings share the contexts
        documents = comp.compress(texts, chunk_size=args.chunk_size)
    if not documents:
        raise ValueError("no documents: give --store, --files or --text")
    examples = []
    if args.examples:
        with open(args.examples, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    e = json.loads(line)
                    examples.append((e["document"], e["question"], e["answer"]))
    parts = fewshot_qa_prompt(args.question, documents, examples)
    text = gen.generate(parts, max_new_tokens=args.max_new_tokens)
    print(text if args.full_output else first_answer(text))
    s = gen.savings(parts)
    note = f"{s.context_text_tokens} text tokens -> " if s.context_text_tokens is not None else ""
    print(f"[contexts: {note}{s.context_embeddings} embeddings; prompt {s.prompt_length} positions]", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import read_checkpoint, resolve_directory
    from .encoder import ARCEncoder, num_parameters

    directory = resolve_directory(args.name, local_files_only=args.offline or None)
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
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .compressor import Compressor
    from .generation import Generator, fewshot_qa_prompt
    from .tiny import build_tiny_pair
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars of a 1 MB model are noise here
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="arccompress-demo-"))
    print("arccompress demo: a tiny ARC-Encoder and decoder with RANDOM weights, built on the spot (no download).")
    print("Every step is the real pipeline; the generated text is noise because the weights are random.\n")
    encoder, decoder = build_tiny_pair(workdir)
    comp = Compressor.from_pretrained(encoder)
    print(f"encoder   {comp}")
    gen = Generator.from_pretrained(decoder, compressor=comp)
    print(f"decoder   {gen.model.config.model_type}, hidden size {gen.model.config.hidden_size}, at {decoder}\n")
    docs = [
        "The Loire is the longest river in France. It rises in the Massif Central and flows 1,006 km "
        "north and then west to the Atlantic Ocean at Saint-Nazaire.",
        "Mont Blanc, at 4,806 metres, is the highest mountain in the Alps and in Western Europe.",
    ]
    contexts = comp.compress(docs)
    for ctx in contexts:
        print(f"compress  {ctx.num_tokens:>4} tokens -> {ctx.num_embeddings:>3} embeddings "
              f"({ctx.compression_ratio:.1f}x)  {ctx.text[:48]!r}...")
    prompt = fewshot_qa_prompt("How long is the Loire?", contexts[0],
                               examples=[(contexts[1], "How high is Mont Blanc?", "4,806 metres")])
    s = gen.savings(prompt)
    print(f"\nprompt    few-shot QA, {s.num_contexts} compressed documents: {s.prompt_length} decoder positions "
          f"instead of {s.full_text_prompt_length} with the full text")
    answer = gen.generate(prompt, max_new_tokens=16)
    print(f"generate  {answer!r}")
    print(f"\nfiles in  {workdir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arccompress", description=__doc__)
    parser.add_argument("--version", action="version", version=f"arccompress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress documents into a context store (resumable)")
    _encoder_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jsonl", help="a JSONL file with one document per line")
    src.add_argument("--files", nargs="+", help="text files, one document each (id = file path)")
    p.add_argument("--id-field", default="id", help="JSONL field holding the id (default: id)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--store", required=True, help="the store folder (created or continued)")
    p.add_argument("--store-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="storage dtype of a new store (default float32)")
    p.add_argument("--chunk-size", type=int, help="compress in chunks of this many tokens")
    p.add_argument("--batch-size", type=int, default=64, help="documents per batch and per shard")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("ask", help="answer a question from compressed documents (paper's few-shot QA format)")
    _encoder_options(p)
    p.add_argument("--decoder", required=True, help="decoder model: hub id or local directory")
    p.add_argument("--question", required=True)
    docs = p.add_mutually_exclusive_group(required=True)
    docs.add_argument("--store", help="a context store made by `arccompress compress`")
    docs.add_argument("--files", nargs="+", help="text files to compress as documents")
    docs.add_argument("--text", nargs="+", help="document texts to compress")
    p.add_argument("--ids", nargs="+", help="with --store: which contexts (default: all)")
    p.add_argument("--examples", help="JSONL of few-shot examples with document, question, answer fields")
    p.add_argument("--chunk-size", type=int, help="compress documents in chunks of this many tokens")
    p.add_argument("--quantization", choices=["4bit", "8bit"], help="load the decoder quantized (bitsandbytes)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--full-output", action="store_true", help="print everything generated, not only the answer")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("info", help="describe an ARC-Encoder checkpoint")
    p.add_argument("name", help="hub id or local directory")
    p.add_argument("--backbone-params", help="research layout: the backbone's params.json")
    p.add_argument("--offline", action="store_true", help="use only the local Hugging Face cache")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the whole pipeline on a tiny random checkpoint built on the spot")
    p.add_argument("--workdir", help="where to build the tiny checkpoints (default: a temporary folder)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"arccompress {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"arccompress {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
