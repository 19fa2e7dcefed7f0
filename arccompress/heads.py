"""An ARC-Encoder's decoder heads: which head serves which decoder, and the one place their math is written.

A head turns a context's pooled encoder vectors into the rows its decoder reads:

    bottleneck = layer1(pooled)       (m, C) -> (m, B)    no activation between the two layers
    rows       = layer2(bottleneck)   (m, B) -> (m, H)
    context    = rows ++ layer2(layer1(<Cont>))           (m + 1, H): the head's <Cont> vector closes it

(C, B, H) = (3072, 2048, 4096) in the released models: the bottleneck holds all the decoder will see. The
Compressor applies a head to fresh vectors; a ContextStore keeps encoder or bottleneck vectors and applies
the rest of the same head when it reads them, so stored and fresh contexts cannot drift apart.
`*_multi` encoders have two heads: 0 for Llama-3.1-8B, 1 for Mistral-7B.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError, InputTypeError

# `*_multi` checkpoints: head 0 was trained for Llama-3.1-8B, head 1 for Mistral-7B
DECODER_FAMILIES = {"llama": 0, "mistral": 1}
FAMILY_HEADS = ", ".join(f"{name}={head}" for name, head in DECODER_FAMILIES.items())


def resolve_head(head: int | str | None, num_heads: int) -> int | None:
    """Head index for `head` (an index or a decoder family name); None leaves a multi-head choice open."""
    choices = list(range(num_heads))
    names = DECODER_FAMILIES if num_heads == 2 else {}
    if head is None:
        return 0 if num_heads == 1 else None
    if isinstance(head, bool) or not isinstance(head, (int, str)):
        raise InputTypeError(f"head must be an int or a decoder family name, not {type(head).__name__}")
    if isinstance(head, str):
        key = head.lower()
        if key.isdigit():
            return resolve_head(int(key), num_heads)
        if key in names:
            return names[key]
        if num_heads == 1 and key in DECODER_FAMILIES:
            return 0  # a single-head encoder serves whichever family it was trained for
        raise InputError(f"unknown head {head!r}; choices: {choices} or {sorted(names) or sorted(DECODER_FAMILIES)}")
    if head not in choices:
        raise InputError(f"head {head} out of range; this encoder has heads {choices}"
                         + (f" ({FAMILY_HEADS})" if names else ""))
    return head


def head_for_decoder(model_type: str | None, num_heads: int, current: int | None) -> int | None:
    """The head a decoder of `model_type` reads on an encoder with `num_heads` heads, given the one chosen so far.

    One-head encoders keep their head. On two-head encoders the family decides (llama -> 0, mistral -> 1); a
    choice that contradicts it, or an unknown family with no choice made, is an InputError.
    """
    if num_heads != 2:
        return current
    wanted = DECODER_FAMILIES.get(model_type or "")
    if wanted is None:
        if current is None:
            raise InputError(f"decoder model_type {model_type!r} is neither llama nor mistral: choose the encoder "
                             "head with Compressor.select_head()")
        return current
    if current is not None and current != wanted:
        raise InputError(f"the compressor uses head {current} but this is a {model_type} decoder, whose head is "
                         f"{wanted} ({FAMILY_HEADS})")
    return wanted


class Bridge(nn.Module):
    """One head's MLP: encoder width C -> bottleneck B -> decoder width H, two linear layers, no activation."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layer1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.layer2 = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))


class DecoderHead:
    """A head as contexts need it: its Bridge and its <Cont> vector (1, C), on one device and dtype.

    `ARCEncoder.head(i)` gives the encoder's own head; `from_weights` rebuilds one from plain tensors (what
    a store keeps beside its codes).
    """

    def __init__(self, bridge: Bridge, cont: torch.Tensor):
        self.bridge = bridge
        self.cont = cont  # (1, C)
        self._cont_row: tuple[tuple[int, ...], torch.Tensor] | None = None  # (weights' versions, the row)

    @classmethod
    def from_weights(cls, layer1: torch.Tensor, layer2: torch.Tensor, cont: torch.Tensor) -> DecoderHead:
        """A head from its weights: layer1 (B, C), layer2 (H, B), cont (1, C), kept on their device and dtype."""
        (b, c), (h, b2) = layer1.shape, layer2.shape
        if b2 != b or tuple(cont.shape) != (1, c):
            raise InputError(f"head weights do not fit together: layer1 {list(layer1.shape)}, layer2 "
                             f"{list(layer2.shape)}, cont {list(cont.shape)}")
        with torch.device("meta"):
            bridge = Bridge(c, b, h)
        bridge.load_state_dict({"layer1.weight": layer1, "layer2.weight": layer2}, assign=True)
        return cls(bridge.requires_grad_(False), cont)

    def weights(self) -> dict[str, torch.Tensor]:
        """layer1, layer2, cont: what `from_weights` takes."""
        return {"layer1": self.bridge.layer1.weight, "layer2": self.bridge.layer2.weight, "cont": self.cont}

    @property
    def device(self) -> torch.device:
        return self.cont.device

    @property
    def dtype(self) -> torch.dtype:
        return self.cont.dtype

    @property
    def dims(self) -> dict[str, int]:
        """The width of each space: encoder C, bottleneck B, decoder H."""
        b, c = self.bridge.layer1.weight.shape
        return {"encoder": int(c), "bottleneck": int(b), "decoder": int(self.bridge.layer2.weight.shape[0])}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DecoderHead:
        w = {k: v.to(device=device, dtype=dtype) for k, v in self.weights().items()}
        return DecoderHead.from_weights(w["layer1"], w["layer2"], w["cont"])

    def bottleneck(self, pooled: torch.Tensor) -> torch.Tensor:
        """Encoder vectors (m, C) -> bottleneck vectors (m, B)."""
        return self.bridge.layer1(pooled)

    def cont_row(self) -> torch.Tensor:
        """The <Cont> vector as the decoder reads it, (1, H): computed once, again only if a weight changed."""
        versions = tuple(w._version for w in self.weights().values())
        if self._cont_row is None or self._cont_row[0] != versions:
            with torch.no_grad():
                self._cont_row = (versions, self.bridge(self.cont))
        return self._cont_row[1]

    def contexts(self, vectors: torch.Tensor, lengths: list[int], space: str) -> list[torch.Tensor]:
        """Decoder rows of contexts whose vectors are stacked in `vectors` (`lengths` rows each), <Cont> after each.

        `space` says what the vectors are: "encoder" (pooled, (N, C)) or "bottleneck" ((N, B)). Computed
        where the head's weights are, in their dtype; the results are ordinary tensors (not inference-mode ones).
        """
        if space not in ("encoder", "bottleneck"):
            raise InputError(f"a head reads encoder or bottleneck vectors, not {space!r} ones")
        with torch.no_grad():
            x = vectors.to(device=self.device, dtype=self.dtype)
            if space == "encoder":
                x = self.bottleneck(x)
            rows = self.bridge.layer2(x)  # (N, H)
            cont = self.cont_row()
        return [torch.cat([part, cont]) for part in rows.split(lengths)]
