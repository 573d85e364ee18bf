"""Plain-torch reference for `sparse_gemv`: threshold the input, then the same fp32 matmul as `gemv_ref`.

The weight is the transposed one, W^T [K, N] (what the kernel reads); the mask is the sparsity plugin's:
an entry with |x| < the row's threshold becomes 0, so a threshold <= 0 keeps every bit of its row
(NaN and -0.0 included), and +inf zeroes every finite entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_ref_rounded(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up rounded to the storage dtype after the silu and after the product, as
    kernels/silu_mul.py and `gemv_ref` form it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate.float()).to(gate.dtype).float() * up.float()).to(gate.dtype)


def threshold_ref(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """x [M, K] with the entries |x| < thr[m] zeroed (thr [M] float32)."""
    return x.masked_fill(x.abs() < thr.to(torch.float32).unsqueeze(1), 0)


def sparse_gemv_ref(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thr: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """threshold(x) @ weight_t (+ bias) in float32, rounded once to x's dtype; thr None: no threshold;
    silu_mul: x = [gate | up], thresholded after silu(gate) * up is formed."""
    if silu_mul:
        x = silu_mul_ref_rounded(x)
    if thr is not None:
        x = threshold_ref(x, thr)
    y = x.float() @ weight_t.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
