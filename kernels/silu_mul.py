"""silu(gate) * up in one pass over the fused gate_up output (instead of split + silu + mul)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from actserve.kernels.pdl import pdl_args, pdl_sync


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < inter
    dtype = out_ptr.dtype.element_ty
    pdl_sync(USE_PDL)
    gate = tl.load(x_ptr + row * 2 * inter + cols, mask=m, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * inter + inter + cols, mask=m, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # F.silu rounds to the storage dtype before the product
    tl.store(out_ptr + row * inter + cols, (act.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=m)


def silu_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    rows, two_inter = gate_up.shape
    inter = two_inter // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            gate_up, out, inter, BLOCK=block, **pdl_args(gate_up)
        )
    return out
