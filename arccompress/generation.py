"""Generator: a transformers decoder reading prompts in which compressed contexts stand where text would.

The decoder gets exactly the reference pipeline's input: BOS once, then each run of text between
contexts tokenized on its own (SentencePiece on the segment for SentencePiece decoders such as Mistral,
dummy prefix included; plain BPE otherwise, e.g. Llama 3), special-token strings kept as text, and
every context's embeddings inserted unchanged between the segments. Rows are left-padded with an
attention mask, so a prompt generates the same tokens alone or in a batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .checkpoint import hub_snapshot
from .compressor import DECODER_FAMILIES, FAMILY_HEADS, Compressor, default_dtype, resolve_dtype
from .context import CompressedContext

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class ContextText:
    """Raw context text inside a prompt, compressed on the fly by the Generator's compressor."""

    text: str
    chunk_size: int | None = None


Part = Union[str, CompressedContext, ContextText]
Prompt = Union[str, Sequence[Part]]


@dataclass(frozen=True)
class PromptSavings:
    """What compression saved in one prompt, counted in decoder positions."""

    context_text_tokens: int | None  # decoder tokens the contexts' text would take (None: a context has no text)
    context_embeddings: int  # positions the compressed contexts take
    text_tokens: int  # positions of the prompt's own text, BOS included
    num_contexts: int

    @property
    def prompt_length(self) -> int:
        return self.text_tokens + self.context_embeddings

    @property
    def full_text_prompt_length(self) -> int | None:
        return None if self.context_text_tokens is None else self.text_tokens + self.context_text_tokens

    @property
    def context_compression_ratio(self) -> float | None:
        if self.context_text_tokens is None or not self.context_embeddings:
            return None
        return self.context_text_tokens / self.context_embeddings


class SegmentTokenizer:
    """Token ids of one run of prompt text, as the reference tokenized it (no BOS/EOS added).

    With a SentencePiece model (Mistral, Llama 2) the segment goes through SentencePiece itself, which
    keeps the dummy prefix and treats `<s>` or `[INST]` as text — transformers' fast tokenizer differs
    on leading and double spaces. Otherwise the fast tokenizer encodes it with special tokens split.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sentencepiece_model: str | Path | None = None):
        self.tokenizer = tokenizer
        self.sp = None
        if sentencepiece_model is not None:
            import sentencepiece

            try:
                self.sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
            except (RuntimeError, OSError):
                self.sp = None  # e.g. Llama 3's tokenizer.model is tiktoken, not SentencePiece
        self.bos_id = self.sp.bos_id() if self.sp is not None else tokenizer.bos_token_id
        if self.bos_id is not None and self.bos_id < 0:
            self.bos_id = None

    @property
    def kind(self) -> str:
        return "sentencepiece" if self.sp is not None else "bpe"

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.sp is not None:
            return self.sp.encode(text)
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def find_sentencepiece_model(tokenizer: PreTrainedTokenizerBase, model_dir: Path | None) -> Path | None:
    """The tokenizer's `tokenizer.model` file, if it has one on disk."""
    candidates = [getattr(tokenizer, "vocab_file", None), tokenizer.init_kwargs.get("vocab_file")]
    for folder in (model_dir, Path(str(tokenizer.name_or_path))):
        if folder is not None:
            candidates.append(folder / "tokenizer.model")
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def fewshot_qa_prompt(
    question: str,
    documents: str | CompressedContext | Sequence[str | CompressedContext],
    examples: Sequence[tuple[Any, str, str]] = (),
) -> list[Part]:
    """The paper's few-shot QA prompt, every document compressed.

    Each example is (documents, question, answer) and reads
    `Document: <ctx>\\nQuestion: {q}\\nAnswer: {a}\\n\\n`; the final part is
    `Document: <ctx>\\nQuestion: {question}\\nAnswer:`. Several documents for one question are
    compressed separately and placed back to back after one "Document: ", as the reference evaluation does.
    Texts and questions are stripped, as there.
    """
    parts: list[Part] = []

    def add_documents(docs: Any) -> None:
        docs = [docs] if isinstance(docs, (str, CompressedContext, ContextText)) else list(docs)
        if not docs:
            raise ValueError("every question needs at least one document")
        parts.append("Document: ")
        for d in docs:
            parts.append(ContextText(d.strip()) if isinstance(d, str) else d)

    for docs, q, a in examples:
        add_documents(docs)
        parts.append(f"\nQuestion: {q.strip()}\nAnswer: {a.strip()}\n\n")
    add_documents(documents)
    parts.append(f"\nQuestion: {question.strip()}\nAnswer:")
    return parts


def first_answer(text: str) -> str:
    """The answer as the paper's evaluation reads it: the text before the first blank line, stripped."""
    return text.split("\n\n")[0].strip()


class Generator:
    """A causal LM from transformers plus the Compressor whose contexts it reads.

    >>> gen = Generator.from_pretrained("mistralai/Mistral-7B-v0.3", compressor=comp, quantization="4bit")
    >>> gen.generate(["Document: ", comp.compress(doc), "\\nQuestion: Who?\\nAnswer:"], max_new_tokens=20)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        compressor: Compressor,
        *,
        sentencepiece_model: str | Path | None = None,
    ):
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a transformers tokenizer, not {type(tokenizer).__name__}")
        hidden = model.get_input_embeddings().weight.shape[1]
        if hidden != compressor.decoder_hidden_size:
            raise ValueError(
                f"decoder hidden size {hidden} does not match the encoder head's output size "
                f"{compressor.decoder_hidden_size}: this encoder was not trained for this decoder"
            )
        self._check_head(model, compressor)
        self.model = model
        self.tokenizer = tokenizer
        self.compressor = compressor
        sp_file = sentencepiece_model or find_sentencepiece_model(tokenizer, None)
        self.segments = SegmentTokenizer(tokenizer, sp_file)

    @staticmethod
    def _check_head(model: PreTrainedModel, compressor: Compressor) -> None:
        """Two-head encoders: the head must be the decoder family's; pick it if the compressor left it open."""
        if compressor.num_decoders != 2:
            return
        family = getattr(model.config, "model_type", None)
        wanted = DECODER_FAMILIES.get(family)
        if wanted is None:
            if compressor.decoder_index is None:
                raise ValueError(
                    f"decoder model_type {family!r} is neither llama nor mistral: choose the encoder head "
                    "with Compressor.select_decoder()"
                )
            return
        if compressor.decoder_index is None:
            compressor.select_decoder(wanted)
        elif compressor.decoder_index != wanted:
            raise ValueError(
                f"the compressor uses head {compressor.decoder_index} but this is a {family} decoder, "
                f"whose head is {wanted} ({FAMILY_HEADS})"
            )

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
        transformers BitsAndBytesConfig. Extra keyword arguments go to `from_pretrained` of transformers.
        """
        device = compressor.device
        dtype = resolve_dtype(dtype, device) if dtype is not None else default_dtype(device)
        if device_map is None:
            device_map = {"": str(device)}
        quant_config = quantization_config(quantization, dtype)
        path = Path(name_or_path).expanduser()
        local = path.is_dir()
        model_dir = path if local else None
        hub = dict(revision=revision, token=token, local_files_only=bool(local_files_only))
        if not local:
            # fetch the tokenizer files too, so that a SentencePiece model is found next to the weights
            model_dir = Path(hub_snapshot(str(name_or_path), revision=revision, token=token,
                                          local_files_only=local_files_only,
                                          allow_patterns=["*.json", "model*.safetensors", "tokenizer*"]))
        try:
            tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else AutoTokenizer.from_pretrained(
                str(tokenizer or model_dir), trust_remote_code=False, **hub)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{name_or_path}: no usable tokenizer ({e}); pass tokenizer=") from None
        model_kwargs.setdefault("trust_remote_code", False)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, device_map=device_map, quantization_config=quant_config,
            use_safetensors=True, **hub, **model_kwargs,
        )
        model.eval()
        return cls(model, tok, compressor, sentencepiece_model=find_sentencepiece_model(tok, model_dir))

    # ------------------------------------------------------------------ prompts

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def _parse(self, prompt: Prompt, index: int | None) -> list[Part]:
        where = "" if index is None else f" {index}"
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, (CompressedContext, ContextText)):
            return [prompt]
        if not isinstance(prompt, Sequence):
            raise TypeError(f"prompt{where} must be a str or a list of parts, not {type(prompt).__name__}")
        for j, part in enumerate(prompt):
            if not isinstance(part, (str, CompressedContext, ContextText)):
                raise TypeError(
                    f"prompt{where}, part {j}: expected str, CompressedContext or ContextText, "
                    f"not {type(part).__name__}"
                )
        return list(prompt)

    def _check_context(self, ctx: CompressedContext, where: str) -> None:
        comp = self.compressor
        if ctx.hidden_size != comp.decoder_hidden_size:
            raise ValueError(f"{where}: context hidden size {ctx.hidden_size} != decoder's {comp.decoder_hidden_size}")
        if ctx.decoder_index != comp.decoder_index:
            raise ValueError(
                f"{where}: context was made by encoder head {ctx.decoder_index}, this generator reads head "
                f"{comp.decoder_index}"
            )
        if ctx.encoder_fingerprint and comp.fingerprint and ctx.encoder_fingerprint != comp.fingerprint:
            raise ValueError(f"{where}: context was made by another encoder ({ctx.encoder!r})")

    def _layout(self, prompts: Sequence[Prompt]) -> list[list[list[int] | CompressedContext]]:
        """Each prompt as [BOS + text ids, context, text ids, context, ...] with contexts compressed."""
        parsed = [self._parse(p, i if len(prompts) > 1 else None) for i, p in enumerate(prompts)]
        # raw context texts of all prompts are compressed together, one batch per chunk size
        pending: dict[int | None, list[tuple[int, int]]] = {}
        for i, parts in enumerate(parsed):
            for j, part in enumerate(parts):
                if isinstance(part, ContextText):
                    pending.setdefault(part.chunk_size, []).append((i, j))
        for chunk, places in pending.items():
            texts = [parsed[i][j].text for i, j in places]  # type: ignore[union-attr]
            for (i, j), ctx in zip(places, self.compressor.compress(texts, chunk_size=chunk)):
                parsed[i][j] = ctx
        layouts = []
        for i, parts in enumerate(parsed):
            pieces: list[list[int] | CompressedContext] = []
            run = ""
            first = True
            for j, part in enumerate(parts + [None]):  # a sentinel closes the last text run
                if isinstance(part, str):
                    run += part
                    continue
                if run or first:
                    ids = self.segments.encode(run)
                    if first and self.segments.bos_id is not None:
                        ids = [self.segments.bos_id] + ids
                    if ids:
                        pieces.append(ids)
                run, first = "", False
                if isinstance(part, CompressedContext):
                    self._check_context(part, f"prompt {i}, part {j}")
                    pieces.append(part)
            layouts.append(pieces)
        return layouts

    def segment_ids(self, prompt: Prompt) -> list[list[int]]:
        """Decoder token ids of each text run of a prompt (BOS on the first), as fed to the decoder."""
        pieces = self._layout([prompt])[0]
        out: list[list[int]] = []
        expect_text = True
        for piece in pieces:
            if isinstance(piece, list):
                out.append(piece)
                expect_text = False
            else:
                if expect_text:
                    out.append([])
                expect_text = True
        if expect_text:
            out.append([])
        return out

    def prepare_inputs(self, prompts: Prompt | Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Decoder inputs for a prompt or a list of prompts, left-padded.

        Returns {"inputs_embeds": (B, T, H), "attention_mask": (B, T)} on the decoder's device, in its
        embedding dtype: pass them to `model.generate` or `model(...)` of transformers, or another engine.
        """
        batch, _ = self._as_batch(prompts)
        if not batch:
            raise ValueError("no prompts given")
        layouts = self._layout(batch)
        embed = self.model.get_input_embeddings()
        device, dtype = self.device, self.embedding_dtype
        rows = []
        with torch.inference_mode():
            for pieces in layouts:
                parts = []
                for piece in pieces:
                    if isinstance(piece, list):
                        parts.append(embed(torch.tensor(piece, device=device)).to(dtype))
                    else:
                        parts.append(piece.embeddings.to(device=device, dtype=dtype))
                rows.append(torch.cat(parts) if parts else torch.zeros(0, embed.weight.shape[1], device=device, dtype=dtype))
            longest = max(r.shape[0] for r in rows)
            if longest == 0:
                raise ValueError("the prompt is empty: no text, no context and no BOS token")
            inputs = torch.zeros(len(rows), longest, rows[0].shape[1], device=device, dtype=dtype)
            mask = torch.zeros(len(rows), longest, device=device, dtype=torch.long)
            for b, r in enumerate(rows):
                inputs[b, longest - r.shape[0]:] = r  # left padding: the last position is real for every row
                mask[b, longest - r.shape[0]:] = 1
        return {"inputs_embeds": inputs, "attention_mask": mask}

    @staticmethod
    def _as_batch(prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
        """(list of prompts, whether a single prompt was given).

        A str, or a list holding anything but strs and lists (a context, or a wrong type to report by
        position), is one prompt; a list of strs or of part lists is a batch.
        """
        if isinstance(prompts, (str, CompressedContext, ContextText)):
            return [prompts], True
        if not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a str, a list of parts or a list of prompts, not {type(prompts).__name__}")
        if all(isinstance(p, str) or (isinstance(p, Sequence) and not isinstance(p, str)) for p in prompts):
            return list(prompts), False
        return [prompts], True

    # ------------------------------------------------------------------ generation

    def _generate_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
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
        """Newly generated token ids per prompt, stopped at EOS (EOS itself dropped)."""
        batch, _ = self._as_batch(prompts)
        if not batch:
            return []
        inputs = self.prepare_inputs(batch)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._generate_kwargs(generate_kwargs))
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        result = []
        for row in out.tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            result.append(row[:cut])
        return result

    def generate(self, prompt_or_prompts: Prompt | Sequence[Prompt], **generate_kwargs: Any) -> str | list[str]:
        """Only the newly generated text: a str for one prompt, a list for a list of prompts.

        A prompt is a str or a list of parts (str, CompressedContext, ContextText); a list of plain strs
        or of part lists is a batch of prompts. Keyword arguments
        are transformers' generation arguments (max_new_tokens, do_sample, temperature, top_p,
        stop_strings, ...); max_new_tokens defaults to 128.
        """
        _, single = self._as_batch(prompt_or_prompts)
        ids = self.generate_ids(prompt_or_prompts, **generate_kwargs)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return texts[0] if single else texts

    def stream(self, prompt: Prompt, **generate_kwargs: Any) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece, as it is produced."""
        from transformers import TextIteratorStreamer

        if not self._as_batch(prompt)[1]:
            raise TypeError("stream takes one prompt (a str or a list of parts holding a context)")
        inputs = self.prepare_inputs([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(generate_kwargs) | {"streamer": streamer}
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
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

    def answer(
        self,
        question: str,
        documents: str | CompressedContext | Sequence[str | CompressedContext],
        *,
        examples: Sequence[tuple[Any, str, str]] = (),
        **generate_kwargs: Any,
    ) -> str:
        """Answer a question from compressed documents in the paper's few-shot format; the first answer only."""
        generate_kwargs.setdefault("max_new_tokens", 64)
        text = self.generate(fewshot_qa_prompt(question, documents, examples), **generate_kwargs)
        return first_answer(text)  # type: ignore[arg-type]

    def savings(self, prompt: Prompt) -> PromptSavings:
        """Decoder positions the prompt takes with its contexts compressed, and what their text would take."""
        pieces = self._layout([prompt])[0]
        contexts = [p for p in pieces if isinstance(p, CompressedContext)]
        text_ids = sum(len(p) for p in pieces if isinstance(p, list))
        if all(c.text is not None for c in contexts):
            full = sum(len(self.segments.encode(c.text)) for c in contexts)  # type: ignore[arg-type]
        else:
            full = None
        return PromptSavings(full, sum(c.num_embeddings for c in contexts), text_ids, len(contexts))


def quantization_config(quantization: str | Any | None, dtype: torch.dtype) -> Any | None:
    """A BitsAndBytesConfig for "4bit" (nf4, double quant, compute dtype = dtype) or "8bit"."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be None, '4bit', '8bit' or a BitsAndBytesConfig, not {quantization!r}")
