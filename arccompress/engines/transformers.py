"""The transformers engine, `Generator`: a transformers decoder reading prompts in which compressed contexts stand
where text would.

Prompts are built by `PromptBuilder` (see `arccompress.prompts`); rows are left-padded with an attention
mask, so a prompt generates the same tokens alone or in a batch. The public API is `Engine`'s
(`arccompress.engines.base`); transformers' own `generate` arguments pass through.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase,
                          StoppingCriteria, StoppingCriteriaList)

from ..compressor import Compressor
from ..console import quiet_bitsandbytes, quiet_loading
from ..devices import default_dtype, resolve_dtype, synchronize
from ..errors import InputError, InputTypeError, NotFoundError
from ..extras import missing
from ..hub import resolve_folder
from ..prompts import ContextSource, Part, Prompt, PromptBuilder, check_head, normalize
from ..tokenization import find_sentencepiece_model
from .base import Completion, DecoderCard, LocalEngine, Sampling
from .text import SequenceText, cut_at_eos, cut_at_stop, without_cut_character

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DECODER_FILES = ["*.json", "model*.safetensors", "tokenizer*"]  # what a hub decoder needs
MIN_TEMPERATURE = 1e-2  # vLLM's floor too: a temperature of 1e-39 would turn the logits into inf and nan
# generate() arguments whose output a Generator cannot turn into text per prompt
UNSUPPORTED_GENERATE_KWARGS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                               "output_hidden_states")


class Generator(LocalEngine):
    """A causal LM from transformers plus the Compressor whose contexts it reads.

    >>> gen = Generator.from_pretrained("mistralai/Mistral-7B-v0.3", compressor=comp, quantization="4bit")
    >>> gen.generate(["Document: ", comp.compress(doc), "\nQuestion: Who?\nAnswer:"], max_new_tokens=20)

    Besides the common keywords (max_new_tokens, temperature, top_p, stop, seed, n), transformers' `generate`
    arguments pass through (do_sample, num_beams, stop_strings, repetition_penalty, logits_processor, ...);
    `num_return_sequences` is n. With temperature > 0 and no do_sample, it samples.
    """

    backend = "transformers"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        compressor: Compressor,
        *,
        sentencepiece_model: str | Path | None = None,
        store: ContextSource | None = None,
    ):
        self.prompts = PromptBuilder(tokenizer, compressor, model.get_input_embeddings(),
                                     sentencepiece_model=sentencepiece_model)
        check_head(getattr(model.config, "model_type", None), compressor)
        self.model = model
        self.tokenizer = tokenizer
        self.compressor = compressor
        self.store = store

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        compressor: Compressor,
        store: ContextSource | None = None,
        quantization: str | Any | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        **model_kwargs: Any,
    ) -> Generator:
        """Load a causal LM (safetensors only) on the compressor's device, optionally 4- or 8-bit.

        quantization: None, "4bit" (nf4, double quantization, compute dtype = dtype), "8bit" (bitsandbytes
        computes in float16: dtype float16, its default then on CUDA), or a transformers BitsAndBytesConfig
        (needs `pip install arccompress[quantization]`). store: where ContextRef parts are read. Extra keyword
        arguments go to `from_pretrained` of transformers.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not isinstance(compressor, Compressor):
            raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        device = compressor.device
        if dtype is not None:
            dtype = resolve_dtype(dtype, device)
        elif quantization == "8bit" and device.type == "cuda":
            dtype = torch.float16
        else:
            dtype = default_dtype(device)
        if device_map is None:
            device_map = {"": str(device)}
        quant_config = quantization_config(quantization, dtype)
        model_dir = resolve_folder(name_or_path, what="decoder", revision=revision, token=token,
                                   local_files_only=local_files_only, allow_patterns=DECODER_FILES)
        if tokenizer is None and not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
            raise NotFoundError(f"{name_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass tokenizer=")
        try:
            tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else AutoTokenizer.from_pretrained(
                str(tokenizer or model_dir), trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:  # a slow tokenizer without its files raises TypeError
            raise NotFoundError(f"{name_or_path}: no usable tokenizer ({e}); pass tokenizer=") from None
        model_kwargs.setdefault("trust_remote_code", False)
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=dtype, device_map=device_map, quantization_config=quant_config,
                use_safetensors=True, local_files_only=True, **model_kwargs,
            )
        model.eval()
        return cls(model, tok, compressor, sentencepiece_model=find_sentencepiece_model(tok, model_dir), store=store)

    def __repr__(self) -> str:
        cfg = self.model.config
        quant = f", quantization={self.quantization}" if self.quantization else ""
        return (
            f"Generator({getattr(cfg, '_name_or_path', '') or cfg.model_type!r}, model_type={cfg.model_type}, "
            f"hidden_size={self.prompts.hidden_size}, tokenization={self.prompts.text.kind}, device={self.device}, "
            f"dtype={str(self.embedding_dtype).replace('torch.', '')}{quant}, encoder={self.compressor.name!r}, "
            f"head={self.compressor.head})"
        )

    # ------------------------------------------------------------------ what it is

    @property
    def device(self) -> torch.device:
        return self.prompts.device

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.prompts.dtype

    @property
    def quantization(self) -> str | None:
        quant = getattr(self.model.config, "quantization_config", None)
        if quant is None:
            return None
        get = quant.get if isinstance(quant, dict) else lambda key: getattr(quant, key, None)
        return "4bit" if get("load_in_4bit") else "8bit" if get("load_in_8bit") else str(get("quant_method"))

    def decoder_card(self) -> DecoderCard:
        cfg = self.model.config
        return DecoderCard(str(getattr(cfg, "_name_or_path", "") or cfg.model_type), cfg.to_dict(), self.quantization,
                           self.embedding_dtype)

    # ------------------------------------------------------------------ prompts

    def segment_ids(self, prompt: Prompt) -> list[list[int]]:
        """Decoder token ids of each text run of a prompt (BOS on the first), as fed to the decoder."""
        return self.prompts.segment_ids(prompt)

    def prepare_inputs(self, prompts: Prompt | Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Decoder inputs for a prompt or a list of prompts, left-padded.

        Returns {"inputs_embeds": (B, T, H), "attention_mask": (B, T)} on the decoder's device, in its
        embedding dtype: pass them to `model.generate` or `model(...)` of transformers.
        """
        batch, _ = normalize(prompts)
        if not batch:
            raise InputError("no prompts given")
        return left_pad(self.prompt_rows(batch))

    # ------------------------------------------------------------------ generation

    def sampling(self, **kwargs: Any) -> Sampling:
        """Generation keywords: the common ones, transformers' `num_return_sequences` as n, the rest for `generate`."""
        if "num_return_sequences" in kwargs:
            n = kwargs.pop("num_return_sequences")
            if kwargs.get("n") not in (None, n):
                raise InputError(f"n={kwargs['n']!r} and num_return_sequences={n!r} disagree: give one of them")
            kwargs["n"] = n
        for key in UNSUPPORTED_GENERATE_KWARGS:
            if kwargs.get(key):
                raise InputError(f"{key}=True: Generator returns text; for transformers' raw output call "
                                 "gen.model.generate(**gen.prepare_inputs(prompts), ...)")
        if "max_length" in kwargs:
            raise InputError("max_length counts the prompt's positions too: give max_new_tokens")
        return Sampling.from_kwargs(**kwargs)

    def generate_kwargs(self, sampling: Sampling) -> tuple[dict[str, Any], int]:
        """(transformers `generate` arguments, how many copies of each generated sequence make the n asked for).
        Sampling means what it means on vLLM and OpenAI's API: temperature and top_p, no top-k cut unless asked."""
        kwargs = dict(sampling.extra)
        do_sample = kwargs.setdefault("do_sample", not sampling.greedy)
        if do_sample:
            kwargs.setdefault("top_k", 0)
            if sampling.temperature > 0:  # raised to MIN_TEMPERATURE as vLLM does: below it the logits overflow
                kwargs.setdefault("temperature", max(sampling.temperature, MIN_TEMPERATURE))
            if sampling.top_p < 1:
                kwargs.setdefault("top_p", sampling.top_p)
        kwargs["max_new_tokens"] = sampling.max_new_tokens
        copies = 1
        if sampling.n > 1:
            if do_sample or kwargs.get("num_beams", 1) > 1:
                kwargs["num_return_sequences"] = sampling.n
            else:
                copies = sampling.n  # greedy n > 1: one sequence, n times (transformers refuses; OpenAI repeats)
        if sampling.stop:
            kwargs["stop_strings"] = [*as_list(kwargs.get("stop_strings")), *sampling.stop]
        if kwargs.get("stop_strings"):
            kwargs.setdefault("tokenizer", self.tokenizer)
        if kwargs.get("pad_token_id") is None and self.model.generation_config.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            if pad is None:
                eos = self.model.generation_config.eos_token_id
                pad = eos[0] if isinstance(eos, list) else eos
            kwargs["pad_token_id"] = pad
        return kwargs, copies

    def eos_ids(self) -> list[int]:
        """The token ids that end a sequence."""
        eos = self.model.generation_config.eos_token_id
        return [t for t in (eos if isinstance(eos, list) else [eos]) if t is not None]

    def complete(self, prompts: list[list[Part]], sampling: Sampling, *, time_prefill: bool = False) -> list[Completion]:
        """transformers' `generate` on the left-padded rows of all prompts at once. The prefill is timed from the
        rows reaching `generate` to the first step's logits reaching a logits processor."""
        if not prompts:
            return []
        rows, savings = self.build(prompts)
        kwargs, copies = self.generate_kwargs(sampling)
        clock = FirstStepClock() if time_prefill else None
        if clock is not None:
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), clock])
        inputs = left_pad(rows)
        start = time.perf_counter()
        with torch.inference_mode(), quiet_bitsandbytes(), seeded(sampling.seed, self.device):
            out = self.model.generate(**inputs, **kwargs)
        prefill = clock.at - start if clock is not None and clock.at is not None else None
        stops = [*as_list(sampling.extra.get("stop_strings")), *sampling.stop]
        sequences = [self._finish(ids, sampling.stop, stops) for ids in out.tolist()]
        per_prompt = sampling.n // copies
        groups = [sequences[k: k + per_prompt] * copies for k in range(0, len(sequences), per_prompt)]
        return [Completion(texts=[s[0] for s in group], token_ids=[list(s[1]) for s in group],
                           finish_reasons=[s[2] for s in group], prompt_positions=saved.prompt_length,
                           positions_saved=saved.tokens_saved, prefill_seconds=prefill)
                for saved, group in zip(savings, groups)]

    def _finish(self, row: list[int], trim: Sequence[str], stops: Sequence[str]) -> tuple[str, list[int], str]:
        """(text, token ids, finish reason) of one generated row: cut at EOS, or at the token completing a stop
        string (transformers pads a row that stopped early); the text ends before a `trim` string (OpenAI's stop),
        or before a character cut short."""
        ids = cut_at_eos(row, self.eos_ids())
        reason = "stop" if len(ids) < len(row) else "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if stops and any(s in text for s in stops):
            reason = "stop"
            ids = next(ids[:k] for k in range(1, len(ids) + 1)
                       if any(s in self.tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stops))
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return without_cut_character(cut_at_stop(text, trim)[0]), ids, reason

    def stream_completion(self, prompt: list[Part], sampling: Sampling) -> Iterator[str]:
        """The generation on a thread of its own, its tokens turned into text as they come by the rule every
        streaming engine follows (`SequenceText`); a consumer that stops early, or a stop string, ends the
        generation at the next step."""
        kwargs, _ = self.generate_kwargs(sampling)
        inputs = left_pad(self.prompt_rows([prompt]))
        tokens: queue.Queue[int | None] = queue.Queue()
        cancel = threading.Event()
        kwargs["streamer"] = TokenQueue(tokens)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []),
                                                            CancelCriterion(cancel)])
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), quiet_bitsandbytes(), seeded(sampling.seed, self.device):
                    self.model.generate(**inputs, **kwargs)
            except BaseException as e:  # re-raised in the caller's thread below
                failure.append(e)
            finally:
                tokens.put(None)

        def pieces() -> Iterator[str]:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            text, eos, ended = SequenceText(self.tokenizer, sampling.stop), set(self.eos_ids()), False
            try:
                while (token := tokens.get()) is not None and token not in eos and not text.stopped:
                    piece = text.add(token)
                    if piece:
                        yield piece
                ended = token is None
                rest = text.finish()
                if rest:
                    yield rest
            finally:
                cancel.set()
                while not ended and tokens.get() is not None:  # the generation thread marks its end
                    pass
                worker.join()
            if failure:
                raise failure[0]

        return pieces()


class TokenQueue:
    """transformers' streamer for one sequence: each generated token id put on `tokens` (the prompt skipped)."""

    def __init__(self, tokens: queue.Queue):
        self.tokens = tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            for token in value.reshape(-1).tolist():
                self.tokens.put(token)
        self.prompt_seen = True

    def end(self) -> None:
        pass  # the generation thread marks the end itself, failed or not


class FirstStepClock(LogitsProcessor):
    """Notes when the first step's logits arrive: the end of the prefill (transformers calls logits processors
    once per step, with or without sampling)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            synchronize(scores.device)
            self.at = time.perf_counter()
        return scores


class CancelCriterion(StoppingCriteria):
    """Ends every row once `event` is set (a stream's consumer left)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def left_pad(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"inputs_embeds": (B, T, H), "attention_mask": (B, T)}: rows left-padded with zeros, so that the last
    position is real for every row."""
    longest = max(r.shape[0] for r in rows)
    inputs = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])
    mask = torch.zeros(len(rows), longest, device=rows[0].device, dtype=torch.long)
    for b, r in enumerate(rows):
        inputs[b, longest - r.shape[0]:] = r
        mask[b, longest - r.shape[0]:] = 1
    return {"inputs_embeds": inputs, "attention_mask": mask}


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Sampling reproducible from `seed`, without touching the caller's random state (nothing for None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def as_list(value: Any) -> list[Any]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def quantization_config(quantization: str | Any | None, dtype: torch.dtype) -> Any | None:
    """A BitsAndBytesConfig for "4bit" (nf4, double quant, compute dtype = dtype) or "8bit" (float16 only:
    bitsandbytes' 8-bit matmul computes in float16, so bfloat16 is refused instead of silently cast)."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if not isinstance(quantization, BitsAndBytesConfig) and quantization not in ("4bit", "8bit"):
        raise InputError(f"quantization must be None, '4bit', '8bit' or a BitsAndBytesConfig, not {quantization!r}")
    eight_bit = quantization == "8bit" or getattr(quantization, "load_in_8bit", False)
    if eight_bit and dtype == torch.bfloat16:
        raise InputError("8-bit quantization computes in float16 (bitsandbytes casts every input): give "
                         "dtype='float16', or quantization='4bit' to compute in bfloat16")
    try:
        with quiet_bitsandbytes():  # its import logs a line about optional CPU kernels
            import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise missing("quantization", f"quantization={quantization!r}", e) from None
    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
