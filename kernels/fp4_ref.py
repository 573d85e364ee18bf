"""Plain-torch reference of the FP4 weight formats (NVFP4, MXFP4) and of W4A16 matmul with them.

The packed layout is the one `compressed-tensors` (PyPI, checked against 0.20.1; the format llm-compressor
writes as "nvfp4-pack-quantized" / "mxfp4-pack-quantized") stores, so such a checkpoint loads without
repacking:

- `packed` (`weight_packed`): uint8 [N, K/2]; byte j of a row holds column 2j in its LOW nibble and
  column 2j+1 in its HIGH nibble. A nibble is an E2M1 code: bit 3 the sign, bits 0-2 the index into
  0, 0.5, 1, 1.5, 2, 3, 4, 6.
- NVFP4 `scales` (`weight_scale`): float8_e4m3fn [N, K/16], one per 16 consecutive columns of a row, and
  `global_scale` (`weight_global_scale`): float32 [1], a DIVISOR: W = e2m1 * (float(scale) / global_scale),
  with global_scale = 448 * 6 / amax(W) so the block scales use E4M3's whole range. Here it may also be
  [N], one per output row: a merged layer (q/k/v, gate/up) whose checkpoint matrices each carry their
  own global scale then loads by copying each one into its shard's rows, without re-rounding any scale.
- MXFP4 `scales` (`weight_scale`): uint8 [N, K/32], E8M0 biased exponents: W = e2m1 * 2^(scale - 127).

`effective_scale` + `dequantize` define the weights bit for bit (float32 arithmetic); the Triton kernels
(kernels/fp4_gemm.py) compute the same numbers. Quantizing divides in float64 so the rounding onto the
grid is that of the exact quotient (round to nearest, ties to the even code, saturating at +-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Fp4Kind = Literal["nvfp4", "mxfp4"]
GROUP: dict[str, int] = {"nvfp4": 16, "mxfp4": 32}  # columns per block scale
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_BIAS = 127
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code & 7 -> |value|
ENCODE_CHUNK = 1 << 24  # weights rounded at a time


@dataclass(frozen=True)
class Fp4Weight:
    """One FP4 matrix [N, K] in the compressed-tensors layout (module docstring)."""

    kind: Fp4Kind
    packed: torch.Tensor  # uint8 [N, K/2]
    scales: torch.Tensor  # nvfp4: float8_e4m3fn [N, K/16]; mxfp4: uint8 [N, K/32]
    global_scale: torch.Tensor | None = None  # nvfp4: float32 [1] or [N] (a divisor); mxfp4: None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], 2 * self.packed.shape[1]


def e2m1_table(device: torch.device | str | None = None) -> torch.Tensor:
    """float32 [16]: the value of each E2M1 code (8-15 are the negatives of 0-7; 8 is -0.0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e4m3_table(device: torch.device | str | None = None) -> torch.Tensor:
    """float32 [256]: the value of each float8_e4m3fn bit pattern (127 and 255 are NaN)."""
    codes = torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8)
    return codes.view(torch.float8_e4m3fn).float()


def _round_to_grid(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index into `grid` (ascending, >= 0, even index = even code) of the nearest point to |x|, ties to
    the even index, saturating at the last point."""
    a = x.abs().to(torch.float64).clamp(max=grid[-1].item())
    mid = (grid[:-1] + grid[1:]) / 2
    idx = torch.searchsorted(mid, a)  # count of midpoints below a: a tie lands on the lower index
    tie = a == mid[idx.clamp(max=mid.numel() - 1)]
    return torch.where(tie & (idx % 2 == 1), idx + 1, idx)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes of the values x (already divided by their scale)."""
    grid = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64, device=x.device)
    mag = _round_to_grid(x, grid)
    return (mag | (torch.signbit(x).long() << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return e2m1_table(codes.device)[codes.long()]


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn nearest to x (ties to even, saturating at +-448), without a detour through float32."""
    grid = e4m3_table(x.device)[:127].double()  # codes 0..126: 0 up to 448, ascending
    mag = _round_to_grid(x, grid)
    return (mag | (torch.signbit(x).long() << 7)).to(torch.uint8).view(torch.float8_e4m3fn)


def e8m0_decode(exps: torch.Tensor) -> torch.Tensor:
    """float32 2^(e - 127) for uint8 biased exponents e (255, NaN in E8M0, is never written here)."""
    one = torch.ones(exps.shape, dtype=torch.float64, device=exps.device)
    return torch.ldexp(one, exps.to(torch.int32) - E8M0_BIAS).float()


def e8m0_encode(x: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponent floor(log2 x) + 127 for x > 0, clamped to [0, 254]."""
    _, ex = torch.frexp(x.double())  # x = m * 2^ex, m in [0.5, 1)
    return (ex - 1 + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> [N, K/2]: column 2j in the low nibble, 2j+1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def effective_scale(kind: Fp4Kind, scales: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 [N, K/group]: the multiplier of each block's E2M1 values (one float32 division for NVFP4,
    as compressed-tensors and the kernels compute it)."""
    if kind == "nvfp4":
        if global_scale is None:
            raise ValueError("NVFP4 needs a global scale")
        return scales.float() / global_scale.float().reshape(-1, 1)
    return e8m0_decode(scales)


def dequantize(w: Fp4Weight) -> torch.Tensor:
    """float32 [N, K]."""
    eff = effective_scale(w.kind, w.scales, w.global_scale)
    values = e2m1_decode(unpack_nibbles(w.packed))
    return values * eff.repeat_interleave(GROUP[w.kind], dim=1)


def _groups(weight: torch.Tensor, kind: Fp4Kind) -> torch.Tensor:
    n, k = weight.shape
    g = GROUP[kind]
    if k % g:
        raise ValueError(f"{kind} needs K divisible by {g}, got {k}")
    return weight.reshape(n, k // g, g)


def nvfp4_global_scale(weight: torch.Tensor) -> torch.Tensor:
    """float32 [1]: 448 * 6 / amax(weight) (1 for an all-zero weight)."""
    amax = weight.abs().max().double()
    g = torch.where(amax > 0, E4M3_MAX * E2M1_MAX / amax, torch.ones_like(amax))
    return g.float().reshape(1)


def absmax_scales(
    weight: torch.Tensor, kind: Fp4Kind, global_scale: torch.Tensor | None = None, ratio: float = 1.0
) -> torch.Tensor:
    """Block scales that map each group's absmax (times `ratio`, a clipping factor) onto E2M1's largest
    value: E4M3 nearest to amax / 6 * global_scale for NVFP4; the OCP MX rule floor(log2 amax) - 2 for
    MXFP4 (that clips values in (6, 8) x scale to 6)."""
    amax = _groups(weight, kind).abs().amax(dim=-1).double() * ratio
    if kind == "nvfp4":
        if global_scale is None:
            raise ValueError("NVFP4 needs a global scale")
        return e4m3_encode((amax / E2M1_MAX * global_scale.double().reshape(-1, 1)).clamp(max=E4M3_MAX))
    exps = e8m0_encode(amax).int() - 2
    return torch.where(amax > 0, exps, 0).clamp(0, 254).to(torch.uint8)


def encode_with_scales(
    weight: torch.Tensor, kind: Fp4Kind, scales: torch.Tensor, global_scale: torch.Tensor | None = None
) -> Fp4Weight:
    """Round `weight` [N, K] onto the E2M1 grid of the given block scales and pack it (rows a chunk at a
    time: the float64 temporaries of a whole lm_head would take tens of GB)."""
    eff = effective_scale(kind, scales, global_scale).double()
    rows = max(1, ENCODE_CHUNK // max(weight.shape[1], 1))
    packed = []
    for i in range(0, weight.shape[0], rows):
        groups = _groups(weight[i : i + rows].double(), kind)
        e = eff[i : i + rows, :, None]
        q = torch.where(e > 0, groups / e, 0.0)
        packed.append(pack_nibbles(e2m1_encode(q.flatten(1))))
    return Fp4Weight(kind, torch.cat(packed), scales, global_scale)


def quantize_rtn(weight: torch.Tensor, kind: Fp4Kind) -> Fp4Weight:
    """Round-to-nearest with absmax scales (the baseline the scale search improves on)."""
    gs = nvfp4_global_scale(weight) if kind == "nvfp4" else None
    return encode_with_scales(weight, kind, absmax_scales(weight, kind, gs), gs)


def fp4_matmul_ref(x: torch.Tensor, w: Fp4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequantize(w).T (+ bias): the weights rounded to x's dtype (what the kernels multiply),
    products summed in float32, the result rounded once to x's dtype."""
    weight = dequantize(w).to(x.dtype).float()
    y = x.float() @ weight.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
