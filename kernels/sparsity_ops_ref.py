"""Plain-torch references of kernels/sparsity_ops.py: the sparsity plugin's per-request counters of the
input entries a step's decode rows skip, and a row's threshold applied to its input
(docs/architecture.md §6, "Activation sparsity")."""

from __future__ import annotations

import torch


def count_skipped_ref(
    table: torch.Tensor,
    x: torch.Tensor,
    counted: torch.Tensor,
    level: torch.Tensor,
    method: torch.Tensor,
    slot: torch.Tensor,
    thr: torch.Tensor | None = None,
    cost: torch.Tensor | None = None,
) -> None:
    """table [slots + 1, 2] float64 += (entries skipped, entries) per counted row of x [rows, K], at the
    row's slot. A row counts when its level index is > 0, its method index >= 0 and `counted[method]`
    (int [methods]: the method counts this projection). Skipped: entries with |x| < thr[row] (thr float32
    [rows]) or, without thr, entries equal to 0; less cost[row] (float64) where given."""
    below = x.abs() < thr.unsqueeze(1) if thr is not None else x == 0
    skipped = below.sum(1, dtype=torch.float64)
    if cost is not None:
        skipped = skipped - cost
    m = method.long()
    rows = (level > 0) & (m >= 0) & (counted[m.clamp(min=0)] != 0)
    at = torch.where(rows, slot.long(), table.shape[0] - 1)
    values = torch.stack([skipped, torch.full_like(skipped, x.shape[1])], dim=1)
    table.index_add_(0, at, values * rows.unsqueeze(1))


def threshold_mask_ref(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """x with the entries of row r where |x| < thr[r] set to 0 (thr float32 [rows]; -inf or 0: none)."""
    return x.masked_fill(x.abs() < thr.unsqueeze(1), 0)
