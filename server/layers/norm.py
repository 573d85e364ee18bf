"""RMSNorm computed the way transformers computes it (float32 variance, cast back before the weight),
and the fused residual-add + steering + norm used between decoder layers (Triton on CUDA)."""

from __future__ import annotations

import torch

from actserve.kernels.moe_ref import PendingSum, sum_columns
from actserve.kernels.steer_rmsnorm_ref import SteeringTensors, add_steer_rmsnorm_ref


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_steer_rmsnorm_ref(None, x, self.weight, self.eps)[0]

    def add_forward(
        self,
        x: torch.Tensor | PendingSum | None,
        residual: torch.Tensor,
        layer: int = -1,
        steer: SteeringTensors | None = None,
        zero: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(h), h) with h = residual + x, steered as after decoder layer `layer`. x may be a one-row
        sparse GEMV's pending float32 sums (kernels/sparse_gemv.py `is_sums`): rounded to the residual's
        dtype, then zeroed; `zero`: another such buffer whose reader is done, zeroed here too. x may also be
        a MoE layer's unadded columns (`PendingSum`), added here."""
        if residual.is_cuda:
            from actserve.kernels.steer_rmsnorm import add_steer_rmsnorm

            parts = x.slots if isinstance(x, PendingSum) else None
            x = x.products if isinstance(x, PendingSum) else x
            return add_steer_rmsnorm(x, residual, self.weight, self.eps, layer, steer, zero=zero, parts=parts)
        if isinstance(x, PendingSum):
            x = sum_columns(x.products, x.slots, residual.dtype)
        if x is not None and x.dtype == torch.float32 and residual.dtype != torch.float32:
            x, pending = x.to(residual.dtype), x
            pending.zero_()
        if zero is not None:
            zero.zero_()
        return add_steer_rmsnorm_ref(x, residual, self.weight, self.eps, layer, steer)
