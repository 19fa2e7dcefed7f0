"""The ARC-Encoder network: truncated Llama-3.2 blocks with pooled queries in the last block.

Everything here mirrors the reference computation exactly (see DEVELOPERS.md):
bidirectional attention, plain RoPE on interleaved pairs (no Llama-3 scaling), no final norm,
and in the last block queries that are means of consecutive token groups attending to all tokens.
Sequences of different lengths run together as packed rows; only attention pads them, masking the
padded keys, so a sequence's result does not depend on what it is batched with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .heads import Bridge, DecoderHead


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

    def compress_flops(self, lengths: Sequence[int]) -> float:
        """Matmul FLOPs of compressing sequences of these lengths with one head: what MFU is counted on.

        A multiply-add is 2 FLOPs. The first n_layers - 1 blocks run every projection and the FFN on all
        N tokens; the last block projects keys and values of all N tokens, but queries, output and FFN only
        on the P = sum(ceil(n / factor)) pooled rows, whose queries attend to their sequence's n tokens.
        The head maps the P rows C -> B -> H (its one <Cont> row per call is left out). Elementwise work
        (norms, RoPE, softmax, pooling sums) is not counted.
        """
        n_tokens = sum(lengths)
        n_pooled = sum(max(1, math.ceil(n / self.pooling_factor)) for n in lengths)
        q_o = 2 * self.dim * self.n_heads * self.head_dim  # (C -> nh * hs) and back
        k_v = 2 * self.dim * self.n_kv_heads * self.head_dim
        ffn = 3 * self.dim * self.hidden_dim
        head = self.dim * self.bridge_hidden_dim + self.bridge_hidden_dim * self.decoder_hidden_size
        weights = (self.n_layers - 1) * n_tokens * (q_o + k_v + ffn) + n_tokens * k_v + n_pooled * (q_o + ffn + head)
        # scores q.k and weighted values, per query head: 2 matmuls of (rows x hs x keys)
        attention = 0
        for n in lengths:
            queries = (self.n_layers - 1) * n + max(1, math.ceil(n / self.pooling_factor))
            attention += 2 * queries * n * self.head_dim * self.n_heads
        return 2.0 * (weights + attention)


def group_counts(lengths: torch.Tensor, factor: int) -> torch.Tensor:
    """Number of pooled vectors for each sequence length: ceil(n / factor), at least 1."""
    return torch.clamp((lengths + factor - 1) // factor, min=1)


def group_index(lengths: torch.Tensor, factor: int) -> torch.Tensor:
    """Pooling group of every token of the packed sequences, (N,), numbered across the whole batch.

    A text of n tokens is cut into m = ceil(n / factor) consecutive groups whose sizes differ by
    at most one, the larger ones first: r = n mod m groups of q + 1 tokens, then groups of q,
    with q = n // m. This is the reference's split for every n (n < factor gives one group).
    """
    m = group_counts(lengths, factor)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)  # (N,)
    starts = torch.cumsum(lengths, 0) - lengths
    t = torch.arange(int(lengths.sum()), device=lengths.device) - starts[seq]  # position inside its sequence
    n, m_, first_group = lengths[seq], m[seq], (torch.cumsum(m, 0) - m)[seq]
    q = n // m_
    r = n % m_
    boundary = r * (q + 1)
    local = torch.where(t < boundary, t // (q + 1), r + (t - boundary) // q.clamp(min=1))
    return first_group + local


def group_members(lengths: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of every pooling group, (P, factor + 1) packed-row indices padded with N, and group sizes (P,).

    A group holds at most factor + 1 tokens (q = n // ceil(n / factor) <= factor), so a fixed-width gather
    followed by a sum in index order pools every group: the same additions in the same order on any device,
    unlike a scatter-add, whose CUDA atomics add in whatever order threads arrive.
    """
    gid = group_index(lengths, factor)  # (N,), non-decreasing
    P = int(group_counts(lengths, factor).sum())
    sizes = torch.bincount(gid, minlength=P)  # (P,)
    first = torch.cumsum(sizes, 0) - sizes
    token = torch.arange(len(gid), device=gid.device)
    members = torch.full((P, factor + 1), len(gid), dtype=torch.long, device=gid.device)
    members[gid, token - first[gid]] = token
    return members, sizes


class Packing:
    """Where the rows of B sequences of given lengths sit: packed (N, F) or right-padded (B, T, F).

    Everything but attention runs on packed rows, so padding costs no matmul work; attention pads them
    to (B, T) and masks the padded keys. With equal lengths both layouts are the same memory.
    """

    def __init__(self, lengths: torch.Tensor, head_dim: int, theta: float, device: torch.device):
        # lengths (B,) on the CPU: every size is known without waiting for the device
        self.B, self.T = len(lengths), int(lengths.max())
        positions = torch.arange(self.T)
        valid = positions[None, :] < lengths[:, None]  # (B, T)
        self.dense = bool(valid.all())
        index = None if self.dense else valid.flatten().nonzero().squeeze(1)  # (N,) into B*T
        token_pos = positions.repeat(self.B) if self.dense else positions.repeat(self.B)[index]
        self.index = None if index is None else index.to(device)
        self.key_mask = None if self.dense else valid[:, None, None, :].to(device)  # (B, 1, 1, T)
        cos, sin = rope_angles(positions.to(device), head_dim, theta)  # (T, hs/2)
        token_pos = token_pos.to(device)
        self.cos, self.sin = cos[token_pos][:, None, :], sin[token_pos][:, None, :]  # (N, 1, hs/2)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...) with zeros in the padding."""
        if self.dense:
            return x.view(self.B, self.T, *x.shape[1:])
        out = x.new_zeros(self.B * self.T, *x.shape[1:])
        out[self.index] = x
        return out.view(self.B, self.T, *x.shape[1:])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...), dropping the padding."""
        flat = x.reshape(self.B * self.T, *x.shape[2:])
        return flat if self.dense else flat[self.index]


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
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (N, nh, hs) by the angles (N, 1, hs/2), in float32."""
    xf = x.float().unflatten(-1, (-1, 2))  # (N, nh, hs/2, 2)
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

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor, q_rows: Packing, kv_rows: Packing) -> torch.Tensor:
        """Packed queries xq (Nq, C) attend bidirectionally, sequence by sequence, to packed xkv (Nk, C)."""
        q = apply_rope(self.wq(xq).view(-1, self.n_heads, self.head_dim), q_rows.cos, q_rows.sin)  # (Nq, nh, hs)
        k = apply_rope(self.wk(xkv).view(-1, self.n_kv_heads, self.head_dim), kv_rows.cos, kv_rows.sin)  # (Nk, nkv, hs)
        v = self.wv(xkv).view(-1, self.n_kv_heads, self.head_dim)  # (Nk, nkv, hs)
        q = q_rows.pad(q).transpose(1, 2)  # (B, nh, Tq, hs)
        k, v = kv_rows.pad(k).transpose(1, 2), kv_rows.pad(v).transpose(1, 2)  # (B, nkv, Tk, hs)
        # query head h reads kv head h // (nh / nkv), the reference's repeat_interleave grouping;
        # a boolean mask forces slower kernels, so there is one only when some sequence is padded
        mask, gqa = kv_rows.key_mask, self.n_heads != self.n_kv_heads
        if gqa and mask is not None and q.is_cuda:
            # CUDA's memory-efficient kernel takes a mask but not grouped heads: expand them instead of
            # falling back to the kernel that materialises (B, nh, Tq, Tk) scores
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = q_rows.pack(y.transpose(1, 2))  # (Nq, nh, hs)
        return self.wo(y.flatten(1))


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

    def forward(self, x: torch.Tensor, rows: Packing, kv: torch.Tensor | None = None, kv_rows: Packing | None = None):
        """x (N, C) packed: the residual stream and the queries' input; kv (Nk, C), if given, the keys'.

        Both go through the same attention_norm: in the pooling block the pooled queries are normalised
        with the block's norm and attend to the normalised token states.
        """
        xn = self.attention_norm(x)
        kvn = xn if kv is None else self.attention_norm(kv)
        h = x + self.attention(xn, kvn, rows, rows if kv_rows is None else kv_rows)
        return h + self.feed_forward(self.ffn_norm(h))


class ARCEncoder(nn.Module):
    """Token ids -> pooled vectors (encoder width); its heads (`head(i)`) add <Cont> and map to decoder width.

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
        """Packed token ids (N,) of sequences of `lengths` (B,, on the CPU) -> pooled vectors (P, C) and counts (B,).

        The first counts[0] rows of the output belong to the first sequence, and so on; counts stay on the CPU.
        """
        cfg, device = self.config, ids.device
        tokens = Packing(lengths, cfg.head_dim, cfg.rope_theta, device)
        x = self.tok_embeddings(ids)  # (N, C)
        for block in self.layers[:-1]:
            x = block(x, tokens)

        # last block: queries are group means of its input, summed in a fixed order (bitwise reproducible)
        counts = group_counts(lengths, cfg.pooling_factor)  # (B,)
        members, sizes = group_members(lengths, cfg.pooling_factor)  # (P, factor + 1), (P,)
        rows = torch.cat([x.float(), x.new_zeros(1, cfg.dim, dtype=torch.float32)])  # row N: the padding
        pooled = (rows[members.to(device)].sum(1) / sizes.to(device)[:, None]).to(x.dtype)  # (P, C)
        groups = Packing(counts, cfg.head_dim, cfg.rope_theta, device)  # pooled vector j of a text: RoPE position j
        return self.layers[-1](pooled, groups, kv=x, kv_rows=tokens), counts

    def head(self, index: int) -> DecoderHead:
        """Decoder head `index`: its MLP and its <Cont> vector."""
        return DecoderHead(self.bridge_module[index], self.cont_tok[index].weight)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
