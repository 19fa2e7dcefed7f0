"""The ARC-Encoder network: truncated Llama-3.2 blocks with pooled queries in the last block.

Everything here mirrors the reference computation exactly (see DEVELOPERS.md):
bidirectional attention, plain RoPE on interleaved pairs (no Llama-3 scaling), no final norm,
and in the last block queries that are means of consecutive token groups attending to all tokens.
Sequences are batched with right padding; padded keys are masked and padded outputs dropped,
so a sequence's result does not depend on what it is batched with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the encoder that actually runs (after truncation) and of its decoder heads."""

    dim: int
    n_layers: int  # blocks that run: the backbone's layers minus the truncated ones
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # SwiGLU inner size
    norm_eps: float
    rope_theta: float
    vocab_size: int
    pooling_factor: int
    num_decoders: int  # one <Cont> vector and one MLP head per decoder
    bridge_hidden_dim: int
    decoder_hidden_size: int

    def flops_per_token(self) -> float:
        """Matmul FLOPs per input token of the forward (2 x weights touched per token, no attention)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        return 2.0 * self.n_layers * (attn + ffn)


def group_counts(lengths: torch.Tensor, factor: int) -> torch.Tensor:
    """Number of pooled vectors for each sequence length: ceil(n / factor), at least 1."""
    return torch.clamp((lengths + factor - 1) // factor, min=1)


def group_index(lengths: torch.Tensor, seq_len: int, factor: int) -> torch.Tensor:
    """Pooling group of every position, (B, T); padding positions get the id M (a dump group).

    A text of n tokens is cut into m = ceil(n / factor) consecutive groups whose sizes differ by
    at most one, the larger ones first: r = n mod m groups of q + 1 tokens, then groups of q,
    with q = n // m. This is the reference's split for every n (n < factor gives one group).
    """
    m = group_counts(lengths, factor)[:, None]  # (B, 1)
    q = (lengths[:, None] // m).clamp(min=1)
    r = lengths[:, None] % m
    t = torch.arange(seq_len, device=lengths.device)[None, :]  # (1, T)
    boundary = r * (q + 1)
    gid = torch.where(t < boundary, t // (q + 1), r + (t - boundary) // q)
    dump = int(m.max())
    return torch.where(t < lengths[:, None], gid, torch.full_like(gid, dump))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the weights' dtype, as the reference does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles, (T, head_dim / 2), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = torch.outer(positions.float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, nh, T, hs) by the angles (T, hs/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, nh, T, hs/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        xq: torch.Tensor,
        xkv: torch.Tensor,
        rope_q: tuple[torch.Tensor, torch.Tensor],
        rope_k: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """xq (B, Tq, C) attends bidirectionally to xkv (B, Tk, C); key_mask (B, 1, 1, Tk) or None."""
        B, Tq, _ = xq.shape
        Tk = xkv.shape[1]
        q = self.wq(xq).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Tq, hs)
        k = self.wk(xkv).view(B, Tk, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, Tk, hs)
        v = self.wv(xkv).view(B, Tk, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, Tk, hs)
        q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_k)
        # query head h reads kv head h // (nh / nkv), the reference's repeat_interleave grouping
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim)  # (B, Tq, nh*hs)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope_q, key_mask, kv=None, rope_k=None):
        """x (B, Tq, C) is the residual stream and the queries' input; kv (B, Tk, C), if given, the keys'.

        Both go through the same attention_norm: in the pooling block the pooled queries are normalised
        with the block's norm and attend to the normalised token states.
        """
        xn = self.attention_norm(x)
        kvn = xn if kv is None else self.attention_norm(kv)
        h = x + self.attention(xn, kvn, rope_q, rope_q if rope_k is None else rope_k, key_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Bridge(nn.Module):
    """The per-decoder head: two linear layers with no activation between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layer1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.layer2 = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))


class ARCEncoder(nn.Module):
    """Token ids -> pooled vectors (encoder width); heads add <Cont> and map to decoder width.

    Parameter names follow the research checkpoint (`layers.0.attention.wq.weight`, `cont_tok.0.weight`,
    `bridge_module.0.layer1.weight`) so that weight import is a one-to-one check of names and shapes.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.cont_tok = nn.ModuleList(nn.Embedding(1, cfg.dim) for _ in range(cfg.num_decoders))
        self.bridge_module = nn.ModuleList(
            Bridge(cfg.dim, cfg.bridge_hidden_dim, cfg.decoder_hidden_size) for _ in range(cfg.num_decoders)
        )

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) right-padded, lengths (B,) -> pooled (B, M, C) and counts (B,) of valid rows.

        Row i of the output holds counts[i] pooled vectors; rows past that are padding.
        """
        cfg = self.config
        B, T = ids.shape
        x = self.tok_embeddings(ids)  # (B, T, C)
        padded = bool((lengths < T).any())
        # a boolean mask forces the slower attention kernels: only pay for it when there is padding
        key_mask = (torch.arange(T, device=ids.device)[None, :] < lengths[:, None])[:, None, None, :] if padded else None
        rope_tokens = rope_angles(torch.arange(T, device=ids.device), cfg.head_dim, cfg.rope_theta)
        for block in self.layers[:-1]:
            x = block(x, rope_tokens, key_mask)

        # last block: queries are group means of its input, O(T) with a scatter-add
        counts = group_counts(lengths, cfg.pooling_factor)  # (B,)
        M = int(counts.max())
        gid = group_index(lengths, T, cfg.pooling_factor)  # (B, T), padding -> M
        sums = torch.zeros(B, M + 1, cfg.dim, device=x.device, dtype=torch.float32)
        sums.scatter_add_(1, gid[:, :, None].expand(B, T, cfg.dim), x.float())
        sizes = torch.zeros(B, M + 1, device=x.device, dtype=torch.float32)
        sizes.scatter_add_(1, gid, torch.ones_like(gid, dtype=torch.float32))
        pooled = (sums / sizes.clamp(min=1)[:, :, None])[:, :M].to(x.dtype)  # (B, M, C)
        rope_groups = rope_angles(torch.arange(M, device=ids.device), cfg.head_dim, cfg.rope_theta)
        pooled = self.layers[-1](pooled, rope_groups, key_mask, kv=x, rope_k=rope_tokens)
        return pooled, counts

    def project(self, pooled: torch.Tensor, head: int) -> torch.Tensor:
        """Vectors (N, C) of the encoder -> (N, decoder_hidden_size) through head `head`'s MLP."""
        return self.bridge_module[head](pooled)

    def cont_vector(self, head: int) -> torch.Tensor:
        """The learned <Cont> vector of head `head`, (1, C)."""
        return self.cont_tok[head].weight


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_flops(lengths: list[int], cfg: EncoderConfig) -> float:
    """Attention score and value FLOPs of one forward over sequences of these lengths."""
    per_head = 0.0
    for n in lengths:
        m = math.ceil(n / cfg.pooling_factor)
        per_head += 4.0 * cfg.head_dim * (n * n * (cfg.n_layers - 1) + m * n)
    return per_head * cfg.n_heads
