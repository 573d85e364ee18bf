"""W4A16 matmul y = x @ W.T (+ bias) with W in NVFP4 or MXFP4 (kernels/fp4_ref.py: layout, reference).

Hopper has no FP4 tensor cores, so the weights are dequantized in registers: each program loads packed
bytes (two E2M1 codes each) and the block scales of its tile, builds the float32 weights by bit
arithmetic (exactly `fp4_ref.dequantize`), rounds them to the activations' dtype and multiplies with fp32
accumulation. A byte holds an even and an odd column, so a tile is kept as two half-width matrices
(even, odd columns) multiplied with the even and odd activation columns: no interleave in registers.

`fp4_gemv` (1-16 rows, decode) tiles the output features and splits K over a second grid axis, so a
batch-1 launch still has enough programs to stream the weights at full bandwidth; partial sums go
through a float32 workspace. `fp4_gemm` (prefill) tiles M and N. Both are first, simple versions: the
block sizes are placeholders for tuning on the H200.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from actserve.kernels.fp4_ref import GROUP, Fp4Weight
from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.kernels.pdl import pdl_args, pdl_sync


@dataclass(frozen=True)
class Fp4Config:
    block_m: int = 16  # GEMM only
    block_n: int = 32
    block_k: int = 256  # unpacked columns per step (a power of two >= 32: tl.dot needs 16 packed)
    split_k: int = 0  # GEMV only; 0: pick from the shape
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _e2m1(code):
    """float32 value of int32 E2M1 codes (bit 3 sign; 2^(e-1) * (1 + m/2), or m/2 when e = 0)."""
    exp = (code >> 1) & 3
    man = code & 1
    normal = (((exp + 126) << 23) | (man << 22)).to(tl.float32, bitcast=True)
    mag = tl.where(exp > 0, normal, man.to(tl.float32) * 0.5)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _block_scale(s_ptr, mask, gs_ptr, rn, n_ok, stride_gs, NVFP4: tl.constexpr):
    """float32 multiplier of the blocks at s_ptr: E4M3 / the global scale of row rn (one IEEE division,
    as the reference; scales are never negative), or the E8M0 power of two 2^(e - 127)."""
    s = tl.load(s_ptr, mask=mask, other=0).to(tl.int32)
    if NVFP4:
        exp = (s >> 3) & 15
        man = s & 7
        normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
        val = tl.where(exp > 0, normal, man.to(tl.float32) * 0.001953125)  # subnormal: m * 2^-9
        gs = tl.load(gs_ptr + rn * stride_gs, mask=n_ok, other=1.0)
        return tl.div_rn(val, gs[:, None])
    return tl.where(s > 0, s << 23, 1 << 22).to(tl.float32, bitcast=True)


@triton.jit
def _weight_pair(w_ptr, s_ptr, gs_ptr, rn, n_ok, rj, j_ok, stride_wn, stride_sn, stride_gs, dtype,
                 NVFP4: tl.constexpr, HALF_GROUP: tl.constexpr):  # fmt: skip
    """The [BLOCK_N, BLOCK_K/2] weights of packed columns rj: (even columns, odd columns) in `dtype`.
    The NVFP4 global scale is per row (stride_gs 1) or one for all (stride_gs 0)."""
    mask = n_ok[:, None] & j_ok[None, :]
    byte = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rj[None, :], mask=mask, other=0)
    byte = byte.to(tl.int32)
    s_at = s_ptr + rn.to(tl.int64)[:, None] * stride_sn + (rj // HALF_GROUP)[None, :]
    scale = _block_scale(s_at, mask, gs_ptr, rn, n_ok, stride_gs, NVFP4)
    even = (_e2m1(byte & 15) * scale).to(dtype)
    odd = (_e2m1(byte >> 4) * scale).to(dtype)
    return even, odd


@triton.jit
def _accumulate(acc, x_rows, m_ok, rj, j_ok, w_ptr, s_ptr, gs_ptr, rn, n_ok, stride_wn, stride_sn,
                stride_gs, NVFP4: tl.constexpr, HALF_GROUP: tl.constexpr, DOT: tl.constexpr,
                PREC: tl.constexpr):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] + the products over packed columns rj: x rows at x_rows (pointers to
    their first element), the weights dequantized in registers; tl.dot (tensor cores) or, for one row,
    a broadcast multiply and sum."""
    x_mask = m_ok[:, None] & j_ok[None, :]
    x_even = tl.load(x_rows + 2 * rj[None, :], mask=x_mask, other=0.0)
    x_odd = tl.load(x_rows + 2 * rj[None, :] + 1, mask=x_mask, other=0.0)
    w_even, w_odd = _weight_pair(
        w_ptr, s_ptr, gs_ptr, rn, n_ok, rj, j_ok, stride_wn, stride_sn, stride_gs, x_even.dtype, NVFP4,
        HALF_GROUP,
    )  # fmt: skip
    if DOT:
        acc += tl.dot(x_even, tl.trans(w_even), input_precision=PREC)
        acc += tl.dot(x_odd, tl.trans(w_odd), input_precision=PREC)
    else:
        part = w_even.to(tl.float32) * x_even.to(tl.float32) + w_odd.to(tl.float32) * x_odd.to(tl.float32)
        acc += tl.sum(part, axis=1)[None, :]
    return acc


@triton.jit
def _fp4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, b_ptr, y_ptr, M, N, K, k_split, stride_xm, stride_wn, stride_sn,
    stride_gs, stride_ym, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NVFP4: tl.constexpr,
    HALF_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (n tile, K split): with PARTIAL, float32 sums into slice `split` of the workspace y."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None] * stride_xm
    k_end = tl.minimum(K, (split + 1) * k_split)
    pdl_sync(USE_PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * k_split, k_end, BLOCK_K):
        rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        acc = _accumulate(
            acc, x_rows, m_ok, rj, 2 * rj < k_end, w_ptr, s_ptr, gs_ptr, rn, n_ok, stride_wn, stride_sn,
            stride_gs, NVFP4, HALF_GROUP, BLOCK_M > 1, PREC,
        )  # fmt: skip
    y_mask = m_ok[:, None] & n_ok[None, :]
    y_at = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if PARTIAL:
        tl.store(y_at + split * stride_ys, acc, mask=y_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _fp4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_gs, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NVFP4: tl.constexpr,
    HALF_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        acc = _accumulate(
            acc, x_rows, m_ok, rj, 2 * rj < K, w_ptr, s_ptr, gs_ptr, rn, n_ok, stride_wn, stride_sn,
            stride_gs, NVFP4, HALF_GROUP, True, PREC,
        )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_at = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _operands(x: torch.Tensor, w: Fp4Weight) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Checked shapes; (scales as bytes, global scale or a dummy pointer, its row stride, packed)."""
    n, k = w.shape
    if x.shape[1] != k or x.stride(1) != 1 or w.packed.stride(1) != 1 or w.scales.stride(1) != 1:
        raise ValueError(f"fp4 matmul: x {tuple(x.shape)} does not match weight {(n, k)} (K-contiguous)")
    if k % GROUP[w.kind]:
        raise ValueError(f"{w.kind} needs K divisible by {GROUP[w.kind]}, got {k}")
    scales = w.scales.view(torch.uint8)
    gs = w.global_scale if w.global_scale is not None else scales
    if gs.numel() not in (1, n) and w.global_scale is not None:
        raise ValueError(f"NVFP4 global scale: {gs.numel()} values for {n} rows")
    return scales, gs, int(gs.numel() == n and n > 1), w.packed


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def pick_split(n_tiles: int, k: int, block_k: int) -> int:
    """K splits so that a skinny launch has ~256 programs (about two per H200 SM); a placeholder."""
    return max(1, min(triton.cdiv(k, block_k), 256 // max(n_tiles, 1)))


def fp4_gemv(
    x: torch.Tensor, w: Fp4Weight, bias: torch.Tensor | None = None, cfg: Fp4Config | None = None
) -> torch.Tensor:
    """x [M <= 16, K] @ dequantize(w).T (+ bias) -> [M, N] in x's dtype."""
    cfg = cfg or Fp4Config()
    m, n = x.shape[0], w.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fp4_gemv handles at most {MAX_ROWS} rows; got {m}")
    scales, gs, stride_gs, packed = _operands(x, w)
    k = x.shape[1]
    n_tiles = triton.cdiv(n, cfg.block_n)
    splits = cfg.split_k or pick_split(n_tiles, k, cfg.block_k)
    k_split = triton.cdiv(triton.cdiv(k, splits), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if not m:
        return y
    out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    _fp4_gemv_kernel[(n_tiles, splits)](
        x, packed, scales, gs, bias if bias is not None else x, out, m, n, k, k_split, x.stride(0),
        packed.stride(0), scales.stride(0), stride_gs, out.stride(-2), out.stride(0),
        BLOCK_M=1 if m == 1 else MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NVFP4=w.kind == "nvfp4", HALF_GROUP=GROUP[w.kind] // 2, HAS_BIAS=bias is not None,
        PARTIAL=splits > 1, PREC=_prec(x), **pdl_args(x), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits == 1:
        return y
    total = out.sum(0)
    if bias is not None:
        total += bias.float()
    return y.copy_(total)


def fp4_gemm(
    x: torch.Tensor, w: Fp4Weight, bias: torch.Tensor | None = None, cfg: Fp4Config | None = None
) -> torch.Tensor:
    """x [M, K] @ dequantize(w).T (+ bias) -> [M, N] in x's dtype, for prefill-sized M."""
    cfg = cfg or Fp4Config(block_m=64, block_n=64, block_k=64, num_stages=3)
    m, n = x.shape[0], w.shape[0]
    scales, gs, stride_gs, packed = _operands(x, w)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _fp4_gemm_kernel[(triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))](
            x, packed, scales, gs, bias if bias is not None else x, y, m, n, x.shape[1], x.stride(0),
            packed.stride(0), scales.stride(0), stride_gs, y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NVFP4=w.kind == "nvfp4",
            HALF_GROUP=GROUP[w.kind] // 2, HAS_BIAS=bias is not None, PREC=_prec(x),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return y
