"""The KV-retrieval block-scoring kernel (kernels/kv_scores.py) against its plain-torch reference, and the
paged-decode kernel reading per-row lists of selected blocks (what kv_retrieval hands it): Triton's
interpreter on the CPU, natively on a GPU."""

from __future__ import annotations

import pytest
import torch

from actserve.kernels.kv_scores import kv_scores
from actserve.kernels.kv_scores_ref import kv_scores_ref
from actserve.kernels.paged_decode import paged_decode
from actserve.kernels.paged_decode_ref import paged_decode_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("two_terms", [False, True])
def test_kv_scores_equal_reference(dtype: torch.dtype, two_terms: bool) -> None:
    g = torch.Generator().manual_seed(7 + two_terms)
    rows, width, ids, hk, d = 3, 70, 40, 2, 16
    a = torch.randn(rows, hk, d, generator=g).to(DEVICE)
    b = torch.randn(rows, hk, d, generator=g).to(DEVICE) if two_terms else None
    x = torch.randn(ids, hk, d, generator=g).to(DEVICE, dtype)
    y = torch.randn(ids, hk, d, generator=g).to(DEVICE, dtype) if two_terms else None
    tables = torch.randint(0, ids, (rows, width), generator=g, dtype=torch.int32)
    ncols = torch.tensor([70, 13, 0], dtype=torch.int32)
    tables[1, 13:] = 10**6  # ids past a row's count (e.g. host-tier ids) are never read
    tables, ncols = tables.to(DEVICE), ncols.to(DEVICE)
    want = kv_scores_ref(a, x, tables, ncols, b, y)
    got = kv_scores(a, x, tables, ncols, b, y, block_c=16)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    assert (got[fin] - want[fin]).abs().max().item() < 1e-4 * (1 + want[fin].abs().max().item())
    assert not fin[2].any() and fin[1, :13].all() and not fin[1, 13:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_reads_selected_block_lists(dtype: torch.dtype) -> None:
    """A row's table may be any ordered list of blocks (sink, chosen, window: not its logical blocks) with
    its length counting their tokens; entries past the length are never read (a retrieving row's table
    keeps stale or host-tier ids there)."""
    g = torch.Generator().manual_seed(11)
    batch, hk, group, dim, bs, nblocks = 3, 2, 3, 16, 4, 30
    k_cache = torch.randn(nblocks * bs, hk, dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(nblocks * bs, hk, dim, generator=g).to(DEVICE, dtype)
    q = torch.randn(batch, hk * group, dim, generator=g).to(DEVICE, dtype)
    width = 20
    tables = torch.full((batch, width), 10**7, dtype=torch.int32)  # ids far outside the cache
    lists = [[0, 17, 4, 9, 28, 12], [3, 21], [5, 6, 7, 8, 25, 26, 27, 29]]
    lens = []
    for r, blocks in enumerate(lists):
        tables[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        lens.append((len(blocks) - 1) * bs + 1 + r)  # the last listed block partly filled
    tables, lens_t = tables.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want = paged_decode_ref(q, k_cache, v_cache, tables, lens_t, 0.3, bs)
    got = paged_decode(q, k_cache, v_cache, tables, lens_t, 0.3, bs, tile=16)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float()).abs().max().item() < tol
