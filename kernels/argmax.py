"""Row-wise argmax of float32 logits in two small launches (beside kernels/argmax_ref.py).

Why: torch's argmax reduces a [1, 128256] row in one thread block, 27 us on the H200, longer than a decode
step's attention for a layer; spread over 64 programs and folded by a second launch it is a few us.

Each entry becomes one int64 whose order is the pick's: the float's bits as an order-preserving int32
(-0.0 as 0.0, every NaN above +inf) in the high half, and INT32_MAX minus its index in the low half, so
the largest key is the largest value at the lowest index, as torch.argmax picks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _partial_kernel(x_ptr, part_ptr, V, stride_x, P, BLOCK: tl.constexpr):
    """Program (row, p): the best key of the row's columns [p * BLOCK, (p + 1) * BLOCK)."""
    r = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    cols = p * BLOCK + tl.arange(0, BLOCK)
    ok = cols < V
    x = tl.load(x_ptr + r * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    bits = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(x != x, 0x7FFFFFFF, key)  # NaN: above +inf (0x7F800000)
    packed = (key.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)
    packed = tl.where(ok, packed, -9223372036854775807 - 1)
    tl.store(part_ptr + r * P + p, tl.max(packed, axis=0))


@triton.jit
def _final_kernel(part_ptr, out_ptr, P, P_PAD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, P_PAD)
    packed = tl.load(part_ptr + r * P + j, mask=j < P, other=-9223372036854775807 - 1)
    best = tl.max(packed, axis=0)
    tl.store(out_ptr + r, 0x7FFFFFFF - (best & 0xFFFFFFFF))


def argmax_rows(x: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """`argmax_rows_ref` for a float32 [rows, V] tensor with unit column stride (V < 2^31)."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.dtype == torch.float32
    rows, v = x.shape
    block = min(block, triton.next_power_of_2(max(v, 16)))
    parts = triton.cdiv(v, block)
    part = torch.empty(rows, parts, dtype=torch.int64, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    _partial_kernel[(rows, parts)](x, part, v, x.stride(0), parts, BLOCK=block, num_warps=4)
    _final_kernel[(rows,)](part, out, parts, P_PAD=triton.next_power_of_2(parts), num_warps=1)
    return out
