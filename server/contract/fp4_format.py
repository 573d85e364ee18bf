"""`FP4Format`: a linear layer's weight in NVFP4 or MXFP4, as its primary format or as a second one.

- Primary, quantized at load (`actserve serve --quantization nvfp4|mxfp4`): the layer reads the
  checkpoint's dense `weight` and quantizes each checkpoint matrix as it arrives (`quantize`,
  round-to-nearest by default), so no dense copy is ever allocated.
- Primary, from a packed checkpoint (`quantize=None`; compressed-tensors' "nvfp4-pack-quantized", as
  llm-compressor writes it): the layer reads `weight_packed`, `weight_scale` and `weight_global_scale`
  as they are.
- Second format (`layer.add_format("fp4", ...)`, e.g. for per-request precision): derived in
  `after_loading` from the layer's primary weight (`layer.dense_weight()`), whole, by `quantize`.

Storage is the compressed-tensors layout of kernels/fp4_ref.py under compressed-tensors' parameter
names (`weight_packed`, `weight_scale`, `weight_global_scale`, prefixed by the format's key). A primary
NVFP4 format keeps one global scale per output row: the matrices of a merged layer (q/k/v, gate/up)
each come with their own, and each is copied into its shard's rows, so no block scale is re-rounded;
the derived copy has one for the whole layer. The scales keep their own dtypes when the model is cast
(`fixed_dtype`). The bias, if any, is read from the checkpoint by a primary format and is the dense
format's otherwise.

`apply`: on CUDA, up to MAX_ROWS rows go through the split-K FP4 GEMV and more (prefill) through
`fp4_linear`: the weight dequantized to the activations' dtype by one Triton pass, then cuBLAS, far
faster than a GEMM that dequantizes in its tile loop (kernels/fp4_gemm.py); on the CPU, the plain-torch
reference (dequantize, then matmul). silu(gate)·up runs as its own kernel before the down projection:
fused into the one-row FP4 GEMV's loads it cost more than it saved (H200, Llama-3-8B shape: batch-1
decode 224 tok/s fused, 260 unfused; bench/results/fp4_e2e.json is the unfused run).

It sits in the contract, beside `WeightFormat`, so that plugins can ask for FP4 copies of projections
(`FormatRequest(key, sites, partial(FP4Format, kind))`): a plugin imports only the contract and the
kernels, never the layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from actserve.kernels.fp4_ref import GROUP, Fp4Kind, Fp4Weight, dequantize, fp4_matmul_ref, quantize_rtn
from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.server.contract.weights import LinearBase, Shard, WeightFormat, copy_rows

# (dense weight [N, K] float32, kind) -> its FP4 form
Fp4Quantizer = Callable[[torch.Tensor, Fp4Kind], Fp4Weight]


class FP4Format(WeightFormat):
    """An FP4 weight: the layer's primary format, or a copy of its dense weight added under a key
    (`layer.add_format("fp4", ...)`); module docstring."""

    fixed_dtype = frozenset({"weight_scale", "weight_global_scale"})
    PACKED = ("weight_packed", "weight_scale", "weight_global_scale")

    def __init__(self, kind: Fp4Kind = "nvfp4", quantize: Fp4Quantizer | None = quantize_rtn) -> None:
        """`quantize`: how a dense matrix becomes FP4 (None: the checkpoint holds the packed tensors)."""
        super().__init__()
        self.kind: Fp4Kind = kind
        self.quantize = quantize

    @property
    def derived(self) -> bool:
        """A second format, computed from the primary dense weight after loading."""
        return bool(self.prefix)

    @property
    def from_checkpoint(self) -> bool:  # type: ignore[override]
        return not self.derived

    def create(self, layer: LinearBase, params_dtype: torch.dtype | None) -> None:
        n, k = layer.output_size, layer.input_size
        group = GROUP[self.kind]
        if k % group:
            raise ValueError(f"{self.kind} needs the input size to be a multiple of {group}, got {k}")
        if self.derived and self.quantize is None:
            raise ValueError("a derived FP4Format needs a quantize function")
        scale_dtype = torch.float8_e4m3fn if self.kind == "nvfp4" else torch.uint8
        params = {
            "weight_packed": torch.zeros(n, k // 2, dtype=torch.uint8),
            "weight_scale": torch.zeros(n, k // group, dtype=scale_dtype),
        }
        if self.kind == "nvfp4":
            params["weight_global_scale"] = torch.ones(1 if self.derived else n, dtype=torch.float32)
        for name, t in params.items():
            layer.register_parameter(self.prefix + name, nn.Parameter(t, requires_grad=False))
        if not self.derived:  # the primary format owns the bias
            bias = nn.Parameter(torch.zeros(n, dtype=params_dtype), requires_grad=False)
            layer.register_parameter("bias", bias if layer.has_bias else None)

    def checkpoint_names(self, layer: LinearBase) -> frozenset[str] | None:
        if self.derived:
            return frozenset()
        packed = self.PACKED if self.kind == "nvfp4" else self.PACKED[:2]  # MXFP4: no global scale
        names = {"weight"} if self.quantize is not None else set(packed)
        return frozenset(names | ({"bias"} if layer.has_bias else set()))

    def load_shard(
        self,
        layer: LinearBase,
        name: str,
        param: nn.Parameter | None,
        loaded: torch.Tensor,
        shard: Shard | None,
    ) -> None:
        if name == "weight" and self.quantize is not None and not self.derived:
            rows = shard or Shard(0, layer.output_size)
            if loaded.shape != (rows.size, layer.input_size):
                raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != {(rows.size, layer.input_size)}")
            target = getattr(layer, self.prefix + "weight_packed").device
            self._store(layer, self.quantize(loaded.to(target, torch.float32), self.kind), rows)
            return
        if param is None or self.derived:
            raise ValueError(f"this FP4Format does not read {name} from the checkpoint")
        if name == "weight_global_scale":  # one per checkpoint matrix: onto each of its rows
            loaded = loaded.reshape(-1).expand(shard.size if shard else param.shape[0])
        copy_rows(param, loaded, shard)

    def _store(self, layer: LinearBase, q: Fp4Weight, rows: Shard | None) -> None:
        """Copy FP4 matrix `q` into this format's parameters (into `rows` of them; None: all)."""
        p = self.prefix
        copy_rows(getattr(layer, p + "weight_packed"), q.packed, rows)
        copy_rows(getattr(layer, p + "weight_scale"), q.scales, rows)
        if q.global_scale is not None:
            gs = getattr(layer, p + "weight_global_scale")
            copy_rows(gs, q.global_scale.expand(rows.size if rows else gs.shape[0]), rows)

    def after_loading(self, layer: LinearBase) -> None:
        if not self.derived:
            return
        assert self.quantize is not None
        self._store(layer, self.quantize(layer.dense_weight().detach().float(), self.kind), None)

    def storage(self, param: torch.Tensor) -> str:
        """The kind ("nvfp4"), for codes, scales and a primary format's bias alike."""
        return self.kind

    def weight(self, layer: LinearBase) -> Fp4Weight:
        p = self.prefix
        gs = getattr(layer, p + "weight_global_scale") if self.kind == "nvfp4" else None
        return Fp4Weight(
            self.kind, getattr(layer, p + "weight_packed"), getattr(layer, p + "weight_scale"), gs
        )

    def dense_weight(self, layer: LinearBase) -> torch.Tensor:
        return dequantize(self.weight(layer))

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        w, bias = self.weight(layer), layer.bias
        if not x.is_cuda:
            return fp4_matmul_ref(x, w, bias)
        from actserve.kernels.fp4_gemm import fp4_gemv, fp4_linear

        if x.shape[0] > MAX_ROWS:
            return fp4_linear(x, w, bias)
        return fp4_gemv(x.contiguous(), w, bias)
