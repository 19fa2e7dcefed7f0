"""The vLLM engine's async face, for a service: `AsyncVLLMGenerator` runs vLLM's `AsyncLLM` in this process.

The same start as `VLLMGenerator` (`prepare_engine`: the quantization as vLLM names it, memory settings, quiet
logs, the decoder's files without its weights), the same sampling (`sampling_params`), with continuous batching and
prefix caching on: a stored or cached document is the same bytes every time, so prompts sharing their first
documents share KV blocks. A request whose consumer stops is aborted on the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import torch

from ..compressor import Compressor
from ..prompts import PromptBuilder, check_head
from .base import AsyncEngine, DecoderCard, Observer, Sampling
from .text import Delta, SequenceText
from .vllm import prepare_engine, sampling_params

CPU_BLOCK_SIZE = 32  # the smallest the CPU backend runs well (multiples of 32); GPUs default to 16


class AsyncVLLMGenerator(AsyncEngine):
    """vLLM's async engine (`AsyncLLM`) in this process, reading prompt embeddings, prefix caching on."""

    backend = "vllm"
    penalties = True

    def __init__(self, engine: Any, prompts: PromptBuilder, decoder_config: dict[str, Any], *,
                 observer: Observer | None = None):
        self.engine = engine
        self.prompts = prompts
        self.decoder_config = decoder_config
        self.observer = observer or Observer()
        self.eos = {prompts.text.tokenizer.eos_token_id} - {None}  # reported as the finish reason, not as a token
        self.max_model_len = int(engine.model_config.max_model_len)
        self.dtype = engine.model_config.dtype

    @classmethod
    def load(cls, decoder: str, compressor: Compressor, *, options: dict[str, Any], verbose: bool,
             observer: Observer | None = None) -> AsyncVLLMGenerator:
        """Start the engine on `decoder`; `options` are `AsyncEngineArgs` fields, plus `VLLMGenerator`'s
        `quantization` ("4bit"), memory settings (`gpu_memory_utilization`, `kv_cache_gib`: on a CPU 1 GiB by
        default) and `local_files_only`."""
        args = dict(options)
        files = prepare_engine(decoder, args, quantization=args.pop("quantization", None),
                               gpu_memory_utilization=args.pop("gpu_memory_utilization", None),
                               kv_cache_gib=args.pop("kv_cache_gib", None), verbose=verbose,
                               local_files_only=args.pop("local_files_only", None))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            # compressed prompts are short: the CPU's 128-position KV blocks would rarely fill with a shared prefix
            # (a few-shot example of five documents takes ~60 positions), and only full blocks are cached
            args.setdefault("block_size", CPU_BLOCK_SIZE)
        check_head(files.model_type, compressor)
        args = {"enable_prefix_caching": True, "disable_log_stats": True} | args
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(decoder), enable_prompt_embeds=True, **args))
        prompts = PromptBuilder(files.tokenizer, compressor, files.embedding.to(engine.model_config.dtype),
                                sentencepiece_model=files.sentencepiece_model)
        return cls(engine, prompts, files.config, observer=observer)

    @property
    def waiting(self) -> int:
        return int(self.engine.get_num_unfinished_requests())

    def decoder_card(self) -> DecoderCard:
        c = self.engine.model_config
        return DecoderCard(str(c.model), self.decoder_config, c.quantization, self.dtype)

    async def generate(self, rows: torch.Tensor, sampling: Sampling, request_id: str) -> AsyncIterator[list[Delta]]:
        from vllm.sampling_params import RequestOutputKind

        params = sampling_params(sampling, n=sampling.n, output_kind=RequestOutputKind.DELTA)
        # a copy (from a GPU, or into the engine's dtype), off the event loop
        embeds = await asyncio.to_thread(lambda: rows.detach().to("cpu", self.dtype).contiguous())
        # the text comes from the token ids by the rule every engine follows (vLLM's own detokenizer holds back a
        # trailing partial character that transformers' decode keeps)
        texts = [SequenceText(self.prompts.text.tokenizer, sampling.stop) for _ in range(sampling.n)]
        async for out in self.engine.generate({"prompt_embeds": embeds}, params, request_id):
            if out.finished and out.num_cached_tokens is not None:
                self.observer.prefix_cache(out.num_cached_tokens, embeds.shape[0])
            deltas = []
            for c in out.outputs:
                seq, ids = texts[c.index], [t for t in c.token_ids if t not in self.eos]
                text = "".join(seq.add(t) for t in ids) + (seq.finish() if c.finish_reason is not None else "")
                deltas.append(Delta(c.index, text, ids, c.finish_reason))
            self.observer.tokens(sum(len(d.token_ids) for d in deltas))
            yield deltas

    async def close(self) -> None:
        self.engine.shutdown()
