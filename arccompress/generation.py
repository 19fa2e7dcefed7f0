"""Generator: a transformers decoder reading prompts in which compressed contexts stand where text would.

Prompts are built by `PromptBuilder` (see `arccompress.prompts`); rows are left-padded with an attention
mask, so a prompt generates the same tokens alone or in a batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .compressor import Compressor
from .errors import InputError, InputTypeError, MissingDependencyError, NotFoundError
from .hub import resolve_folder
from .prompts import CompressedPromptEngine, Prompt, PromptBuilder, as_batch, check_head
from .runtime import default_dtype, quiet_bitsandbytes, quiet_loading, resolve_dtype
from .tokenization import find_sentencepiece_model

DEFAULT_MAX_NEW_TOKENS = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DECODER_FILES = ["*.json", "model*.safetensors", "tokenizer*"]  # what a hub decoder needs
# generate() arguments whose output a Generator cannot turn into text per prompt
UNSUPPORTED_GENERATE_KWARGS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                               "output_hidden_states")


class Generator(CompressedPromptEngine):
    """A causal LM from transformers plus the Compressor whose contexts it reads.

    >>> gen = Generator.from_pretrained("mistralai/Mistral-7B-v0.3", compressor=comp, quantization="4bit")
    >>> gen.generate(["Document: ", comp.compress(doc), "\nQuestion: Who?\nAnswer:"], max_new_tokens=20)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        compressor: Compressor,
        *,
        sentencepiece_model: str | Path | None = None,
    ):
        self.prompts = PromptBuilder(tokenizer, compressor, model.get_input_embeddings(),
                                     sentencepiece_model=sentencepiece_model)
        check_head(getattr(model.config, "model_type", None), compressor)
        self.model = model
        self.tokenizer = tokenizer
        self.compressor = compressor

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        compressor: Compressor,
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

        quantization: None, "4bit" (nf4, double quantization, compute dtype = dtype), "8bit", or a
        transformers BitsAndBytesConfig (needs `pip install arccompress[quantization]`). Extra keyword
        arguments go to `from_pretrained` of transformers.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not isinstance(compressor, Compressor):
            raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        device = compressor.device
        dtype = resolve_dtype(dtype, device) if dtype is not None else default_dtype(device)
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
        return cls(model, tok, compressor, sentencepiece_model=find_sentencepiece_model(tok, model_dir))

    def __repr__(self) -> str:
        cfg = self.model.config
        quant = getattr(cfg, "quantization_config", None)
        quant = f", quantization={'4bit' if getattr(quant, 'load_in_4bit', False) else '8bit'}" if quant else ""
        return (
            f"Generator({getattr(cfg, '_name_or_path', '') or cfg.model_type!r}, model_type={cfg.model_type}, "
            f"hidden_size={self.prompts.hidden_size}, tokenization={self.prompts.text.kind}, device={self.device}, "
            f"dtype={str(self.embedding_dtype).replace('torch.', '')}{quant}, encoder={self.compressor.name!r}, "
            f"head={self.compressor.head})"
        )

    # ------------------------------------------------------------------ prompts

    @property
    def device(self) -> torch.device:
        return self.prompts.device

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.prompts.dtype

    def segment_ids(self, prompt: Prompt) -> list[list[int]]:
        """Decoder token ids of each text run of a prompt (BOS on the first), as fed to the decoder."""
        return self.prompts.segment_ids(prompt)

    def prepare_inputs(self, prompts: Prompt | Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Decoder inputs for a prompt or a list of prompts, left-padded.

        Returns {"inputs_embeds": (B, T, H), "attention_mask": (B, T)} on the decoder's device, in its
        embedding dtype: pass them to `model.generate` or `model(...)` of transformers.
        """
        rows = self.prompt_embeds(prompts)
        if not rows:
            raise InputError("no prompts given")
        longest = max(r.shape[0] for r in rows)
        inputs = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])
        mask = torch.zeros(len(rows), longest, device=rows[0].device, dtype=torch.long)
        for b, r in enumerate(rows):
            inputs[b, longest - r.shape[0]:] = r  # left padding: the last position is real for every row
            mask[b, longest - r.shape[0]:] = 1
        return {"inputs_embeds": inputs, "attention_mask": mask}

    # ------------------------------------------------------------------ generation

    def _generate_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        for key in UNSUPPORTED_GENERATE_KWARGS:
            if kwargs.get(key):
                raise InputError(f"{key}=True: Generator returns text; for transformers' raw output call "
                                 "gen.model.generate(**gen.prepare_inputs(prompts), ...)")
        n = kwargs.get("num_return_sequences", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"num_return_sequences must be a positive int, not {n!r}")
        if "max_new_tokens" not in kwargs and "max_length" not in kwargs:
            kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        if kwargs.get("pad_token_id") is None and self.model.generation_config.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            if pad is None:
                eos = self.model.generation_config.eos_token_id
                pad = eos[0] if isinstance(eos, list) else eos
            kwargs["pad_token_id"] = pad
        if kwargs.get("stop_strings") is not None:
            kwargs.setdefault("tokenizer", self.tokenizer)
        return kwargs

    def generate_ids(self, prompts: Prompt | Sequence[Prompt], **generate_kwargs: Any) -> list[list[int]]:
        """Newly generated token ids per prompt, stopped at EOS (EOS itself dropped).

        With num_return_sequences=n, the n sequences of each prompt follow one another.
        """
        batch, _ = as_batch(prompts)
        if not batch:
            return []
        kwargs = self._generate_kwargs(generate_kwargs)
        inputs = self.prepare_inputs(batch)
        with torch.inference_mode(), quiet_bitsandbytes():
            out = self.model.generate(**inputs, **kwargs)
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        result = []
        for row in out.tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            result.append(row[:cut])
        return result

    def generate(
        self, prompt_or_prompts: Prompt | Sequence[Prompt], **generate_kwargs: Any
    ) -> str | list[str] | list[list[str]]:
        """Only the newly generated text: a str for one prompt, a list for a list of prompts.

        A prompt is a str or a list of parts (str, CompressedContext, ContextText); a list of plain strs
        or of part lists is a batch of prompts. Keyword arguments are transformers' generation arguments
        (max_new_tokens, do_sample, temperature, top_p, stop_strings, ...); max_new_tokens defaults to 128.
        With num_return_sequences=n > 1 each prompt gives a list of n texts.
        """
        _, single = as_batch(prompt_or_prompts)
        n = generate_kwargs.get("num_return_sequences", 1)
        ids = self.generate_ids(prompt_or_prompts, **generate_kwargs)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
        if isinstance(n, int) and n > 1:
            texts = [texts[i : i + n] for i in range(0, len(texts), n)]
        return texts[0] if single else texts

    def stream(self, prompt: Prompt, **generate_kwargs: Any) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece, as it is produced."""
        from transformers import TextIteratorStreamer

        if not as_batch(prompt)[1]:
            raise InputTypeError("stream takes one prompt (a str or a list of parts holding a context)")
        kwargs = self._generate_kwargs(generate_kwargs)
        if kwargs.get("num_return_sequences", 1) > 1:
            raise InputError("stream gives one sequence: num_return_sequences must be 1")
        inputs = self.prepare_inputs([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs["streamer"] = streamer
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), quiet_bitsandbytes():
                    self.model.generate(**inputs, **kwargs)
            except BaseException as e:  # re-raised in the caller's thread below
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from (piece for piece in streamer if piece)
        worker.join()
        if failure:
            raise failure[0]


def quantization_config(quantization: str | Any | None, dtype: torch.dtype) -> Any | None:
    """A BitsAndBytesConfig for "4bit" (nf4, double quant, compute dtype = dtype) or "8bit"."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if not isinstance(quantization, BitsAndBytesConfig) and quantization not in ("4bit", "8bit"):
        raise InputError(f"quantization must be None, '4bit', '8bit' or a BitsAndBytesConfig, not {quantization!r}")
    try:
        with quiet_bitsandbytes():  # its import logs a line about optional CPU kernels
            import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"quantization={quantization!r} needs bitsandbytes: pip install 'arccompress[quantization]'"
        ) from None
    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
