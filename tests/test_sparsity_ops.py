"""kernels/sparsity_ops.py against kernels/sparsity_ops_ref.py on fresh random inputs (Triton's interpreter
on the CPU, the real compile on a GPU): the per-request counters of skipped entries (thresholded or exact
zeros, an R-Sparse cost, rows that must not count) and the per-row threshold mask."""

from __future__ import annotations

import pytest
import torch

from actserve.kernels.sparsity_ops import count_skipped, threshold_mask
from actserve.kernels.sparsity_ops_ref import count_skipped_ref, threshold_mask_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows_of(n: int, slots: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """level / method / slot columns as the plugin's row inputs hold them (int32 [n, width] views): some
    rows dense (level 0 or -1), some of no method, the rest spread over the slots."""
    level = torch.randint(-1, 4, (n, 1), generator=g, dtype=torch.int32)
    method = torch.randint(-1, 4, (n, 1), generator=g, dtype=torch.int32)
    slot = torch.randint(0, slots, (n, 2), generator=g, dtype=torch.int32)
    level[0], method[0] = 2, 0  # at least one row that counts
    return tuple(t.to(DEVICE)[:, 0] for t in (level, method, slot))


@pytest.mark.parametrize("with_thr", [True, False])
@pytest.mark.parametrize("k", [37, 1500])
def test_count_skipped_matches_reference(with_thr: bool, k: int) -> None:
    g = torch.Generator().manual_seed(k + with_thr)
    n, slots = 9, 5
    x = torch.randn(n, k, generator=g)
    x[x.abs() < 0.3] = 0  # exact zeros for the count without thresholds
    x = x.to(DEVICE, torch.bfloat16)
    thr = (torch.rand(n, 3, generator=g) * 1.5).to(DEVICE)[:, 1] if with_thr else None  # a strided view
    cost = torch.rand(n, generator=g, dtype=torch.float64).to(DEVICE) * 10
    counted = torch.tensor([1, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    level, method, slot = rows_of(n, slots, g)
    for c in (None, cost):
        want = torch.rand(slots + 1, 2, generator=g, dtype=torch.float64).to(DEVICE)
        got = want.clone()
        count_skipped_ref(want, x, counted, level, method, slot, thr, c)
        count_skipped(got, x, counted, level, method, slot, thr, c)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
        assert not torch.equal(got[:slots], want[:slots] * 0)  # something was counted


def test_count_skipped_ignores_rows_that_do_not_count() -> None:
    x = torch.zeros(3, 64, device=DEVICE)
    table = torch.zeros(4, 2, dtype=torch.float64, device=DEVICE)
    level = torch.tensor([0, 2, 2], dtype=torch.int32, device=DEVICE)  # row 0: dense
    method = torch.tensor([0, -1, 1], dtype=torch.int32, device=DEVICE)  # row 1: no method
    counted = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)  # row 2: a method not counting here
    count_skipped(table, x, counted, level, method, torch.zeros(3, dtype=torch.int32, device=DEVICE))
    assert table.abs().sum().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_mask_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3000, generator=g).to(DEVICE, dtype)
    thr = torch.rand(5, 2, generator=g).to(DEVICE)[:, 0]
    thr[1] = 0.0  # a dense row: untouched
    got = threshold_mask(x, thr)
    assert torch.equal(got, threshold_mask_ref(x, thr))
    assert torch.equal(got[1], x[1]) and (got[0] == 0).float().mean() > 0.2


def test_fused_count_target_picks_the_rows_count_skipped_counts() -> None:
    """`Counters.target` (the slot a one-row fused GEMV counts at, -1: none) adds, for each single row
    of random level / method / slot, exactly what `count_skipped_ref` adds for it."""
    from actserve.interventions.base import PROJECTIONS
    from actserve.interventions.sparsity.hooks import INPUT, METHOD, SLOT, Counters

    g = torch.Generator().manual_seed(21)
    counters = Counters(5, torch.device(DEVICE))
    for proj in PROJECTIONS:
        counted = counters.counted[PROJECTIONS.index(proj)]
        for r in range(12):
            level, method, slot = (t[r : r + 1] for t in rows_of(12, 5, g))
            x = torch.randn(1, 40, generator=g).to(DEVICE)
            thr = x.abs().quantile(0.5).reshape(1)
            inputs = {INPUT: level[:, None], METHOD: method[:, None], SLOT: slot[:, None].expand(1, 2)}
            at = counters.target(proj, inputs)
            got = torch.zeros(6, 2, dtype=torch.float64, device=DEVICE)
            if at[0] >= 0:
                got[at[0]] += torch.tensor([(x.abs() < thr).sum().item(), 40.0], dtype=torch.float64)
            want = torch.zeros_like(got)
            count_skipped_ref(want, x, counted, level, method, slot, thr)
            assert torch.equal(got, want)
