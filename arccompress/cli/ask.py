"""`arccompress ask`: one question answered from compressed documents, in the paper's few-shot QA format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError, NotFoundError
from .options import (add_encoder_options, add_storage_options, load_compressor, load_engine, positive_int,
                      resolve_models, storage_options)


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ask", parents=[common],
                       help="answer a question from compressed documents (paper's few-shot QA format)")
    add_encoder_options(p, decoder=True)
    p.add_argument("--question", required=True)
    docs = p.add_mutually_exclusive_group(required=True)
    docs.add_argument("--store", help="a context store made by `arccompress compress` (with --ids): a folder or an "
                                      "s3://, gs://, az:// URI")
    docs.add_argument("--files", nargs="+", help="text files to compress as documents")
    docs.add_argument("--text", nargs="+", help="document texts to compress")
    p.add_argument("--ids", nargs="+", help="with --store: the ids of the contexts to read")
    p.add_argument("--all-contexts", action="store_true",
                   help="with --store: put every context of the store in the prompt (small stores only)")
    p.add_argument("--examples", help="JSONL of few-shot examples with document, question, answer fields")
    p.add_argument("--chunk-size", type=positive_int, help="compress documents in chunks of this many tokens")
    p.add_argument("--quantization", choices=["4bit", "8bit"], help="load the decoder quantized (bitsandbytes)")
    p.add_argument("--server", help="a vLLM server's URL (http://host:8000/v1) started with --enable-prompt-embeds")
    p.add_argument("--model", help="with --server: the served model name (default: the only one)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--full-output", action="store_true", help="print everything generated, not only the answer")
    add_storage_options(p)
    p.set_defaults(run=run)


def check_arguments(args: argparse.Namespace) -> None:
    """Contradictory or incomplete document options, refused before anything is loaded."""
    if args.store and not args.ids and not args.all_contexts:
        raise InputError("--store needs --ids (the contexts to read), or --all-contexts to read every one")
    if args.store and args.ids and args.all_contexts:
        raise InputError("give --ids or --all-contexts, not both")
    if not args.store and (args.ids or args.all_contexts):
        raise InputError(f"{'--ids' if args.ids else '--all-contexts'} reads a store: it goes with --store, not with "
                         f"{'--files' if args.files else '--text'}")
    if args.server and args.quantization:
        raise InputError("--quantization loads a local decoder; with --server the server's own settings apply")
    if args.model and not args.server:
        raise InputError("--model names a served model: it goes with --server")


def read_examples(path: str) -> list[tuple[str, str, str]]:
    from ..sources import JsonlFile, read_records

    examples = []
    for where, e in read_records(JsonlFile(path)):
        missing = [k for k in ("document", "question", "answer") if k not in e]
        if missing:
            raise InputError(f"{where}: an example needs document, question and answer; missing {', '.join(missing)}")
        examples.append((e["document"], e["question"], e["answer"]))
    return examples


def run(args: argparse.Namespace) -> int:
    from ..prompts import fewshot_qa_prompt, first_answer
    from ..store import ContextStore

    check_arguments(args)
    resolve_models(args)
    comp = load_compressor(args)
    gen = load_engine(args, comp)
    if args.store:
        if not ContextStore.exists(args.store, storage_options=storage_options(args)):
            raise NotFoundError(f"no store at {args.store}")
        store = ContextStore(args.store, compressor=comp, storage_options=storage_options(args))
        documents = store.get_many(args.ids or store.keys(), device=comp.device)
    else:
        texts = [Path(f).read_text(encoding="utf-8").strip() for f in args.files] if args.files else \
            [t.strip() for t in args.text]
        # compressed once here, so that generating and counting the savings share the contexts
        documents = comp.compress(texts, chunk_size=args.chunk_size)
    if not documents:
        raise InputError("no documents: give --store, --files or --text")
    examples = read_examples(args.examples) if args.examples else []
    parts = fewshot_qa_prompt(args.question, documents, examples)
    text = gen.generate(parts, max_new_tokens=args.max_new_tokens)
    print(text if args.full_output else first_answer(text))
    s = gen.savings(parts)
    text_tokens = f"~{s.context_text_tokens} (encoder tokens)" if s.estimated else str(s.context_text_tokens)
    print(f"[contexts: {text_tokens} text tokens -> {s.context_embeddings} embeddings; prompt {s.prompt_length} "
          "positions]", file=sys.stderr)
    return 0
