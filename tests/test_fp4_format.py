"""`FP4Format` (server/contract/fp4_format.py) as a second format of a dense layer: its forward equals
dequantize-then-matmul of the quantized primary weight, its scales keep their dtypes through the model
cast, and a calibrated quantizer plugs in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actserve.kernels.fp4_ref import dequantize, quantize_rtn
from actserve.server.contract.fp4_format import FP4Format
from actserve.server.layers.fp4_search import output_error, search_fp4
from actserve.server.layers.linear import Linear, MergedColumnLinear, linear
from actserve.server.models.loader import cast_to_model_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dense_layer(k: int, n: int, bias: bool, seed: int) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    return layer


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [3, 40])
def test_forward_equals_dequantize_then_matmul(kind: str, bias: bool, rows: int) -> None:
    """3 rows take the GEMV on CUDA, 40 the GEMM; on the CPU both take the reference."""
    layer = dense_layer(64, 24, bias, seed=rows + bias + len(kind))
    fmt = layer.add_format("fp4", FP4Format(kind))  # type: ignore[arg-type]
    layer.after_loading()
    layer.to(DEVICE)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    w_hat = dequantize(quantize_rtn(layer.weight.detach().float().cpu(), kind)).to(DEVICE)  # type: ignore[arg-type]
    want = F.linear(x, w_hat, layer.bias)
    got = fmt.apply(layer, x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert (got - layer(x)).abs().max() > 1e-4  # the primary format stays dense
    assert torch.equal(linear(x, layer), layer(x))


def test_parameters_and_model_cast() -> None:
    layer = MergedColumnLinear(64, [16, 8], bias=True)
    layer.add_format("fp4", FP4Format("nvfp4"))
    layer.add_format("mx", FP4Format("mxfp4"))
    cast_to_model_dtype(layer, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in layer.named_parameters()}
    assert dtypes == {
        "weight": torch.bfloat16,
        "bias": torch.bfloat16,
        "fp4_weight_packed": torch.uint8,
        "fp4_weight_scale": torch.float8_e4m3fn,
        "fp4_weight_global_scale": torch.float32,
        "mx_weight_packed": torch.uint8,
        "mx_weight_scale": torch.uint8,
    }
    assert layer.fp4_weight_packed.shape == (24, 32) and layer.mx_weight_scale.shape == (24, 2)
    assert not layer.formats["fp4"].from_checkpoint
    with pytest.raises(ValueError, match="multiple of 32"):
        Linear(48, 8).add_format("mx", FP4Format("mxfp4"))
    with pytest.raises(ValueError, match="quantize function"):  # a copy must be derived somehow
        Linear(64, 8).add_format("fp4", FP4Format(quantize=None))


def test_calibrated_quantizer() -> None:
    """A quantizer over calibration inputs (the scale search) replaces round-to-nearest."""
    layer = dense_layer(64, 24, False, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(128, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8 + torch.eye(64))
    layer.add_format("rtn", FP4Format("nvfp4"))
    layer.add_format("cal", FP4Format("nvfp4", quantize=lambda w, kind: search_fp4(w, x, kind)))
    layer.after_loading()
    w = layer.weight.detach()
    errs = {key: output_error(w, layer.formats[key].weight(layer), x).norm() for key in ("rtn", "cal")}  # type: ignore[attr-defined]
    assert errs["cal"] < errs["rtn"]
