"""Fused residual add + per-row steering + RMSNorm in Triton; semantics in steer_rmsnorm_ref.py.

x may be a one-row sparse GEMV's pending float32 sums (kernels/sparse_gemv.py `is_sums`): each entry is
rounded to the residual's dtype first, as the GEMV's cast kernel would have stored it (so the bits are
the cast path's), and the sums are zeroed after the read. `zero`: another float32 buffer of pending sums
whose reader has finished (the gate/up sums the down projection read), zeroed by extra programs of the
same launch. Either way the sparse GEMV's cast launches go (issue 14)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from actserve.kernels.pdl import pdl_args, pdl_sync
from actserve.kernels.steer_rmsnorm_ref import SteeringTensors

ZERO_BLOCK = 4096  # float32 entries of `zero` per extra program


@triton.jit
def _add_steer_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    table_ptr, mask_ptr, idx_ptr, scale_ptr, norm_ptr,
    layer, num_layers, hidden, eps,
    zero_ptr, rows, zero_n, parts_ptr,
    K: tl.constexpr, K_PAD: tl.constexpr, HAS_X: tl.constexpr, HAS_STEER: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr, X_SUMS: tl.constexpr = False, ZERO_BLOCK: tl.constexpr = 0,
    PARTS: tl.constexpr = 0,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    if ZERO_BLOCK > 0:
        if row >= rows:  # a program past the rows: one block of `zero`
            pdl_sync(USE_PDL)
            z = (row - rows) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + z, tl.zeros([ZERO_BLOCK], tl.float32), mask=z < zero_n)
            return
    cols = tl.arange(0, BLOCK)
    m = cols < hidden
    dtype = res_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=m, other=0.0)  # no kernel writes weights: read before the wait
    pdl_sync(USE_PDL)
    h = tl.load(res_ptr + row * hidden + cols, mask=m, other=0.0)
    if HAS_X and PARTS > 0:  # a MoE layer's columns: added in order (-1 columns +0.0), rounded once
        xs = tl.zeros([BLOCK], tl.float32)
        for c in tl.static_range(PARTS):
            col_on = (tl.load(parts_ptr + row * PARTS + c) >= 0).to(tl.int32)
            xs += tl.load(x_ptr + (row * PARTS + c) * hidden + cols, mask=cols < hidden * col_on, other=0.0)
        h = (h.to(tl.float32) + xs.to(dtype).to(tl.float32)).to(dtype)
    elif HAS_X:
        x = tl.load(x_ptr + row * hidden + cols, mask=m, other=0.0)
        if X_SUMS:  # rounded as the cast would store it; then the buffer is zero again
            x = x.to(dtype)
            tl.store(x_ptr + row * hidden + cols, tl.zeros([BLOCK], tl.float32), mask=m)
        h = (h.to(tl.float32) + x.to(tl.float32)).to(dtype)
    # one vector load of the row's slot indices: most rows (and every padded graph row) have none, and
    # the K dependent scalar loads below were on every row's path
    if HAS_STEER:
        kk = tl.arange(0, K_PAD)
        any_on = tl.max(tl.load(idx_ptr + row * K + kk, mask=kk < K, other=-1), axis=0) >= 0
        if any_on:
            for k in tl.static_range(K):
                idx = tl.load(idx_ptr + row * K + k)
                on = idx >= 0
                safe = tl.where(on, idx, 0)
                on = on & (tl.load(mask_ptr + safe * num_layers + layer) != 0)
                if on:
                    s = tl.load(scale_ptr + row * K + k)
                    v = tl.load(table_ptr + (safe * num_layers + layer) * hidden + cols, mask=m, other=0.0)
                    sv = (s * v.to(tl.float32)).to(dtype)
                    new = (h.to(tl.float32) + sv.to(tl.float32)).to(dtype)
                    if tl.load(norm_ptr + row * K + k) != 0:
                        hf = h.to(tl.float32)
                        nf = new.to(tl.float32)
                        before = tl.sqrt(tl.sum(hf * hf, axis=0))
                        after = tl.maximum(tl.sqrt(tl.sum(nf * nf, axis=0)), 1e-12)
                        new = (nf * (before / after)).to(dtype)
                    h = new
    tl.store(res_out_ptr + row * hidden + cols, h, mask=m)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / hidden
    normed = (hf * tl.rsqrt(var + eps)).to(dtype)
    tl.store(out_ptr + row * hidden + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=m)


def add_steer_rmsnorm(
    x: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    layer: int = -1,
    steer: SteeringTensors | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    zero: torch.Tensor | None = None,
    parts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `add_steer_rmsnorm_ref`; rows × hidden, contiguous. x may be pending float32
    sums (module docstring: rounded, then zeroed); `zero`: a contiguous float32 buffer to zero as well.
    `parts` [rows, k] (a MoE layer's slots, -1: none): x is that layer's unadded columns [rows * k,
    hidden] float32 (kernels/moe_ref.PendingSum), added here as `sum_columns` adds them."""
    rows, hidden = residual.shape
    if parts is not None and (
        x is None or x.shape != (rows * parts.shape[1], hidden) or not parts.is_contiguous()
    ):
        raise ValueError(f"add_steer_rmsnorm: parts {tuple(parts.shape)} do not fit x and {rows} rows")
    x_sums = parts is None and x is not None and x.dtype == torch.float32 and residual.dtype != torch.float32
    extra = triton.cdiv(zero.numel(), ZERO_BLOCK) if zero is not None else 0
    normed, res_out = out if out is not None else (torch.empty_like(residual), torch.empty_like(residual))
    has_steer = steer is not None and layer >= 0
    dummy = residual
    _add_steer_rmsnorm_kernel[(rows + extra,)](
        x if x is not None else dummy, residual, weight, normed, res_out,
        steer.table if has_steer else dummy,
        steer.layer_mask if has_steer else dummy,
        steer.index if has_steer else dummy,
        steer.scale if has_steer else dummy,
        steer.normalize if has_steer else dummy,
        max(layer, 0), steer.table.shape[1] if has_steer else 1, hidden, eps,
        zero if zero is not None else dummy, rows, zero.numel() if zero is not None else 0,
        parts if parts is not None else dummy, PARTS=parts.shape[1] if parts is not None else 0,
        X_SUMS=x_sums, ZERO_BLOCK=ZERO_BLOCK if extra else 0, K=steer.index.shape[1] if has_steer else 1,
        K_PAD=triton.next_power_of_2(steer.index.shape[1]) if has_steer else 1,
        HAS_X=x is not None, HAS_STEER=has_steer, BLOCK=triton.next_power_of_2(hidden), **pdl_args(residual),
    )  # fmt: skip
    return normed, res_out
