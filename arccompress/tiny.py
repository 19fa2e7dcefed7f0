"""Tiny random checkpoints, built on the spot: the demo's default and the tests' fixtures.

They have the real layouts (hub `config.json` + `model.safetensors`, or the research folder) and real
transformers decoders, with a byte-level tokenizer so that nothing is downloaded. The weights are random:
the numbers flow through exactly the real code paths, the generated text is noise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import __version__
from .encoder import ARCEncoder, EncoderConfig
from .errors import InputError
from .hub import cache_dir

TINY_ENCODER = EncoderConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    hidden_dim=192,  # what multiple_of=64, ffn_dim_multiplier=1.0 derive for dim 64
    norm_eps=1e-5,
    rope_theta=500000.0,
    vocab_size=384,
    pooling_factor=8,
    num_decoders=1,
    bridge_hidden_dim=48,
    decoder_hidden_size=64,
)
N_TRUNCATED = 2


def byte_level_tokenizer(vocab_size: int = TINY_ENCODER.vocab_size):
    """A transformers fast tokenizer over raw bytes (ids 3..258), with <s>=1, </s>=2, <pad>=0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(tok) <= vocab_size
    return tok


def _random_encoder(config: EncoderConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = ARCEncoder(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)  # not all ones: a norm weight applied to the wrong tensor must show
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    for head in range(config.num_decoders):  # the research code also stores reconstruction tokens
        state[f"rec_tok.{head}.weight"] = torch.randn(1, config.dim).to(torch.bfloat16)
    return state


def _arc_args(config: EncoderConfig) -> tuple[dict, dict, dict]:
    embedder = {
        "causal_embedder": False,
        "compress_rates": [-config.pooling_factor],
        "cont_tok": True,
        "n_truncated_layers": N_TRUNCATED,
        "pooling_module": {"pool_type": "mean_pooled_queries", "where": "before"},
        "rec_tok": True,
        "train_embedding_mtx": True,
        "trained_layers": config.n_layers + N_TRUNCATED + 1,
    }
    bridge = {
        "bridge_type": "multi_module" if config.num_decoders > 1 else "mlp",
        "hidden_dim": config.bridge_hidden_dim,
        "in_dim": config.dim,
        "out_dim": config.decoder_hidden_size,
    }
    model = {
        "dim": config.dim,
        "head_dim": config.head_dim,
        "hidden_dim": config.hidden_dim,
        "max_batch_size": 1,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "n_layers": config.n_layers + N_TRUNCATED,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "vocab_size": config.vocab_size,
    }
    return model, embedder, bridge


def build_tiny_encoder(
    path: str | Path,
    *,
    layout: str = "hub",
    num_decoders: int = 1,
    decoder_hidden_size: int = 64,
    seed: int = 0,
    with_tokenizer: bool = True,
    shards: int = 1,
    config: EncoderConfig = TINY_ENCODER,
    tokenizer: Any = None,
) -> Path:
    """Write a random ARC-Encoder at `path` in the hub or research layout; return `path`.

    Tiny by default; `config` gives other sizes (benchmarks), its head count and decoder width replaced by
    `num_decoders` and `decoder_hidden_size`. `tokenizer`: a transformers tokenizer to save beside the weights
    (default: a byte-level one)."""
    if layout not in ("hub", "research"):
        raise InputError(f"layout must be 'hub' or 'research', not {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = replace(config, num_decoders=num_decoders, decoder_hidden_size=decoder_hidden_size)
    state = _random_encoder(config, seed)
    model_args, embedder_args, bridge_args = _arc_args(config)
    multi = num_decoders > 1
    embedder = {k: v for k, v in state.items() if not k.startswith("bridge_module.")}
    # a one-head checkpoint stores its MLP without the head index
    bridge = {(k if multi else k.replace("bridge_module.0.", "bridge_module.")): v
              for k, v in state.items() if k.startswith("bridge_module.")}
    if layout == "hub":
        tensors = {f"embedder.{k}": v for k, v in embedder.items()} | bridge
        _save_hub(path, tensors, shards)
        config_json = {"bridge_args": bridge_args, "embedder": None, "embedder_args": embedder_args,
                       "empty_init": num_decoders, "llms": [], "model_args": model_args}
        (path / "config.json").write_text(json.dumps(config_json, indent=2))
    else:
        (path / "embedder").mkdir(exist_ok=True)
        (path / "bridge_module").mkdir(exist_ok=True)
        (path / "backbone").mkdir(exist_ok=True)
        save_file(embedder, path / "embedder" / "consolidated.safetensors")
        save_file({k.removeprefix("bridge_module."): v for k, v in bridge.items()},
                  path / "bridge_module" / "consolidated.safetensors")
        params = {"param_dtype": "float32", "embedder_params": embedder_args, "bridge_module": bridge_args}
        (path / "params.json").write_text(json.dumps(params, indent=4))
        backbone = {"dim": config.dim, "ffn_dim_multiplier": 1.0, "multiple_of": 64, "n_heads": config.n_heads,
                    "n_kv_heads": config.n_kv_heads, "n_layers": config.n_layers + N_TRUNCATED,
                    "norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "use_scaled_rope": True,
                    "vocab_size": config.vocab_size}
        (path / "backbone" / "params.json").write_text(json.dumps(backbone, indent=4))
    if with_tokenizer:
        (tokenizer or byte_level_tokenizer()).save_pretrained(path)
    return path


def _save_hub(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, path / file, metadata={"format": "pt"})
        weight_map |= {k: file for k in part}
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# A chat template in the usual shape (role markers, a generation prompt), for the tiny pair's decoder: what `serve
# --tiny` reads chat requests with. Decoders built for tests have none unless they ask, as many base models.
TINY_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
READABLE = "etaoinshrdlu "  # what the tiny pair's decoder says: its most likely tokens, so that its noise reads as text


def build_tiny_decoder(
    path: str | Path,
    *,
    family: str = "llama",
    hidden_size: int = 64,
    seed: int = 0,
    chat_template: str | None = None,
    readable: bool = False,
) -> Path:
    """Write a tiny random transformers causal LM (Llama or Mistral architecture) with a byte tokenizer.

    Sizes are multiples of 64 so that bitsandbytes' 4-bit CPU kernels accept every matrix. `chat_template`: a
    Jinja template saved with the tokenizer (default: none). `readable`: random weights still, but arranged so that
    greedy decoding picks among the letters of READABLE (random text reads as noise, not as an empty string or
    control bytes): hidden dimension 0 of every token embedding is a constant as large as all the others together, and the output rows weigh that dimension positively for READABLE's tokens, negatively for the others.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    if family not in classes:
        raise InputError(f"family must be one of {sorted(classes)}, not {family!r}")
    path = Path(path)
    tokenizer = byte_level_tokenizer()
    config_cls, model_cls = classes[family]
    config = config_cls(
        vocab_size=TINY_ENCODER.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    if readable:
        _make_readable(model, tokenizer)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" for a 1 MB model is noise
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return path


def _make_readable(model: torch.nn.Module, tokenizer: Any) -> None:
    """See build_tiny_decoder(readable=True)."""
    readable = torch.tensor([tokenizer.convert_tokens_to_ids(tokenizer.tokenize(ch))[0] for ch in READABLE])
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.normal_(0.0, 1.0)  # tokens far apart: what follows a token depends on which token it is
        embed[:, 0] = 16.0  # after the final RMSNorm, as large as the other dimensions together
        head = model.get_output_embeddings().weight  # (vocab, hidden)
        head.normal_(0.0, 0.25)  # READABLE's logits a few units apart: sampling at temperature 1 picks among them
        head[:, 0] = -4.0
        head[readable, 0] = 4.0


TINY_PAIR_HIDDEN = 256  # 4 attention heads of 64: the smallest head vLLM's CPU attention serves
TINY_PAIR_REVISION = 2  # in the cache folder's name: a pair cached by an earlier build is not reused (2: chat, letters)


def build_tiny_pair(root: str | Path | None = None) -> tuple[Path, Path]:
    """A tiny encoder (hub layout) and a tiny Llama-architecture decoder it fits, under `root`; vLLM serves the
    decoder too (head size 64). The decoder has a chat template and writes letters (random ones: see
    build_tiny_decoder's `readable`), so that every path of `--tiny` shows something.

    Without `root` they are built once into the user's cache (~/.cache/arccompress/tiny-<versions>) and reused,
    so examples and demos leave nothing behind in /tmp; a half-built folder is never used (built aside, then
    renamed into place). The folder is per transformers version, whose tokenizer files older ones cannot read.
    """
    if root is None:
        import transformers

        root = cache_dir() / (f"tiny-{__version__}-r{TINY_PAIR_REVISION}-h{TINY_PAIR_HIDDEN}"
                              f"-transformers-{transformers.__version__}")
        if not (root / "tiny-decoder" / "config.json").is_file():
            root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
            build_tiny_pair(staging)
            try:
                os.replace(staging, root)
            except OSError:  # another process finished first
                shutil.rmtree(staging, ignore_errors=True)
        return root / "tiny-arc-encoder", root / "tiny-decoder"
    root = Path(root)
    encoder, decoder = root / "tiny-arc-encoder", root / "tiny-decoder"
    if not (encoder / "config.json").is_file():
        build_tiny_encoder(encoder, decoder_hidden_size=TINY_PAIR_HIDDEN)
    if not (decoder / "config.json").is_file():
        build_tiny_decoder(decoder, hidden_size=TINY_PAIR_HIDDEN, chat_template=TINY_CHAT_TEMPLATE, readable=True)
    return encoder, decoder
