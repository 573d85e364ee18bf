"""Plain-torch reference for `gemv`: the same products and the same rounding points."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# rows the Triton GEMV takes; here, so that callers can ask without importing triton (a CPU install)
MAX_ROWS = 16


def gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False
) -> torch.Tensor:
    """x @ weight.T (+ bias) in float32, rounded once to x's dtype; silu_mul: x = [gate | up]."""
    if silu_mul:
        gate, up = x.chunk(2, dim=-1)
        x = (F.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
