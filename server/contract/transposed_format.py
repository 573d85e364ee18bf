"""`TransposedFormat`: a second copy of a layer's matrix stored transposed, W^T [in, out], for the sparse
GEMV (kernels/sparse_gemv.py; docs/architecture.md §5, §6 "Activation sparsity").

A plugin whose linear-input hook zeroes small input entries (`LinearInputHook.thresholds`) asks for it
on the projections it acts on (`FormatRequest(key, sites, TransposedFormat)`); the copy is derived at
start from the loaded primary (`layer.dense_weight()`, so over an FP4 primary it is the dequantized
matrix in the model dtype) and is not in the checkpoint. In W^T an input entry is one contiguous row, so
the kernel skips the weight rows of entries that are zero in every row of the step. The layer reaches it
through `apply_thresholded` only: its `apply` (the dense product over the copy) serves derived uses and
tests, and the primary keeps computing every step that does not hand thresholds over, so rows of other
requests keep the primary's bits. The copy costs the layer's dense weight bytes once more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.server.contract.weights import LinearBase, Shard, WeightFormat

FUSED_DTYPES = (torch.bfloat16, torch.float16)


class TransposedFormat(WeightFormat):
    """W^T [in, out] in the model dtype (`<key>_weight_t`); the bias stays the primary's (`layer.bias`)."""

    from_checkpoint = False

    def create(self, layer: LinearBase, params_dtype: torch.dtype | None) -> None:
        wt = torch.empty(layer.input_size, layer.output_size, dtype=params_dtype)
        layer.register_parameter(self.prefix + "weight_t", nn.Parameter(wt, requires_grad=False))

    def load_shard(
        self,
        layer: LinearBase,
        name: str,
        param: nn.Parameter | None,
        loaded: torch.Tensor,
        shard: Shard | None,
    ) -> None:
        raise ValueError("TransposedFormat is derived from the primary weight, not read from a checkpoint")

    def after_loading(self, layer: LinearBase) -> None:
        self.weight_t(layer).copy_(layer.dense_weight().t())

    def weight_t(self, layer: LinearBase) -> torch.Tensor:
        return getattr(layer, self.prefix + "weight_t")

    def dense_weight(self, layer: LinearBase) -> torch.Tensor:
        return self.weight_t(layer).t()

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether the sparse kernel takes x: decode-sized CUDA rows in bf16/fp16 (elsewhere the layer
        masks and runs its primary, exactly as without this copy)."""
        return x.is_cuda and x.shape[0] <= MAX_ROWS and x.dtype in FUSED_DTYPES

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if self.fuses(x):
            from actserve.kernels.sparse_gemv import sparse_gemv

            return sparse_gemv(x, self.weight_t(layer), None, layer.bias)
        return F.linear(x, self.dense_weight(layer), layer.bias)

    def apply_thresholded(
        self,
        layer: LinearBase,
        x: torch.Tensor,
        thr: torch.Tensor,
        silu_mul: bool = False,
        sums: str | None = None,
        count: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """The sparse GEMV; `sums`: one row's float32 sums left for the caller's reader (kernels/
        sparse_gemv.py). x may be such sums of one row (the gate/up projection's, read by down_proj).
        `count`: counted by the same launch."""
        wt = self.weight_t(layer)
        pending = x.is_cuda and x.shape[0] == 1 and x.dtype == torch.float32 and wt.dtype in FUSED_DTYPES
        if not (self.fuses(x) or pending):
            return None
        from actserve.kernels.sparse_gemv import sparse_gemv

        return sparse_gemv(x, wt, thr, layer.bias, silu_mul=silu_mul, sums_key=sums, count=count)
