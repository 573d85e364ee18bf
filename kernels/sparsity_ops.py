"""The sparsity plugin's per-site work in one launch each (kernels/sparsity_ops_ref.py has the
semantics): the per-request counters of skipped entries, and a row's threshold applied to its input.
In torch these took about a dozen small kernels per projection, which inside a decode CUDA graph cost
more than the sparse GEMV saved at one row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from actserve.kernels.pdl import pdl_args, pdl_sync

BLOCK = 1024
# a row of up to this many entries is counted in one load (a one-row decode step's count sits between
# the norm and the qkv GEMV: each loop trip there is a memory latency on the step's critical path)
COUNT_BLOCK = 8192


@triton.jit
def _count_kernel(
    table_ptr, x_ptr, counted_ptr, level_ptr, method_ptr, slot_ptr, thr_ptr, cost_ptr,
    K, stride_x, stride_level, stride_method, stride_slot, stride_thr,
    HAS_THR: tl.constexpr, HAS_COST: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """One row: its skipped entries and its width, added to its slot's counters (float64 atomics)."""
    r = tl.program_id(0).to(tl.int64)
    pdl_sync(USE_PDL)
    level = tl.load(level_ptr + r * stride_level)
    method = tl.load(method_ptr + r * stride_method)
    counts = tl.load(counted_ptr + tl.maximum(method, 0))
    if (level > 0) & (method >= 0) & (counts != 0):
        slot = tl.load(slot_ptr + r * stride_slot).to(tl.int64)
        if HAS_THR:
            thr = tl.load(thr_ptr + r * stride_thr)
        n = tl.zeros([BLOCK_K], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + r * stride_x + k, mask=k < K, other=1.0).to(tl.float32)
            if HAS_THR:
                below = tl.abs(x) < thr
            else:
                below = x == 0.0
            n += (below & (k < K)).to(tl.int32)
        skipped = tl.sum(n, axis=0).to(tl.float64)
        if HAS_COST:
            skipped -= tl.load(cost_ptr + r)
        tl.atomic_add(table_ptr + slot * 2, skipped, sem="relaxed")
        tl.atomic_add(table_ptr + slot * 2 + 1, K.to(tl.float64), sem="relaxed")


def count_skipped(
    table: torch.Tensor,
    x: torch.Tensor,
    counted: torch.Tensor,
    level: torch.Tensor,
    method: torch.Tensor,
    slot: torch.Tensor,
    thr: torch.Tensor | None = None,
    cost: torch.Tensor | None = None,
) -> None:
    """count_skipped_ref in one launch (x [rows, K] row-contiguous; level / method / slot / thr may be
    strided views [rows])."""
    rows, k = x.shape
    if not rows:
        return
    assert table.dtype == torch.float64 and x.stride(1) == 1
    assert cost is None or (cost.dtype == torch.float64 and cost.is_contiguous())
    thr_arg, thr_stride = (thr, thr.stride(0)) if thr is not None else (x, 0)
    _count_kernel[(rows,)](
        table, x, counted, level, method, slot, thr_arg, cost if cost is not None else table,
        k, x.stride(0), level.stride(0), method.stride(0), slot.stride(0), thr_stride,
        HAS_THR=thr is not None, HAS_COST=cost is not None,
        BLOCK_K=min(COUNT_BLOCK, triton.next_power_of_2(k)), **pdl_args(x),
    )  # fmt: skip


@triton.jit
def _mask_kernel(
    x_ptr, thr_ptr, y_ptr, K, stride_x, stride_thr, stride_y, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    pdl_sync(USE_PDL)
    x = tl.load(x_ptr + r * stride_x + k, mask=k < K, other=0.0)
    thr = tl.load(thr_ptr + r * stride_thr)
    tl.store(y_ptr + r * stride_y + k, tl.where(tl.abs(x.to(tl.float32)) < thr, 0.0, x), mask=k < K)


def threshold_mask(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """threshold_mask_ref in one launch (x [rows, K] row-contiguous, thr float32 [rows], may be strided)."""
    rows, k = x.shape
    y = torch.empty_like(x)
    if rows:
        assert x.stride(1) == 1 and thr.dtype == torch.float32
        _mask_kernel[(rows, triton.cdiv(k, BLOCK))](
            x, thr, y, k, x.stride(0), thr.stride(0), y.stride(0), BLOCK_K=BLOCK, **pdl_args(x)
        )
    return y
