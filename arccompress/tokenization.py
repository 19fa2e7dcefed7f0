"""Text to token ids exactly as the reference tokenizes it: special-token strings stay text, no BOS/EOS.

The reference feeds every run of prompt text to the tokenizer as plain text, so `<s>`, `</s>` or
`<|begin_of_text|>` written by a user are tokenized like any other characters. transformers can do this
(`split_special_tokens=True`), but it does so by flipping a flag on the tokenizer's shared backend for the
duration of the call: another thread using the same tokenizer at that moment sees the flag in either state,
and its special-token strings can become real control tokens. Here every `TextTokenizer` owns a private copy
of the backend with the flag set once, so no other caller can change what it produces.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .errors import InputError, InputTypeError


class TextTokenizer:
    """Token ids of plain text (no BOS/EOS added), thread-safe, special-token strings kept as text.

    With a SentencePiece model (given, else the tokenizer's own `tokenizer.model`; Mistral, Llama 2) text goes
    through SentencePiece itself, which keeps the dummy prefix and treats `<s>` or `[INST]` as text, as
    mistral_common does in the reference; transformers' fast Mistral tokenizer differs on leading and double
    spaces. Otherwise (Llama 3) the fast tokenizer's backend encodes it, with special tokens split.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sentencepiece_model: str | Path | None = None):
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise InputTypeError(f"tokenizer must be a transformers tokenizer, not {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.sp = None
        if sentencepiece_model is None:
            sentencepiece_model = find_sentencepiece_model(tokenizer, None)
        if sentencepiece_model is not None:
            import sentencepiece

            try:
                self.sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
            except (RuntimeError, OSError):
                self.sp = None  # e.g. Llama 3's tokenizer.model is tiktoken, not SentencePiece
        self.backend = None
        if self.sp is None:
            if not isinstance(tokenizer, PreTrainedTokenizerFast):
                raise InputTypeError(
                    f"{type(tokenizer).__name__} is a slow tokenizer: pass a fast one (AutoTokenizer's default), "
                    "whose special tokens can be read as plain text"
                )
            from tokenizers import Tokenizer

            # a private copy: its settings are ours alone, whatever other users of `tokenizer` do
            self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
            self.backend.encode_special_tokens = True
        bos = self.sp.bos_id() if self.sp is not None else tokenizer.bos_token_id
        self.bos_id: int | None = bos if bos is not None and bos >= 0 else None

    @property
    def kind(self) -> str:
        return "sentencepiece" if self.sp is not None else "bpe"

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return [self.sp.encode(t) if t else [] for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]


def check_text(text: object, where: str) -> str:
    """`text` if it is a str that UTF-8 can encode; a clear TypeError / ValueError naming `where` otherwise."""
    if not isinstance(text, str):
        raise InputTypeError(f"{where} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{where} holds a lone surrogate {text[e.start]!r} at character {e.start}, which is not text "
            "(decode your input with errors='replace' or 'surrogatepass' and fix it)"
        ) from None
    return text


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
