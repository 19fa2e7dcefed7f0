"""Serving compressed prompts on vLLM: in process (`VLLMGenerator`) or through its OpenAI-compatible server
(`VLLMClient`).

vLLM reads a prompt as `prompt_embeds`: one (T, H) tensor of input embeddings per prompt. `PromptBuilder`
makes exactly the rows `Generator.prepare_inputs` places (BOS, text segments, contexts); the text segments
need the decoder's input-embedding matrix, which both classes read alone from the decoder's safetensors
(Mistral-7B: 32768 x 4096, 256 MB in bfloat16; locally, or from the hub by HTTP range requests).

    pip install 'arccompress[vllm]'          # vllm pins its own torch: a separate environment is simplest
    vllm serve mistralai/Mistral-7B-v0.3 --enable-prompt-embeds

`VLLMGenerator` imports vllm when it starts an engine; `VLLMClient` needs only httpx (`arccompress[client]`).
"""

from __future__ import annotations

from .client import VLLMClient, VLLMServerError, encode_prompt_embeds
from .decoder import decoder_files, read_embedding_matrix
from .generator import VLLMGenerator

__all__ = ["VLLMClient", "VLLMGenerator", "VLLMServerError", "decoder_files", "encode_prompt_embeds",
           "read_embedding_matrix"]
