"""`arccompress serve`: the OpenAI-compatible RAG service, on this machine (uvicorn) or on Ray Serve."""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from ..errors import InputError, NotFoundError
from .options import add_encoder_options, compressor_kwargs, positive_float, positive_int, resolve_models

if TYPE_CHECKING:  # the service's modules (FastAPI, pydantic) load only when the command runs
    from ..serve import ServiceConfig


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve compressed RAG over OpenAI's API: text or stored ids in, "
                                                       "answers out")
    add_encoder_options(p, decoder=True)
    p.add_argument("--store", help="a context store the clients may name documents from, by id")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="the engine that generates (vllm: continuous batching, prefix caching)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--api-key", help="clients must send it as a bearer token (default: $ARCCOMPRESS_API_KEY, if set)")
    p.add_argument("--graceful-timeout", type=positive_int, default=300,
                   help="on SIGTERM, seconds the requests in flight may take to finish (default 300)")
    p.add_argument("--served-model-name", help="the model name clients use (default: the decoder's folder name)")
    _add_engine_options(p)
    _add_upstream_options(p)
    _add_throughput_options(p)
    _add_limit_options(p)
    _add_ray_options(p)
    p.set_defaults(run=run)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """The engine's options, passed to the backend."""
    g = p.add_argument_group("engine (passed to the backend)")
    g.add_argument("--quantization", help="transformers: 4bit or 8bit (bitsandbytes); vllm: 4bit "
                                          "(bitsandbytes in flight) or its own methods (awq, gptq, fp8, ...)")
    g.add_argument("--max-model-len", type=positive_int, help="vllm: the context length to allocate for")
    g.add_argument("--tensor-parallel-size", type=positive_int, help="vllm: GPUs per replica")
    g.add_argument("--gpu-memory-utilization", type=positive_float, help="vllm: its share of GPU memory (0-1)")
    g.add_argument("--kv-cache-gib", type=positive_float,
                   help="vllm: GiB of KV cache (on a CPU, 1 unless VLLM_CPU_KVCACHE_SPACE is set)")
    g.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs / torch.compile")
    g.add_argument("--block-size", type=positive_int, help="vllm: positions per KV-cache block (prefix caching shares "
                                                            "whole blocks; default 16 on GPUs, 32 here on a CPU)")


def _add_upstream_options(p: argparse.ArgumentParser) -> None:
    """The upstreams: vLLM servers that generate, in front of which this server compresses."""
    g = p.add_argument_group("upstreams: vLLM servers that generate, in front of which this server compresses")
    g.add_argument("--upstream", action="append", metavar="URL",
                   help="a vLLM OpenAI server (http://host:port, with or without /v1) of the decoder, started with "
                        "--enable-prompt-embeds and reachable by this server alone; repeat for several. This server "
                        "keeps the decoder's tokenizer and input embeddings, never its other weights")
    g.add_argument("--upstream-api-key", help="the upstreams' API key (default: $ARCCOMPRESS_UPSTREAM_API_KEY, if set)")
    g.add_argument("--upstream-model", help="the upstreams' model name (default: their only one)")
    g.add_argument("--routing", choices=["documents", "prompt", "round-robin"], default="documents",
                   help="documents (default): requests with the same leading content (instructions, examples, then the "
                        "same first document) go to the same upstream, whose prefix cache holds it; prompt: only "
                        "identical prompts do; round-robin: in turn")
    g.add_argument("--load-factor", type=positive_float, default=1.25,
                   help="an upstream holding more than this times its share of the requests in flight passes work to "
                        "the next in the request's ranking (default 1.25)")
    g.add_argument("--upstream-timeout", type=positive_float, default=600.0,
                   help="seconds a request may take on the upstreams, failovers included (default 600)")
    g.add_argument("--health-interval", type=positive_float, default=5.0,
                   help="seconds between health probes of each upstream (default 5)")
    g.add_argument("--upstream-wait", type=non_negative, default=300.0,
                   help="seconds to wait at start for an upstream to answer (default 300)")


def _add_throughput_options(p: argparse.ArgumentParser) -> None:
    """Batching, the compression cache, the queue and the time a request may take."""
    g = p.add_argument_group("throughput and limits")
    g.add_argument("--batch-window-ms", type=positive_float, default=5.0,
                   help="how long concurrent requests' texts gather into one encoder call (default 5 ms)")
    g.add_argument("--batch-tokens", type=positive_int, default=16384, help="encoder tokens per compression batch")
    g.add_argument("--cache-mib", type=non_negative,
                   help="MiB of compressed texts kept for reuse (LRU; 0: none; default: 131,072 context rows of the "
                        "decoder's width, 1 GiB for a 4096-wide decoder in bfloat16)")
    g.add_argument("--max-batch", type=positive_int, default=32, help="transformers: sequences per generate")
    g.add_argument("--max-queued-requests", type=positive_int, default=512,
                   help="requests held at once (compressing, waiting or generating); past it 503 + Retry-After")
    g.add_argument("--request-timeout", type=positive_float,
                   help="seconds a request may run once its body arrived; past it, it is stopped (default: none)")


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    """The limits per request, each checked before the work it bounds."""
    g = p.add_argument_group("limits per request (each refused with a 4xx naming the field, before the work it bounds)")
    g.add_argument("--max-body-bytes", type=positive_int, default=16 << 20, help="request body size")
    g.add_argument("--max-json-values", type=positive_int, default=16384,
                   help="JSON values (objects, arrays, strings, numbers) in a body, counted as it is parsed")
    g.add_argument("--max-documents", type=positive_int, default=64, help="documents per request")
    g.add_argument("--max-document-chars", type=positive_int,
                   help="characters per document given as text, checked before tokenizing (default: 16 per token of "
                        "--max-document-tokens)")
    g.add_argument("--max-document-tokens", type=positive_int, default=16384, help="tokens per document given as text")
    g.add_argument("--max-prompt-chars", type=positive_int,
                   help="characters of a prompt's own text, checked before tokenizing (default: 16 per position of the "
                        "decoder's context)")
    g.add_argument("--max-stop", type=positive_int, default=8, help="stop strings per request")
    g.add_argument("--max-stop-chars", type=positive_int, default=1024, help="characters per stop string")


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    """Ray Serve."""
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--ray", action="store_true", help="run as a Ray Serve application (one engine per replica)")
    g.add_argument("--replicas", type=positive_int, default=1, help="--ray: replicas")
    g.add_argument("--gpus-per-replica", type=positive_float, help="--ray: GPUs per replica (default 1 if the "
                                                                   "cluster has GPUs)")
    g.add_argument("--address", help="--ray: the cluster to join (default: a new local one)")

def non_negative(text: str) -> float:
    """A finite number >= 0 (--cache-mib 0: no cache; --upstream-wait 0: no wait)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """What the engine gets: transformers' Generator.from_pretrained, vLLM's AsyncEngineArgs, or the upstreams'
    AsyncVLLMFleet.connect."""
    engine_flags = [f"--{k.replace('_', '-')}" for k in ("quantization", "max_model_len", "tensor_parallel_size",
                                                         "gpu_memory_utilization", "kv_cache_gib", "block_size")
                    if getattr(args, k) is not None] + (["--enforce-eager"] if args.enforce_eager else [])
    if args.upstream:
        if args.backend != "transformers" or engine_flags:
            given = (["--backend"] if args.backend != "transformers" else []) + engine_flags
            raise InputError(f"{', '.join(given)}: with --upstream the upstreams generate; give these to them")
        options = {"model": args.upstream_model, "routing": args.routing, "load_factor": args.load_factor,
                   "timeout": args.upstream_timeout, "health_interval": args.health_interval,
                   "wait": args.upstream_wait, "dtype": args.dtype, "local_files_only": args.offline or None}
        return {k: v for k, v in options.items() if v is not None}
    upstream_only = [flag for flag, given in (("--upstream-api-key", args.upstream_api_key),
                                              ("--upstream-model", args.upstream_model)) if given]
    if upstream_only:
        raise InputError(f"{', '.join(upstream_only)} configure upstreams: add --upstream URL")
    if args.backend == "transformers":
        vllm_only = [flag for flag in engine_flags if flag != "--quantization"]
        if vllm_only:
            raise InputError(f"{', '.join(vllm_only)} configure vLLM: add --backend vllm")
        if args.quantization not in (None, "4bit", "8bit"):
            raise InputError(f"--quantization {args.quantization}: the transformers backend takes 4bit or 8bit")
        options = {"quantization": args.quantization, "dtype": args.dtype, "device_map": None,
                   "local_files_only": args.offline or None}
        return {k: v for k, v in options.items() if v is not None}
    options = {"quantization": args.quantization, "dtype": args.dtype, "max_model_len": args.max_model_len,
               "tensor_parallel_size": args.tensor_parallel_size, "kv_cache_gib": args.kv_cache_gib,
               "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager or None,
               "block_size": args.block_size, "local_files_only": args.offline or None}
    return {k: v for k, v in options.items() if v is not None}


def config_from(args: argparse.Namespace) -> ServiceConfig:
    from ..serve import Limits, ServiceConfig

    api_key = args.api_key if args.api_key is not None else os.environ.get("ARCCOMPRESS_API_KEY") or None
    upstream_key = args.upstream_api_key if args.upstream_api_key is not None else \
        os.environ.get("ARCCOMPRESS_UPSTREAM_API_KEY") or None
    return ServiceConfig(
        encoder=str(args.encoder), decoder=str(args.decoder), store=args.store, backend=args.backend,
        served_name=args.served_model_name, api_key=api_key,
        encoder_options={k: v for k, v in compressor_kwargs(args).items() if v is not None},
        engine_options=engine_options(args),
        limits=Limits(max_body_bytes=args.max_body_bytes, max_json_values=args.max_json_values,
                      max_documents=args.max_documents, max_document_chars=args.max_document_chars,
                      max_document_tokens=args.max_document_tokens, max_prompt_chars=args.max_prompt_chars,
                      max_stop=args.max_stop, max_stop_chars=args.max_stop_chars),
        batch_window=args.batch_window_ms / 1000, batch_tokens=args.batch_tokens, cache_mib=args.cache_mib,
        max_batch=args.max_batch, max_queued_requests=args.max_queued_requests, request_timeout=args.request_timeout,
        verbose=args.verbose, upstreams=tuple(args.upstream or ()),
        upstream_api_key=upstream_key if args.upstream else None)


def run(args: argparse.Namespace) -> int:
    from ..store import ContextStore

    if not args.ray:
        check_port(args.host, args.port)  # before the models load (minutes, for real ones)
    resolve_models(args)
    config = config_from(args)
    if config.store is not None and not ContextStore.exists(config.store):
        raise NotFoundError(f"--store {config.store}: no context store there (make one with `arccompress compress`)")
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"arccompress serve: warning: binding {args.host} without --api-key: anyone who reaches it may use it",
              file=sys.stderr)
    if config.upstreams:
        check_upstreams_first(config)
    if args.ray:
        return run_on_ray(args, config)
    if args.replicas != 1 or args.gpus_per_replica is not None or args.address:
        raise InputError("--replicas, --gpus-per-replica and --address go with --ray")
    open_files_to_the_hard_limit()
    import uvicorn

    from ..serve import build_app

    # uvicorn stops on SIGTERM: no new connections, the requests in flight finish, the models are released; then
    # it raises the signal again for whoever handled it before: here, a note that this was the planned way out
    terminated = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: terminated.append(sig))
    try:
        # uvicorn's own lines say when the models are loaded and where it listens; requests are logged with --verbose
        uvicorn.run(build_app(config), host=args.host, port=args.port, log_level="info", access_log=args.verbose,
                    timeout_graceful_shutdown=args.graceful_timeout)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        print("arccompress serve: stopped by SIGTERM after finishing the requests in flight", file=sys.stderr)
    return 0


def check_port(host: str, port: int) -> None:
    """InputError when `host:port` cannot be listened on, before any model is loaded (uvicorn binds after)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}): another server may hold it; choose "
                         "another with --port") from None


def open_files_to_the_hard_limit() -> None:
    """Each connection holds a file descriptor: the soft limit (often 1,024) raised to the hard one, as vLLM's server
    does, so that a thousand idle connections do not leave the service unable to accept another."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a container's limit below the hard one: keep the soft one
            pass


def check_upstreams_first(config: ServiceConfig) -> None:
    """The upstreams' start-up checks before any model loads: one refusing (no --enable-prompt-embeds, another
    key, another model) or none answering is one line and exit 2, in seconds."""
    from ..engines.decoder_files import decoder_config
    from ..engines.remote.fleet import check_upstreams, upstream_root

    options = config.engine_options
    hidden = decoder_config(config.decoder, local_files_only=options.get("local_files_only")).get("hidden_size")
    if not isinstance(hidden, int):
        raise InputError(f"{config.decoder}: its config.json does not say its hidden_size")
    check_upstreams([upstream_root(u) for u in config.upstreams], hidden_size=hidden, api_key=config.upstream_api_key,
                    model=options.get("model"), wait=options.get("wait", 300.0),
                    say=lambda line: print(f"arccompress serve: {line}", file=sys.stderr, flush=True))


def run_on_ray(args: argparse.Namespace, config: ServiceConfig) -> int:
    """Deploy on Ray Serve (joining `--address`, else a local cluster) and serve until SIGTERM or Ctrl-C, then shut
    the deployment (its replicas finish their requests) and the cluster connection down."""
    import ray
    from ray import serve

    from ..serve import deployment

    ray.init(address=args.address, log_to_driver=args.verbose, logging_level="INFO" if args.verbose else "WARNING")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.set())
    try:
        gpus = args.gpus_per_replica
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(config, num_replicas=args.replicas, ray_actor_options={"num_gpus": gpus} if gpus else None),
                  route_prefix="/", blocking=False)
        print(f"arccompress serve: {args.replicas} replica(s) of {config.model_name!r} ready at "
              f"http://{args.host}:{args.port}/v1 on Ray Serve", file=sys.stderr, flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        ray.shutdown()
    return 0
