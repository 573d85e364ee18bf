"""Scores of KV blocks for retrieval (Triton version of `kv_scores_ref`): one program per (row, tile of
block columns) reads the tile's block ids from the row's table and each block's summary vectors by id,
so no gathered copy of the summaries is ever formed (at a 128k context and 16-token blocks that copy
would be 8192 blocks x heads x dims per row and layer). Columns at or past the row's count get -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_scores_kernel(
    a_ptr, b_ptr, x_ptr, y_ptr, bt_ptr, n_ptr, out_ptr,
    stride_ar, stride_ag, stride_xi, stride_xg, stride_bt, stride_or,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, HAS_B: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    n = tl.load(n_ptr + r)
    cols = c0 + tl.arange(0, BLOCK_C)
    cm = cols < n
    ids = tl.load(bt_ptr + r * stride_bt + cols, mask=cm, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for g in range(KV_HEADS):
        av = tl.load(a_ptr + r * stride_ar + g * stride_ag + d).to(tl.float32)
        xv = tl.load(
            x_ptr + ids[:, None] * stride_xi + g * stride_xg + d[None, :], mask=cm[:, None], other=0.0
        )
        acc += tl.sum(xv.to(tl.float32) * av[None, :], axis=1)
        if HAS_B:
            bv = tl.load(b_ptr + r * stride_ar + g * stride_ag + d).to(tl.float32)
            yv = tl.load(
                y_ptr + ids[:, None] * stride_xi + g * stride_xg + d[None, :], mask=cm[:, None], other=0.0
            )
            acc += tl.sum(yv.to(tl.float32) * bv[None, :], axis=1)
    acc = tl.where(cm, acc, float("-inf"))
    tl.store(out_ptr + r * stride_or + cols, acc)  # `out` is padded to whole tiles


def kv_scores(
    a: torch.Tensor,
    x: torch.Tensor,
    tables: torch.Tensor,
    ncols: torch.Tensor,
    b: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    block_c: int = 64,
) -> torch.Tensor:
    """[R, W] float32 scores (see `kv_scores_ref`). a, b contiguous [R, Hk, D]; x, y [ids, Hk, D] with a
    unit last stride (the same strides); tables [R, W] int32; ncols [R] int32. Head size a power of two."""
    rows, width = tables.shape
    hk, dim = x.shape[1], x.shape[2]
    out = torch.empty(rows, triton.cdiv(width, block_c) * block_c, dtype=torch.float32, device=a.device)
    has_b = b is not None and y is not None
    _kv_scores_kernel[(rows, triton.cdiv(width, block_c))](
        a, b if has_b else a, x, y if has_b else x, tables, ncols, out,
        a.stride(0), a.stride(1), x.stride(0), x.stride(1), tables.stride(0), out.stride(0),
        KV_HEADS=hk, HEAD_DIM=dim, BLOCK_C=block_c, HAS_B=has_b,
    )  # fmt: skip
    return out[:, :width]
