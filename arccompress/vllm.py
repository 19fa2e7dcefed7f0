"""Serving compressed prompts on vLLM, in process (`VLLMGenerator`) or through its OpenAI-compatible server
(`VLLMClient`).

vLLM reads a prompt as `prompt_embeds`: one (T, H) tensor of input embeddings per prompt. `PromptBuilder`
makes exactly the rows `Generator.prepare_inputs` places (BOS, text segments, contexts); the text segments
need the decoder's input-embedding matrix, which both classes read alone from the decoder's safetensors
(Mistral-7B: 32768 x 4096, 256 MB in bfloat16; locally, or from the hub by HTTP range requests) - the client
never needs the decoder's other weights.

vLLM's own warning applies: accept prompt embeddings only from trusted clients (the server `torch.load`s
them). This client checks what it sends: hidden size, finite values, and length against the server's
`max_model_len`.

    pip install 'arccompress[vllm]'          # vllm pins its own torch: a separate environment is simplest
    vllm serve mistralai/Mistral-7B-v0.3 --enable-prompt-embeds
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint import parse_header, read_json, read_tensor_from
from .compressor import Compressor
from .context import check_finite
from .errors import CheckpointError, EngineError, InputError, InputTypeError, NotFoundError
from .hub import is_hub_id, resolve_folder
from .prompts import CompressedPromptEngine, Prompt, PromptBuilder, as_batch, check_head
from .tokenization import find_sentencepiece_model

DEFAULT_MAX_NEW_TOKENS = 128


class VLLMServerError(EngineError):
    """The vLLM server refused a request or could not be reached."""


# ----------------------------------------------------------------------------- the decoder's inputs


def _embedding_key(keys: Sequence[str], where: str) -> str:
    """The input-embedding matrix among a decoder's tensor names (`model.embed_tokens.weight` for Llama/Mistral)."""
    found = sorted((k for k in keys if k.endswith("embed_tokens.weight")), key=len)
    if not found:
        raise CheckpointError(f"{where}: no '*embed_tokens.weight' tensor among the decoder's weights")
    return found[0]


def read_embedding_matrix(
    decoder: str | Path, *, revision: str | None = None, token: str | bool | None = None, filesystem: Any = None
) -> torch.Tensor:
    """The decoder's input-embedding matrix (vocab, H), read alone from its safetensors.

    `decoder` is a local folder or a hub id; from the hub only the index and that tensor's bytes are fetched,
    by HTTP range requests through huggingface_hub's HfFileSystem (or the fsspec `filesystem` given).
    """
    local = Path(decoder).expanduser()
    if local.is_dir():
        def size_of(name: str) -> int:
            return (local / name).stat().st_size

        def open_file(name: str):
            return open(local / name, "rb")

        where = str(local)
    else:
        if not is_hub_id(decoder):
            raise NotFoundError(f"no decoder folder at {local}")
        if filesystem is None:
            from huggingface_hub import HfFileSystem

            filesystem = HfFileSystem(token=token)
        prefix = f"{decoder}@{revision}" if revision else str(decoder)

        def size_of(name: str) -> int:
            return int(filesystem.size(f"{prefix}/{name}"))

        def open_file(name: str):
            return filesystem.open(f"{prefix}/{name}", "rb", block_size=1 << 20)

        where = str(decoder)
    try:
        with open_file("model.safetensors.index.json") as f:
            weight_map = json.loads(f.read()).get("weight_map") or {}
        key = _embedding_key(list(weight_map), where)
        name = weight_map[key]
    except FileNotFoundError:
        name, key = "model.safetensors", None
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise CheckpointError(f"{where}: weight file {name!r} is not a .safetensors file of the decoder")
    try:
        size = size_of(name)
        with open_file(name) as f:
            if key is None:
                key = _embedding_key(list(parse_header(f, size, f"{where}/{name}")[1]), where)
                f.seek(0)
            return read_tensor_from(f, size, key, f"{where}/{name}")
    except FileNotFoundError:
        raise NotFoundError(f"{where}: no {name} (safetensors weights) to read the input embeddings from") from None


def decoder_inputs(
    decoder: str | Path,
    *,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> tuple[PreTrainedTokenizerBase, torch.Tensor, Path | None, str | None]:
    """(tokenizer, input-embedding matrix, SentencePiece model file, model_type) of a decoder, without its
    other weights."""
    local = Path(decoder).expanduser()
    folder = resolve_folder(decoder, what="decoder", revision=revision, token=token, local_files_only=local_files_only,
                            allow_patterns=["config.json", "generation_config.json", "tokenizer*",
                                            "special_tokens_map.json", "*.model"])
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    try:
        tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else AutoTokenizer.from_pretrained(
            str(tokenizer or folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise NotFoundError(f"{decoder}: no usable tokenizer ({e}); pass tokenizer=") from None
    weight = read_embedding_matrix(decoder, revision=revision, token=token)
    return tok, weight, find_sentencepiece_model(tok, folder), config.get("model_type")


def without_eos(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids up to the first EOS, which is dropped (what Generator.generate_ids returns)."""
    ids = list(ids)
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


def _sampling_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take this package's sampling keywords out of `kwargs` (max_new_tokens, temperature, top_p, stop, seed),
    checked, as vLLM names them; what is left in `kwargs` is for the engine."""
    max_new_tokens = kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    temperature, top_p = kwargs.pop("temperature", 0.0), kwargs.pop("top_p", 1.0)
    stop, seed = kwargs.pop("stop", None), kwargs.pop("seed", None)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, not {max_new_tokens!r}")
    if not 0 <= temperature or not 0 < top_p <= 1:
        raise InputError(f"temperature must be >= 0 and top_p in (0, 1], not {temperature!r}, {top_p!r}")
    return {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "stop": [stop] if isinstance(stop, str) else list(stop or []), "seed": seed}


def _check_length(rows: Sequence[torch.Tensor], max_new_tokens: int, max_model_len: int | None, engine: str) -> None:
    """ValueError naming the first prompt whose positions and new tokens do not fit the engine's context."""
    for i, row in enumerate(rows):
        if max_model_len is not None and row.shape[0] + max_new_tokens > max_model_len:
            raise InputError(f"prompt {i}: {row.shape[0]} positions + {max_new_tokens} new tokens exceed the "
                             f"{engine}'s max_model_len {max_model_len}")


# ----------------------------------------------------------------------------- in process


class VLLMGenerator(CompressedPromptEngine):
    """A vLLM engine reading prompts in which compressed contexts stand where text would.

    >>> gen = VLLMGenerator.from_pretrained("mistralai/Mistral-7B-v0.3", compressor=comp, dtype="bfloat16")
    >>> gen.generate([["Document: ", ctx, "\\nQuestion: Who?\\nAnswer:"] for ctx in contexts], max_new_tokens=20)

    The same prompt language as `Generator`; a list of thousands of prompts goes to the engine in one call and
    its scheduler batches them (continuous batching, paged KV cache). Greedy by default.
    """

    def __init__(
        self,
        llm: Any,
        tokenizer: PreTrainedTokenizerBase,
        compressor: Compressor,
        *,
        embedding: torch.Tensor | None = None,
        sentencepiece_model: str | Path | None = None,
    ):
        model_config = llm.llm_engine.model_config
        if not getattr(model_config, "enable_prompt_embeds", False):
            raise InputError("the vLLM engine was built without enable_prompt_embeds=True")
        if embedding is None:
            embedding = read_embedding_matrix(model_config.model)
        self.llm = llm
        self.tokenizer = tokenizer
        self.compressor = compressor
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
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **llm_kwargs: Any,
    ) -> VLLMGenerator:
        """Start a vLLM engine on `decoder` (keyword arguments go to `vllm.LLM`: dtype, quantization,
        max_model_len, gpu_memory_utilization, tensor_parallel_size, ...; `enable_prompt_embeds` is set)."""
        from vllm import LLM

        if not isinstance(compressor, Compressor):
            raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        tok, weight, sp_model, _ = decoder_inputs(decoder, tokenizer=tokenizer, revision=revision, token=token)
        llm_kwargs["enable_prompt_embeds"] = True
        llm = LLM(model=str(decoder), tokenizer=str(tokenizer) if isinstance(tokenizer, (str, Path)) else None,
                  revision=revision, **llm_kwargs)
        return cls(llm, tok, compressor, embedding=weight, sentencepiece_model=sp_model)

    def __repr__(self) -> str:
        cfg = self.llm.llm_engine.model_config
        return (f"VLLMGenerator({cfg.model!r}, hidden_size={self.prompts.hidden_size}, dtype="
                f"{str(self.dtype).replace('torch.', '')}, max_model_len={self.max_model_len}, "
                f"encoder={self.compressor.name!r}, head={self.compressor.head})")

    def _sampling(self, sampling_params: Any, kwargs: dict[str, Any]) -> Any:
        from vllm import SamplingParams

        if sampling_params is not None:
            if kwargs:
                raise InputTypeError(f"give sampling_params or {', '.join(kwargs)}, not both")
            return sampling_params
        kwargs = dict(kwargs)
        args = _sampling_arguments(kwargs)
        return SamplingParams(**args, **kwargs)  # other SamplingParams fields (n, top_k, ...) pass through

    def generate_ids(self, prompts: Prompt | Sequence[Prompt], sampling_params: Any = None,
                     **kwargs: Any) -> list[list[int]]:
        """Generated token ids per prompt, stopped at EOS (EOS itself dropped), as Generator.generate_ids."""
        return [without_eos(o.outputs[0].token_ids, self.tokenizer)
                for o in self.generate_outputs(prompts, sampling_params, **kwargs)]

    def generate_outputs(self, prompts: Prompt | Sequence[Prompt], sampling_params: Any = None,
                         **kwargs: Any) -> list[Any]:
        """vLLM's own `RequestOutput` per prompt (all sequences, token ids, logprobs, and request metrics when
        the engine logs statistics), for a prompt or a list of prompts; arguments as `generate`."""
        batch, _ = as_batch(prompts)
        params = self._sampling(sampling_params, kwargs)
        if not batch:
            return []
        rows = self.prompts.prompt_embeds(batch)
        _check_length(rows, params.max_tokens, self.max_model_len, "engine")
        return self.llm.generate([{"prompt_embeds": r} for r in rows], params, use_tqdm=False)

    def generate(
        self, prompt_or_prompts: Prompt | Sequence[Prompt], sampling_params: Any = None, **kwargs: Any
    ) -> str | list[str] | list[list[str]]:
        """Generated text: a str for one prompt, a list for a list of prompts (a list of lists with n > 1).

        Keyword arguments: max_new_tokens (default 128), temperature (default 0: greedy), top_p, stop, seed, and
        any other `vllm.SamplingParams` field; or pass a `SamplingParams` itself.
        """
        single = as_batch(prompt_or_prompts)[1]
        outputs = self.generate_outputs(prompt_or_prompts, sampling_params, **kwargs)
        texts = [[c.text for c in o.outputs] if len(o.outputs) > 1 else o.outputs[0].text for o in outputs]
        return texts[0] if single else texts


# ----------------------------------------------------------------------------- through the server


def encode_prompt_embeds(tensor: torch.Tensor) -> str:
    """vLLM's wire format for one prompt's embeddings: base64 of `torch.save` of a (T, H) tensor."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VLLMClient(CompressedPromptEngine):
    """Generate from a running `vllm serve <decoder> --enable-prompt-embeds` with compressed prompts.

    >>> client = VLLMClient("http://localhost:8000/v1", compressor=comp, decoder="mistralai/Mistral-7B-v0.3")
    >>> client.generate(["Document: ", ctx, "\\nQuestion: Who?\\nAnswer:"], max_new_tokens=20)

    `decoder` is the served model's folder or hub id: its tokenizer and input-embedding matrix are read from it,
    nothing else. `model` is the name the server serves it under (default: its only model).
    """

    def __init__(
        self,
        base_url: str,
        *,
        compressor: Compressor,
        decoder: str | Path,
        model: str | None = None,
        api_key: str = "EMPTY",
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        max_concurrency: int = 32,
        timeout: float = 600.0,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
    ):
        import openai

        if not isinstance(compressor, Compressor):
            raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.base_url = base_url
        try:
            served = self.client.models.list().data
        except openai.APIConnectionError as e:
            raise VLLMServerError(f"no vLLM server answers at {base_url} ({e})") from None
        except openai.APIStatusError as e:
            raise VLLMServerError(f"{base_url}: listing the served models failed ({e.status_code}: {e.message})") from None
        names = [m.id for m in served]
        if model is None:
            if len(names) != 1:
                raise InputError(f"{base_url} serves {names}: choose one with model=")
            model = names[0]
        elif model not in names:
            raise InputError(f"{base_url} does not serve {model!r}; it serves {names}")
        self.model = model
        card = next(m for m in served if m.id == model)
        self.max_model_len = getattr(card, "max_model_len", None) or (card.model_extra or {}).get("max_model_len")
        tok, weight, sp_model, model_type = decoder_inputs(decoder, tokenizer=tokenizer, revision=revision,
                                                           token=token, local_files_only=local_files_only)
        self.tokenizer = tok
        self.compressor = compressor
        self.max_concurrency = max_concurrency
        self.prompts = PromptBuilder(tok, compressor, weight, sentencepiece_model=sp_model)
        check_head(model_type, compressor)

    def __repr__(self) -> str:
        return (f"VLLMClient({self.base_url!r}, model={self.model!r}, max_model_len={self.max_model_len}, "
                f"encoder={self.compressor.name!r}, head={self.compressor.head})")

    def check(self, embeds: torch.Tensor, where: str) -> None:
        """What the client refuses to send: a wrong shape, NaN/infinity (lengths: against max_model_len)."""
        if embeds.dim() != 2 or embeds.shape[1] != self.prompts.hidden_size or embeds.shape[0] == 0:
            raise InputError(f"{where}: prompt embeddings must be (positions, {self.prompts.hidden_size}), "
                             f"not {list(embeds.shape)}")
        check_finite(embeds, f"{where}: prompt embeddings")

    def _request(self, embeds: torch.Tensor, args: dict[str, Any], extra: dict[str, Any], stream: bool):
        import openai

        body = {"prompt_embeds": encode_prompt_embeds(embeds)}
        if args["seed"] is not None:
            body["seed"] = args["seed"]
        try:
            return self.client.completions.create(
                model=self.model, prompt=None, max_tokens=args["max_tokens"], temperature=args["temperature"],
                top_p=args["top_p"], stop=args["stop"] or None, stream=stream, extra_body=body | extra)
        except openai.APIConnectionError as e:
            raise VLLMServerError(f"no vLLM server answers at {self.base_url} ({e})") from None
        except openai.APIStatusError as e:
            raise VLLMServerError(f"the server refused the request ({e.status_code}): {e.message}") from None

    def _prepared(self, prompts: Prompt | Sequence[Prompt], kwargs: dict[str, Any]):
        args = _sampling_arguments(kwargs)
        batch, single = as_batch(prompts)
        rows = self.prompts.prompt_embeds(batch) if batch else []
        for i, row in enumerate(rows):
            self.check(row, f"prompt {i}")
        _check_length(rows, args["max_tokens"], self.max_model_len, "server")
        return rows, single, args, kwargs

    def _complete(self, prompts: Prompt | Sequence[Prompt], kwargs: dict[str, Any]) -> tuple[list[Any], bool]:
        """One completion choice per prompt; prompts are sent concurrently (the server batches them)."""
        rows, single, args, extra = self._prepared(prompts, dict(kwargs))
        extra = {"return_token_ids": True} | extra

        def one(row: torch.Tensor) -> Any:
            return self._request(row, args, extra, stream=False).choices[0]

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(rows)))) as pool:
            return list(pool.map(one, rows)), single

    def generate(self, prompt_or_prompts: Prompt | Sequence[Prompt], **kwargs: Any) -> str | list[str]:
        """Generated text: a str for one prompt, a list for a list of prompts (sent concurrently).

        Keyword arguments: max_new_tokens (default 128), temperature (default 0: greedy), top_p, stop, seed;
        others go to the request body (vLLM's extra sampling fields, e.g. top_k).
        """
        choices, single = self._complete(prompt_or_prompts, kwargs)
        texts = [c.text for c in choices]
        return texts[0] if single else texts

    def generate_ids(self, prompts: Prompt | Sequence[Prompt], **kwargs: Any) -> list[list[int]]:
        """Generated token ids per prompt, as the server returns them (`return_token_ids`)."""
        choices, _ = self._complete(prompts, kwargs)
        return [without_eos(getattr(c, "token_ids", None) or (c.model_extra or {}).get("token_ids") or [],
                             self.tokenizer) for c in choices]

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece, as the server produces it."""
        if not as_batch(prompt)[1]:
            raise InputTypeError("stream takes one prompt (a str or a list of parts holding a context)")
        rows, _, args, extra = self._prepared(prompt, dict(kwargs))
        for chunk in self._request(rows[0], args, extra, stream=True):
            if chunk.choices and chunk.choices[0].text:
                yield chunk.choices[0].text
