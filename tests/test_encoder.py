"""The encoder's pooling split, against the rule the reference applies (DEVELOPERS.md)."""

from __future__ import annotations

import torch

from arccompress.encoder import group_counts, group_index


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
