"""The encoder's pooling split against the rule the reference applies (DEVELOPERS.md), its fixed summation order,
and the FLOP count the benchmarks' MFU rests on."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from arccompress.encoder import ARCEncoder, group_counts, group_index, group_members
from arccompress.tiny import TINY_ENCODER

from .conftest import TEST_DEVICE, TEST_DTYPE, assert_close


def reference_split(n: int, factor: int) -> list[int]:
    """Group sizes as the reference cuts a text of n tokens: near-equal, larger groups first."""
    if n < factor:
        return [n]
    if n % factor == 0:
        return [factor] * (n // factor)
    m = n // factor + 1
    return [n // m + (1 if i < n % m else 0) for i in range(m)]


def test_group_index_matches_the_reference_split_for_every_length():
    for factor in (4, 8):
        lengths = torch.arange(1, 300)
        gid = group_index(lengths, factor)
        sizes = torch.bincount(gid).tolist()
        expected = [s for n in lengths.tolist() for s in reference_split(n, factor)]
        assert sizes == expected
        assert group_counts(lengths, factor).tolist() == [len(reference_split(n, factor)) for n in lengths.tolist()]
        # groups are consecutive and numbered across the batch in order
        assert torch.all(gid[1:] - gid[:-1] >= 0) and torch.all(gid[1:] - gid[:-1] <= 1)


def test_group_members_list_each_group_in_token_order():
    for factor in (4, 8):
        lengths = torch.tensor([1, 7, 8, 9, 17, 63, 64, 65, 130])
        members, sizes = group_members(lengths, factor)
        n_tokens = int(lengths.sum())
        assert members.shape == (int(group_counts(lengths, factor).sum()), factor + 1)
        assert sizes.tolist() == [s for n in lengths.tolist() for s in reference_split(n, factor)]
        start = 0
        for row, size in zip(members.tolist(), sizes.tolist()):
            assert row == list(range(start, start + size)) + [n_tokens] * (factor + 1 - size)  # padded with N
            start += size
        assert start == n_tokens


class RecordOps(TorchDispatchMode):
    """Every aten operator a block of code runs, with its keyword arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def test_forward_adds_in_a_fixed_order_without_atomics():
    """Scatter-adds (index_add_, scatter_add, index_put_ with accumulate) add in the order CUDA threads arrive: none
    may run, so repeated runs give the same bits on any device. Pooled queries are group means in float32."""
    torch.manual_seed(0)
    model = ARCEncoder(TINY_ENCODER).to(TEST_DEVICE, TEST_DTYPE).eval()
    lengths = torch.tensor([3, 20, 9, 64])
    ids = torch.randint(3, TINY_ENCODER.vocab_size, (int(lengths.sum()),), device=TEST_DEVICE)
    seen = {}
    model.layers[-1].register_forward_pre_hook(lambda m, args, kwargs: seen.update(q=args[0], kv=kwargs["kv"]),
                                               with_kwargs=True)
    with torch.inference_mode(), RecordOps() as ops:
        model(ids, lengths)
    atomic = [name for name, args, kwargs in ops.calls if "index_add" in name or "scatter" in name or "index_reduce"
              in name or (name.startswith("aten.index_put") and (kwargs.get("accumulate") or args[3:4] == (True,)))]
    assert not atomic, f"order-dependent accumulation in the forward: {atomic}"
    # each pooled query is its group's mean (sizes differ by at most one, larger groups first)
    kv, start, expected = seen["kv"].float(), 0, []
    for n in lengths.tolist():
        for size in reference_split(n, TINY_ENCODER.pooling_factor):
            expected.append(kv[start: start + size].mean(0))
            start += size
    assert_close(seen["q"], torch.stack(expected).to(TEST_DTYPE), what="pooled queries")


def test_compress_flops_counts_every_matmul():
    """The formula equals what torch's FLOP counter sees in a forward and the head (no padding: equal lengths;
    attention through the math kernel, whose matmuls it counts), for short, pooled and one-token sequences."""
    cfg = replace(TINY_ENCODER, n_layers=3)
    torch.manual_seed(0)
    model = ARCEncoder(cfg).eval()
    for lengths in ([37], [24, 24], [8, 8, 8], [1], [130, 130]):
        ids = torch.randint(3, cfg.vocab_size, (sum(lengths),))
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            pooled, _ = model(ids, torch.tensor(lengths))
            model.head(0).bridge(pooled)
        assert counter.get_total_flops() == cfg.compress_flops(lengths), lengths
