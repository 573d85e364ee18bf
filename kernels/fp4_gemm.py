"""W4A16 matmul y = x @ W.T (+ bias) with W in NVFP4 or MXFP4 (kernels/fp4_ref.py: layout, reference).

Hopper has no FP4 tensor cores, so the weights are dequantized in registers: each program loads packed
bytes (two E2M1 codes each) and the block scales of its tile, builds the float32 weights by bit
arithmetic (exactly `fp4_ref.dequantize`), rounds them to the activations' dtype and multiplies with fp32
accumulation. A byte holds an even and an odd column, so a tile is kept as two half-width matrices
(even, odd columns) multiplied with the even and odd activation columns: no interleave in registers.

`fp4_gemv` (1-16 rows, decode) tiles the output features and splits K over a second grid axis, so a
batch-1 launch still has enough programs to stream the weights at full bandwidth; partial sums go
through a float32 workspace. `fp4_linear` (more rows: prefill) dequantizes the weight once with
`fp4_dequantize` and hands it to cuBLAS. `fp4_gemm`, the fused GEMM that tiles M and N, is kept as the
comparison (bench/fp4_gemv.py): every M tile redoes the dequant, and on the H200 it is far slower.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from actserve.kernels.fp4_ref import GROUP, Fp4Weight
from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.kernels.pdl import pdl_args, pdl_sync


@dataclass(frozen=True)
class Fp4Config:
    block_m: int = 16  # GEMM only
    block_n: int = 32
    block_k: int = 256  # unpacked columns per step: a power of two, >= 32 and >= the format's group
    split_k: int = 0  # GEMV only; 0: pick from the shape
    num_warps: int = 4
    num_stages: int = 2


def pick_gemv_config(m: int, n: int, k: int) -> Fp4Config:
    """Launch config per shape for 1-16 rows; see bench/results/fp4_gemv.json for the sweep."""
    if m == 1:  # 8-row tiles won on every projection; long K tiles where there are few of them
        if n >= 6144:
            return Fp4Config(block_n=8, block_k=512, num_warps=8, num_stages=3)
        return Fp4Config(block_n=8, block_k=2048, num_warps=4, num_stages=3)
    return Fp4Config(block_n=64, block_k=256 if k > 8192 else 128, num_warps=4, num_stages=3)


def pick_gemm_config(m: int, n: int, k: int) -> Fp4Config:
    """Launch config of the prefill GEMM: small tiles for decode batches above 16 rows, large ones for
    prompts (bench/results/fp4_gemv.json)."""
    if m <= 64:
        return Fp4Config(block_m=max(16, triton.next_power_of_2(m)), block_n=64, block_k=128, num_stages=4)
    return Fp4Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


@triton.jit
def _e2m1_lo(b):
    """2^-14 x the E2M1 value of the low nibble of int16 bytes b, as float32.

    The three magnitude bits go where a float16's exponent and first mantissa bit end (bits 9-11) and
    the sign to bit 15: a float16 with exponent field e and mantissa m/2 is 2^(e-15)(1 + m/2), and for
    e = 0 the subnormal m/2 * 2^-14, so every code lands exactly on 2^-14 x its value. Callers fold
    2^14 into the block scale (exact: a power of two). Four integer operations, no select."""
    bits = ((b & 7) << 9) | ((b & 8) << 12)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_hi(b):
    """`_e2m1_lo` of the high nibble."""
    bits = ((b & 0x70) << 5) | ((b & 0x80) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


# PTX for `_e2m1_word`: nibbles k and k + 4 of the word become one float16 pair (magnitude bits to 9-11
# of each half, sign bits to 15), each half widened to float32 (operand 8 is the word, 0-7 the values).
_WORD_PAIRS = ((9, 12, 0, 4), (5, 8, 1, 5), (1, 4, 2, 6), (-3, 0, 3, 7))  # shifts of magnitude, sign; k, k+4


def _shift(reg: str, src: str, by: int) -> str:
    op = "shl" if by > 0 else "shr"
    return f"{op}.b32 {reg}, {src}, {abs(by)};" if by else f"mov.b32 {reg}, {src};"


E2M1_WORD_PTX = tl.constexpr(
    "{ .reg .b32 m, s; .reg .b16 lo, hi; "
    + " ".join(
        f"{_shift('m', '$8', mag)} and.b32 m, m, 0x0E000E00; {_shift('s', '$8', sign)} "
        f"and.b32 s, s, 0x80008000; or.b32 m, m, s; mov.b32 {{lo, hi}}, m; "
        f"cvt.f32.f16 ${k}, lo; cvt.f32.f16 ${k4}, hi;"
        for mag, sign, k, k4 in _WORD_PAIRS
    )
    + " }"
)


@triton.jit
def _e2m1_nibble(w, k: tl.constexpr):
    """`_e2m1_lo` of nibble k of int32 words w, in plain Triton (the interpreter's path)."""
    c = w >> (4 * k)
    bits = (((c & 7) << 9) | ((c & 8) << 12)).to(tl.int16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_word(w, ASM: tl.constexpr):
    """2^-14 x the E2M1 values of the eight nibbles of int32 words w (nibble k is column 8j + k of word
    j), as eight float32 tensors. ASM: four shift-and-mask steps make float16 pairs (`_e2m1_lo`'s trick
    on two nibbles at once) in inline PTX, about 3.5 instructions per value; else plain Triton."""
    if ASM:
        return tl.inline_asm_elementwise(
            E2M1_WORD_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1
        )
    return (
        _e2m1_nibble(w, 0), _e2m1_nibble(w, 1), _e2m1_nibble(w, 2), _e2m1_nibble(w, 3),
        _e2m1_nibble(w, 4), _e2m1_nibble(w, 5), _e2m1_nibble(w, 6), _e2m1_nibble(w, 7),
    )  # fmt: skip


@triton.jit
def _block_scales(s_at, mask, NVFP4: tl.constexpr, ASM: tl.constexpr):
    """2^14 x the value of the block scales at s_at: E4M3 (never negative; ASM: the hardware's FP8
    conversion, else bit arithmetic) or the E8M0 power of two 2^(e - 127)."""
    s = tl.load(s_at, mask=mask, other=0)
    if NVFP4:
        if ASM:
            return s.to(tl.float8e4nv, bitcast=True).to(tl.float32) * 16384.0
        s = s.to(tl.int32)
        exp = (s >> 3) & 15
        man = s & 7
        normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
        return tl.where(exp > 0, normal, man.to(tl.float32) * 0.001953125) * 16384.0  # subnormal m*2^-9
    return (tl.minimum(s.to(tl.int32) + 14, 255) << 23).to(tl.float32, bitcast=True)  # 2^(e - 127 + 14)


@triton.jit
def _group_scales(s_at, mask, gs_ptr, rn, n_ok, stride_gs, NVFP4: tl.constexpr):
    """2^14 x the float32 multiplier of the blocks at s_at: E4M3 / the global scale of row rn (one IEEE
    division, as the reference, so dequantized weights match it bit for bit), or the E8M0 power of two."""
    val = _block_scales(s_at, mask, NVFP4, False)
    if NVFP4:
        gs = tl.load(gs_ptr + rn * stride_gs, mask=n_ok, other=1.0)
        return tl.div_rn(val * (1.0 / 16384.0), gs[:, None]) * 16384.0
    return val


@triton.jit
def _tile_bytes(w_rows, s_rows, gs_ptr, rn, n_ok, k0, k_end, stride_gs, BLOCK_K: tl.constexpr,
                GROUP: tl.constexpr, NVFP4: tl.constexpr, GLOBAL: tl.constexpr = True,
                ASM: tl.constexpr = False):  # fmt: skip
    """Packed bytes [BLOCK_N, groups, GROUP/2] (int16) of columns k0 .. k0 + BLOCK_K, their 2^14-scaled
    block multipliers [BLOCK_N, groups], and which groups lie before k_end [groups]. GLOBAL=False leaves
    the NVFP4 global scale out (the caller divides its sums once per output; ASM: hardware E4M3)."""
    rg = tl.arange(0, BLOCK_K // GROUP)
    g = k0 // GROUP + rg
    g_ok = g * GROUP < k_end
    jb = g[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]
    b = tl.load(w_rows + jb[None, :, :], mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
    s_mask = n_ok[:, None] & g_ok[None, :]
    if GLOBAL:
        scale = _group_scales(s_rows + g[None, :], s_mask, gs_ptr, rn, n_ok, stride_gs, NVFP4)
    else:
        scale = _block_scales(s_rows + g[None, :], s_mask, NVFP4, ASM)
    return b.to(tl.int16), scale, g_ok


@triton.jit
def _dequant_tile(b, scale, dtype, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K/2] weights of even and odd columns, in `dtype`, from `_tile_bytes`."""
    even = (_e2m1_lo(b) * scale[:, :, None]).to(dtype)
    odd = (_e2m1_hi(b) * scale[:, :, None]).to(dtype)
    return tl.reshape(even, (BLOCK_N, BLOCK_K // 2)), tl.reshape(odd, (BLOCK_N, BLOCK_K // 2))


@triton.jit
def _x_pairs(x_ptr, rows, pair, mask):
    """(even, odd) activation columns at packed index `pair` (2-D; `rows` broadcasts to 3-D), loaded as
    adjacent pairs."""
    both = tl.load(x_ptr + rows + 2 * pair[:, :, None] + tl.arange(0, 2), mask=mask[:, :, None], other=0.0)
    return tl.split(both)


@triton.jit
def _fp4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, b_ptr, y_ptr, M, N, K, k_split, stride_xm, stride_wn, stride_sn,
    stride_gs, stride_ym, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NVFP4: tl.constexpr,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    PREC: tl.constexpr, USE_PDL: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """Program (n tile, K split): with PARTIAL, float32 sums into slice `split` of the workspace y.

    One row: products summed within each block first, then scaled once per block (a multiply per 16
    or 32 weights, not per weight). 2-16 rows: dequantized tiles through tl.dot on a 16-row tile. Both
    divide by the NVFP4 global scale once per output: dividing each block scale by it (as the bit-exact
    dequantize does) made the 2-16-row loop 1.7x slower than the same loop on MXFP4's scales."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * stride_wn
    s_rows = s_ptr + rn.to(tl.int64)[:, None] * stride_sn
    k_end = tl.minimum(K, (split + 1) * k_split)
    pdl_sync(USE_PDL)
    if BLOCK_M == 1:  # w_ptr: the packed bytes as int32 words, stride_wn in words
        acc1 = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
        for k0 in range(split * k_split, k_end, BLOCK_K):
            g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            g_ok = g * GROUP < k_end
            wi = g[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]  # [groups, words]
            words = tl.load(w_rows + wi[None], mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
            scale = _block_scales(s_rows + g[None, :], n_ok[:, None] & g_ok[None, :], NVFP4, ASM)
            v0, v1, v2, v3, v4, v5, v6, v7 = _e2m1_word(words, ASM)
            x_ok = g_ok[:, None]
            part = v0 * tl.load(x_ptr + 8 * wi, mask=x_ok, other=0.0).to(tl.float32)[None]
            part += v1 * tl.load(x_ptr + 8 * wi + 1, mask=x_ok, other=0.0).to(tl.float32)[None]
            part += v2 * tl.load(x_ptr + 8 * wi + 2, mask=x_ok, other=0.0).to(tl.float32)[None]
            part += v3 * tl.load(x_ptr + 8 * wi + 3, mask=x_ok, other=0.0).to(tl.float32)[None]
            part += v4 * tl.load(x_ptr + 8 * wi + 4, mask=x_ok, other=0.0).to(tl.float32)[None]
            part += v5 * tl.load(x_ptr + 8 * wi + 5, mask=x_ok, other=0.0).to(tl.float32)[None]
            part += v6 * tl.load(x_ptr + 8 * wi + 6, mask=x_ok, other=0.0).to(tl.float32)[None]
            part += v7 * tl.load(x_ptr + 8 * wi + 7, mask=x_ok, other=0.0).to(tl.float32)[None]
            acc1 += tl.sum(part, axis=2) * scale
        out = tl.sum(acc1, axis=1)
        if NVFP4:  # the global scale once per row, not per block: W = e2m1 * scale / global
            out = tl.div_rn(out, tl.load(gs_ptr + rn * stride_gs, mask=n_ok, other=1.0))
        if PARTIAL:
            tl.store(y_ptr + split * stride_ys + rn, out, mask=n_ok)
        else:
            if HAS_BIAS:
                out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + rn, out.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(split * k_split, k_end, BLOCK_K):
            b, scale, g_ok = _tile_bytes(
                w_rows, s_rows, gs_ptr, rn, n_ok, k0, k_end, stride_gs, BLOCK_K, GROUP, NVFP4, False, ASM
            )
            rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            x_mask = m_ok[:, None] & (2 * rj < k_end)[None, :]
            x_even, x_odd = _x_pairs(x_ptr, (rm[:, None] * stride_xm)[:, :, None], rj[None, :], x_mask)
            w_even, w_odd = _dequant_tile(b, scale, x_even.dtype, BLOCK_N, BLOCK_K)
            acc += tl.dot(x_even, tl.trans(w_even), input_precision=PREC)
            acc += tl.dot(x_odd, tl.trans(w_odd), input_precision=PREC)
        if NVFP4:  # as for one row: the global scale once per output, not in every block's multiplier
            acc = tl.div_rn(acc, tl.load(gs_ptr + rn * stride_gs, mask=n_ok, other=1.0)[None, :])
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
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = (rm.to(tl.int64)[:, None] * stride_xm)[:, :, None]
    w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * stride_wn
    s_rows = s_ptr + rn.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b, scale, g_ok = _tile_bytes(
            w_rows, s_rows, gs_ptr, rn, n_ok, k0, K, stride_gs, BLOCK_K, GROUP, NVFP4
        )
        rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        x_mask = m_ok[:, None] & (2 * rj < K)[None, :]
        x_even, x_odd = _x_pairs(x_ptr, x_rows, rj[None, :], x_mask)
        w_even, w_odd = _dequant_tile(b, scale, x_even.dtype, BLOCK_N, BLOCK_K)
        acc += tl.dot(x_even, tl.trans(w_even), input_precision=PREC)
        acc += tl.dot(x_odd, tl.trans(w_odd), input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_at = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _bf16_rne(v):
    """float32 -> bfloat16, rounded to nearest even by integer arithmetic: the bits of the GPU's
    cvt.rn.bf16.f32 (and torch's), also under TRITON_INTERPRET, whose float32 -> bfloat16 cast
    truncates. NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fp4_dequant_kernel(
    w_ptr, s_ptr, gs_ptr, y_ptr, N, K, stride_wn, stride_sn, stride_gs, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NVFP4: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """Program (n tile, k tile): its bytes and block scales loaded once, the even and odd columns
    decoded as the GEMM tiles are (`_dequant_tile`), interleaved in registers so the store is one
    contiguous run per row."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * stride_wn
    s_rows = s_ptr + rn.to(tl.int64)[:, None] * stride_sn
    b, scale, g_ok = _tile_bytes(w_rows, s_rows, gs_ptr, rn, n_ok, k0, K, stride_gs, BLOCK_K, GROUP, NVFP4)
    even, odd = _dequant_tile(b, scale, tl.float32, BLOCK_N, BLOCK_K)
    w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # [n, j, 2] -> columns 2j, 2j + 1
    if y_ptr.dtype.element_ty == tl.bfloat16:
        w = _bf16_rne(w)
    rk = k0 + tl.arange(0, BLOCK_K)
    y_at = y_ptr + rn.to(tl.int64)[:, None] * stride_yn + rk[None, :]
    tl.store(y_at, w.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & (rk < K)[None, :])


def _operands(x: torch.Tensor, w: Fp4Weight) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Checked shapes (x [M, K]); `_weight_operands`."""
    if x.shape[1] != w.shape[1] or x.stride(1) != 1:
        raise ValueError(f"fp4 matmul: x {tuple(x.shape)} does not match weight {w.shape} (K-contiguous)")
    return _weight_operands(w)


def _weight_operands(w: Fp4Weight) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Checked weight: (scales as bytes, global scale or a dummy pointer, its row stride, packed)."""
    n, k = w.shape
    if w.packed.stride(1) != 1 or w.scales.stride(1) != 1:
        raise ValueError(f"fp4 weight {(n, k)}: packed bytes and scales must be K-contiguous")
    if k % GROUP[w.kind]:
        raise ValueError(f"{w.kind} needs K divisible by {GROUP[w.kind]}, got {k}")
    scales = w.scales.view(torch.uint8)
    gs = w.global_scale if w.global_scale is not None else scales
    if gs.numel() not in (1, n) and w.global_scale is not None:
        raise ValueError(f"NVFP4 global scale: {gs.numel()} values for {n} rows")
    return scales, gs, int(gs.numel() == n and n > 1), w.packed


def _native(x: torch.Tensor) -> bool:
    """Compiled for a GPU (inline PTX allowed), not run by the Triton interpreter."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def pick_split(n_tiles: int, k: int, block_k: int) -> int:
    """K splits so that a skinny launch has ~256 programs (about two per H200 SM); a placeholder."""
    return max(1, min(triton.cdiv(k, block_k), 256 // max(n_tiles, 1)))


def fp4_gemv(
    x: torch.Tensor,
    w: Fp4Weight,
    bias: torch.Tensor | None = None,
    cfg: Fp4Config | None = None,
) -> torch.Tensor:
    """x [M <= 16, K] @ dequantize(w).T (+ bias) -> [M, N] in x's dtype. No fused silu·mul (unlike
    kernels/gemv.py): fused into these loads it made batch-1 decode slower (server/contract/fp4_format.py)."""
    m, n = x.shape[0], w.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fp4_gemv handles at most {MAX_ROWS} rows; got {m}")
    k = w.shape[1]
    scales, gs, stride_gs, packed = _operands(x, w)
    cfg = cfg or pick_gemv_config(m, n, k)
    n_tiles = triton.cdiv(n, cfg.block_n)
    splits = cfg.split_k or pick_split(n_tiles, k, cfg.block_k)
    k_split = triton.cdiv(triton.cdiv(k, splits), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if not m:
        return y
    out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    if m == 1:  # the one-row loop reads whole int32 words (8 codes)
        packed = packed.view(torch.int32)
    _fp4_gemv_kernel[(n_tiles, splits)](
        x, packed, scales, gs, bias if bias is not None else x, out, m, n, k, k_split, x.stride(0),
        packed.stride(0), scales.stride(0), stride_gs, out.stride(-2), out.stride(0),
        BLOCK_M=1 if m == 1 else MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NVFP4=w.kind == "nvfp4", GROUP=GROUP[w.kind], HAS_BIAS=bias is not None,
        PARTIAL=splits > 1, PREC=_prec(x), **pdl_args(x), ASM=_native(x), num_warps=cfg.num_warps,
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
    m, n = x.shape[0], w.shape[0]
    scales, gs, stride_gs, packed = _operands(x, w)
    cfg = cfg or pick_gemm_config(m, n, w.shape[1])
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _fp4_gemm_kernel[(triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))](
            x, packed, scales, gs, bias if bias is not None else x, y, m, n, x.shape[1], x.stride(0),
            packed.stride(0), scales.stride(0), stride_gs, y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NVFP4=w.kind == "nvfp4",
            GROUP=GROUP[w.kind], HAS_BIAS=bias is not None, PREC=_prec(x),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return y


DEQUANT_CONFIG = Fp4Config(block_n=32, block_k=256, num_warps=4)


def fp4_dequantize(w: Fp4Weight, dtype: torch.dtype, cfg: Fp4Config | None = None) -> torch.Tensor:
    """[N, K] in `dtype`, bit for bit `fp4_ref.dequantize(w).to(dtype)`: one bandwidth-bound pass
    (reads ~0.56 bytes per weight, writes one `dtype` value); cfg: block_n, block_k, num_warps."""
    n, k = w.shape
    scales, gs, stride_gs, packed = _weight_operands(w)
    cfg = cfg or DEQUANT_CONFIG
    y = torch.empty(n, k, dtype=dtype, device=packed.device)
    if n and k:
        _fp4_dequant_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))](
            packed, scales, gs, y, n, k, packed.stride(0), scales.stride(0), stride_gs, y.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NVFP4=w.kind == "nvfp4", GROUP=GROUP[w.kind],
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return y


def fp4_linear(x: torch.Tensor, w: Fp4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize(w).T (+ bias) in x's dtype: the prefill path (more than MAX_ROWS rows).

    The weight is dequantized once into a transient [N, K] copy and multiplied by cuBLAS. A fused
    Triton GEMM (`fp4_gemm`) redoes the dequant in every M tile and its tile loop runs far below
    cuBLAS (measured 8x slower at M=2048 on the H200). The dequant pass moves ~2.6 bytes per weight
    (bf16) and cuBLAS then reads 2: small beside a prompt's FLOPs, not beside a decode batch's, which
    is why up to MAX_ROWS rows go through `fp4_gemv`. Equal to `fp4_matmul_ref` up to cuBLAS's
    summation order."""
    return F.linear(x, fp4_dequantize(w, x.dtype), bias)
