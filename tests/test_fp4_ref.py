"""The FP4 reference (kernels/fp4_ref.py) against an independent float64 implementation written here from
the formats' bit layouts, on fresh random inputs: value tables, rounding, quantize -> dequantize, packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actserve.kernels.fp4_ref import (
    dequantize,
    e2m1_decode,
    e2m1_encode,
    e2m1_table,
    e4m3_encode,
    e4m3_table,
    e8m0_decode,
    e8m0_encode,
    pack_nibbles,
    quantize_rtn,
    unpack_nibbles,
)


def e2m1_value(code: int) -> float:
    sign, exp, man = (code >> 3) & 1, (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return -mag if sign else mag


def e4m3_value(code: int) -> float:
    sign, exp, man = code >> 7, (code >> 3) & 15, code & 7
    if exp == 15 and man == 7:
        return float("nan")
    mag = man / 8 * 2.0**-6 if exp == 0 else 2.0 ** (exp - 7) * (1 + man / 8)
    return -mag if sign else mag


def round_binade(a: np.ndarray, mantissa_bits: int, min_exp: int, top: float) -> np.ndarray:
    """Nearest value with `mantissa_bits` stored bits (ties to even), per binade, saturating at `top`."""
    a = np.minimum(np.abs(a), top)
    exp = np.maximum(np.floor(np.log2(np.where(a > 0, a, 1.0))), min_exp)
    step = 2.0 ** (exp - mantissa_bits)
    return np.round(a / step) * step  # numpy rounds half to even: the even quotient has the even mantissa


def e2m1_round(v: np.ndarray) -> np.ndarray:
    return np.copysign(round_binade(v, 1, 0, 6.0), v)


def e4m3_round(v: np.ndarray) -> np.ndarray:
    return np.copysign(round_binade(v, 3, -6, 448.0), v)


def fake_quant64(w: torch.Tensor, kind: str) -> np.ndarray:
    """Round-to-nearest with absmax block scales, from the format definitions alone."""
    a = w.double().numpy()
    group = 16 if kind == "nvfp4" else 32
    blocks = a.reshape(a.shape[0], -1, group)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    if kind == "nvfp4":
        g = np.float32(448 * 6 / np.abs(a).max())
        s = e4m3_round(np.minimum(amax / 6 * np.float64(g), 448.0)).astype(np.float32)
        eff = (s / g).astype(np.float64)  # one float32 division
    else:
        exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -127)
        eff = 2.0 ** np.clip(exp, -127, 127)
    q = e2m1_round(np.divide(blocks, eff, out=np.zeros_like(blocks), where=eff > 0))
    return (q * eff).astype(np.float32).reshape(a.shape)  # value * scale is exact in float64


def test_e2m1_table_round_trips() -> None:
    table = e2m1_table()
    codes = torch.arange(16, dtype=torch.uint8)
    assert table.tolist() == [e2m1_value(c) for c in range(16)]
    assert torch.equal(e2m1_encode(table), codes)  # -0.0 encodes as code 8
    assert torch.equal(e2m1_decode(codes), table)


def test_e4m3_table_round_trips() -> None:
    table = e4m3_table().double()
    want = torch.tensor([e4m3_value(c) for c in range(256)], dtype=torch.float64)
    finite = ~want.isnan()
    assert finite.sum() == 254 and torch.equal(table[finite], want[finite]) and table[~finite].isnan().all()
    codes = torch.arange(256)[finite].to(torch.uint8)
    assert torch.equal(e4m3_encode(table[finite]).view(torch.uint8), codes)


def test_e8m0_table_round_trips() -> None:
    exps = torch.arange(255, dtype=torch.int32).to(torch.uint8)
    values = e8m0_decode(exps)
    assert values.tolist() == [2.0 ** (e - 127) for e in range(255)]
    assert torch.equal(e8m0_encode(values), exps)


@pytest.mark.parametrize("seed", range(3))
def test_rounding_matches_float64(seed: int) -> None:
    """Random values spread over many binades, plus exact midpoints of both grids (the ties)."""
    g = torch.Generator().manual_seed(seed)
    binades = torch.exp2(torch.randint(-12, 10, (4000,), generator=g).double())
    v = torch.randn(4000, generator=g, dtype=torch.float64) * binades
    mids2 = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
    table = e4m3_table().double()[:127]
    mids4 = (table[1:] + table[:-1]) / 2
    for x, rnd, enc in ((torch.cat([v / 100, mids2, -mids2]), e2m1_round, e2m1_encode),
                        (torch.cat([v, mids4, -mids4]), e4m3_round, e4m3_encode)):  # fmt: skip
        want = torch.from_numpy(rnd(x.numpy()))
        got = enc(x)
        got = e2m1_decode(got).double() if got.dtype == torch.uint8 else got.double()
        assert torch.equal(got, want)


SHAPES = [(8, 64), (5, 96), (16, 256)]


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_dequantize_matches_float64(kind: str, shape: tuple[int, int]) -> None:
    """Rows of very different magnitudes (E4M3 subnormal block scales, MXFP4 clipping), an all-zero block,
    and bf16-representable inputs as checkpoints hold."""
    n, k = shape
    g = torch.Generator().manual_seed(n * k + len(kind))
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-14, 3, (n, 1), generator=g)).float()
    w[0, :32] = 0
    w = w.to(torch.bfloat16).float()
    q = quantize_rtn(w, kind)  # type: ignore[arg-type]
    assert q.packed.shape == (n, k // 2) and q.packed.dtype == torch.uint8 and q.shape == (n, k)
    got = dequantize(q)
    assert torch.equal(got, torch.from_numpy(fake_quant64(w, kind)))
    assert (got - w).norm() < 0.2 * w.norm()  # and it is a quantization of w at all


@pytest.mark.parametrize("shape", [(3, 8), (7, 130)])
def test_packing_round_trips(shape: tuple[int, int]) -> None:
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(shape[1]), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (shape[0], shape[1] // 2) and torch.equal(unpack_nibbles(packed), codes)
    c = codes.tolist()
    want = [[c[r][2 * j] | c[r][2 * j + 1] << 4 for j in range(shape[1] // 2)] for r in range(shape[0])]
    assert packed.tolist() == want  # even column in the low nibble (compressed-tensors' order)
    with pytest.raises(ValueError, match="even number"):
        pack_nibbles(codes[:, :-1])
