"""`FP4Format`: an NVFP4 or MXFP4 copy of a dense linear layer's weight, a second format beside it.

The copy is derived in `after_loading` from the layer's primary (dense) weight, by round-to-nearest
unless a `quantize` function is given (e.g. `fp4_search.search_fp4` over calibration inputs), and kept
in the compressed-tensors layout of kernels/fp4_ref.py under compressed-tensors' parameter names
(`<key>_weight_packed`, `<key>_weight_scale`, `<key>_weight_global_scale`). The scales keep their own
dtypes when the model is cast (`fixed_dtype`). The bias, if any, is the primary format's.

`apply`: on CUDA, up to MAX_ROWS rows go through the split-K FP4 GEMV and more through the FP4 GEMM
(kernels/fp4_gemm.py); on the CPU, the plain-torch reference (dequantize, then matmul).

It sits in the contract, beside `WeightFormat`, so that plugins can ask for FP4 copies of projections
(`FormatRequest(key, sites, partial(FP4Format, kind))`): a plugin imports only the contract and the
kernels, never the layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from actserve.kernels.fp4_ref import GROUP, Fp4Kind, Fp4Weight, fp4_matmul_ref, quantize_rtn
from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.server.contract.weights import LinearBase, Shard, WeightFormat

# (dense weight [N, K] float32, kind) -> its FP4 form
Fp4Quantizer = Callable[[torch.Tensor, Fp4Kind], Fp4Weight]


class FP4Format(WeightFormat):
    """An FP4 copy of the primary dense weight; add it under a key (`layer.add_format("fp4", ...)`)."""

    from_checkpoint = False
    fixed_dtype = frozenset({"weight_scale", "weight_global_scale"})

    def __init__(self, kind: Fp4Kind = "nvfp4", quantize: Fp4Quantizer = quantize_rtn) -> None:
        super().__init__()
        self.kind: Fp4Kind = kind
        self.quantize = quantize

    def create(self, layer: LinearBase, params_dtype: torch.dtype | None) -> None:
        if not self.prefix:
            raise ValueError("FP4Format is derived from the layer's dense weight: add it as a second format")
        n, k = layer.output_size, layer.input_size
        group = GROUP[self.kind]
        if k % group:
            raise ValueError(f"{self.kind} needs the input size to be a multiple of {group}, got {k}")
        scale_dtype = torch.float8_e4m3fn if self.kind == "nvfp4" else torch.uint8
        params = {
            "weight_packed": torch.zeros(n, k // 2, dtype=torch.uint8),
            "weight_scale": torch.zeros(n, k // group, dtype=scale_dtype),
        }
        if self.kind == "nvfp4":
            params["weight_global_scale"] = torch.ones(1, dtype=torch.float32)
        for name, t in params.items():
            layer.register_parameter(self.prefix + name, nn.Parameter(t, requires_grad=False))

    def load_shard(
        self, layer: LinearBase, name: str, param: nn.Parameter, loaded: torch.Tensor, shard: Shard | None
    ) -> None:
        raise ValueError(f"FP4Format's {name} is derived after loading, not read from the checkpoint")

    def after_loading(self, layer: LinearBase) -> None:
        dense = layer._parameters.get("weight")
        if dense is None:
            raise ValueError("FP4Format needs the layer's dense weight")
        q = self.quantize(dense.detach().float(), self.kind)
        with torch.no_grad():
            getattr(layer, self.prefix + "weight_packed").copy_(q.packed)
            getattr(layer, self.prefix + "weight_scale").copy_(q.scales)
            if q.global_scale is not None:
                getattr(layer, self.prefix + "weight_global_scale").copy_(q.global_scale)

    def weight(self, layer: LinearBase) -> Fp4Weight:
        p = self.prefix
        gs = getattr(layer, p + "weight_global_scale") if self.kind == "nvfp4" else None
        return Fp4Weight(
            self.kind, getattr(layer, p + "weight_packed"), getattr(layer, p + "weight_scale"), gs
        )

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        w, bias = self.weight(layer), layer.bias
        if not x.is_cuda:
            return fp4_matmul_ref(x, w, bias)
        from actserve.kernels.fp4_gemm import fp4_gemm, fp4_gemv

        x = x.contiguous()
        return fp4_gemv(x, w, bias) if x.shape[0] <= MAX_ROWS else fp4_gemm(x, w, bias)
