"""The paged-prefill kernel (chunks whose context is partly cached) against its plain-torch reference,
and the reference against the CPU attention layer's per-sequence path, on fresh random inputs (the
kernel under TRITON_INTERPRET=1 on the CPU, natively on a GPU)."""

from __future__ import annotations

import pytest
import torch

from actserve.kernels.paged_prefill import paged_prefill, prefill_meta, tile_positions
from actserve.kernels.paged_prefill_ref import paged_prefill_ref
from actserve.server.layers.attention import AttentionBatch, SeqSlice, paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (context length, new query rows): a chunk after cached context, a fresh prompt, a one-row chunk, a
# chunk longer than one query tile, a context ending mid-block
SEQS = [(45, 13), (20, 20), (33, 1), (90, 70), (7, 3)]


def case(group: int, dim: int, bs: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hk = 2
    width = max(-(-n // bs) for n, _ in SEQS)
    blocks = len(SEQS) * width + 3
    k = torch.randn(blocks * bs, hk, dim, generator=g)
    v = torch.randn(blocks * bs, hk, dim, generator=g)
    tables = torch.randperm(blocks, generator=g)[: len(SEQS) * width].view(len(SEQS), width).int()
    q = torch.randn(sum(nq for _, nq in SEQS), hk * group, dim, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [tables.to(DEVICE)]


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("block_m", "splits"), [(None, 1), (4, 1), (None, 3)])
def test_kernel_matches_reference(group: int, window: int | None, block_m: int | None, splits: int) -> None:
    """Tiles of the default shape (64 rows: 64 // group positions) and of 4 positions (a sequence's rows
    over many tiles); a group of 3 pads to 4 heads per position; the context of each tile in one program
    or split over 3 (some splits then hold nothing a row may attend to: the window, short contexts)."""
    bs, dim = 8, 16
    block_m = block_m or tile_positions(group)
    q, k, v, tables = case(group, dim, bs, seed=group * 10 + (window or 0) + block_m)
    lens, nqs = [n for n, _ in SEQS], [nq for _, nq in SEQS]
    want = paged_prefill_ref(q, k, v, tables, lens, nqs, 0.3, bs, window)
    meta = prefill_meta(lens, nqs, q.device, block_m=block_m)
    got = paged_prefill(q, k, v, tables, meta, 0.3, bs, window, block_n=16, splits=splits)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_reference_matches_attention_layer(window: int | None) -> None:
    """The CPU path (SDPA per sequence over its gathered slots) is an independent implementation."""
    bs, dim, group = 8, 16, 2
    q, k, v, tables = (t.cpu() for t in case(group, dim, bs, seed=3))
    lens, nqs = [n for n, _ in SEQS], [nq for _, nq in SEQS]
    cache = torch.stack([k, v])
    slices, row = [], 0
    for i, (n, nq) in enumerate(SEQS):
        pos = torch.arange(n)
        slices.append(SeqSlice(row, nq, tables[i, pos // bs].long() * bs + pos % bs))
        row += nq
    batch = AttentionBatch(torch.zeros(0, dtype=torch.long), slices)
    got = paged_attention(q, k[:0], v[:0], cache, batch, 0.3, window, write_kv=False)
    want = paged_prefill_ref(q, k, v, tables, lens, nqs, 0.3, bs, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_bf16_real_head_dim() -> None:
    bs, dim = 16, 128
    q, k, v, tables = case(4, dim, bs, seed=5, dtype=torch.bfloat16)
    lens, nqs = [n for n, _ in SEQS], [nq for _, nq in SEQS]
    want = paged_prefill_ref(q, k, v, tables, lens, nqs, dim**-0.5, bs)
    meta = prefill_meta(lens, nqs, q.device, tile_positions(4))
    got = paged_prefill(q, k, v, tables, meta, dim**-0.5, bs)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2
