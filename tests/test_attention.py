"""The batched fresh-prefill attention (used on CUDA) against the per-sequence loop (the CPU reference)."""

from __future__ import annotations

import pytest
import torch

from actserve.server.layers.attention import AttentionBatch, SeqSlice, _prefill_sdpa, paged_attention


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_groups_match_per_sequence_loop(window: int | None) -> None:
    """Prompts of repeated and unique lengths, grouped-query heads, optional sliding window."""
    g = torch.Generator().manual_seed(11 + (window or 0))
    lengths = [5, 2, 5, 7, 5, 2]
    hq, hk, d = 6, 2, 8
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk))
    cache = torch.zeros(2, total + 4, hk, d, dtype=torch.float64)
    perm = torch.randperm(total + 4, generator=g)[:total]  # scattered KV slots
    slices, row = [], 0
    for n in lengths:
        slices.append(SeqSlice(row, n, perm[row : row + n]))
        row += n
    want = paged_attention(q, k, v, cache, AttentionBatch(perm, slices), 0.3, window)
    batch = AttentionBatch(perm, slices, fresh_prefill=True)
    got = _prefill_sdpa(q, k, v, batch, 0.3, window)
    assert batch.prefill_groups is not None and len(batch.prefill_groups) == 3
    assert (got - want).abs().max().item() < 1e-10
    assert (_prefill_sdpa(q, k, v, batch, 0.3, window) - want).abs().max().item() < 1e-10  # cached groups
