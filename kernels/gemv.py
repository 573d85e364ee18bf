"""Skinny matmul y = x @ W.T (+ bias) for decode rows (weight-bandwidth-bound), optionally on silu(gate)·up.

At batch 1-16 a decode step's time is the time to stream the weights once. cuBLAS picks split-K GEMM
kernels for several Llama shapes (and a separate reduction kernel after them); this kernel tiles only
the output features, each program streaming whole K-contiguous weight rows with fp32 accumulation, so
the weights are read exactly once with no reduction pass (measured in bench/decode_profile.py). With
`silu_mul=True` the input is a fused gate_up row [gate | up] and silu(gate)·up is formed while loading,
which removes the separate activation kernel before the down projection (rounded to the storage dtype
exactly as `silu_mul` does; the model uses it for one row only, as it is slow on the tensor-core
path). One row uses a broadcast-multiply-sum; 2-16 rows use `tl.dot` on a 16-row tile (tensor cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.kernels.pdl import pdl_args, pdl_sync


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3


def pick_config(m: int, n: int, k: int) -> GemvConfig:
    """Launch config per shape, from the H200 sweep in bench/results/decode_profile.json."""
    if m == 1:
        if n > 32768:  # lm_head-sized
            return GemvConfig(16, 256, 4, 3)
        if n > 8192:  # gate_up-sized: many programs already, short K tiles
            return GemvConfig(8, 256, 4, 2)
        if k >= 2048 and 4096 < n and n * k <= 12 << 20:  # Qwen3-30B-A3B's qkv: twice the programs
            return GemvConfig(4, 1024, 4, 4)  # bench/results/gemv_small_ab.json: 5.96 vs 6.29 us cold
        if (n, k) == (2048, 4096):  # Qwen3-30B-A3B's o_proj (the one shape measured), 6.31 vs 7.07 us cold
            # (bench/results/gemv_sweep_qwen3.json): twice the programs, two stages
            return GemvConfig(4, 1024, 8, 2)
        return GemvConfig(8, 1024, 8 if n <= 4096 else 4, 4)
    return GemvConfig(64, 256, 4, 3) if n > 4096 else GemvConfig(32, 512, 4, 3)


@triton.jit
def silu_mul_round(gate, up):
    """silu(gate) * up, rounded to gate's dtype after the silu and after the product (silu_mul.py)."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def load_x(x_ptr, rows, k_half, rk, mask, SILU_MUL: tl.constexpr):
    if SILU_MUL:
        gate = tl.load(x_ptr + rows + rk, mask=mask, other=0.0)
        up = tl.load(x_ptr + rows + k_half + rk, mask=mask, other=0.0)
        return silu_mul_round(gate, up)
    return tl.load(x_ptr + rows + rk, mask=mask, other=0.0)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, PREC: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    if BLOCK_M == 1:
        # the first weight tile is read before waiting for the previous kernel (no kernel writes
        # weights), so under PDL this program streams weights while that kernel drains
        rk = tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        pdl_sync(USE_PDL)
        x = load_x(x_ptr, 0, K, rk, k_ok, SILU_MUL)
        acc1 = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = load_x(x_ptr, 0, K, rk, k_ok, SILU_MUL)
            acc1 += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        if HAS_BIAS:
            acc1 += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, acc1.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        # no peeled first tile here: it slowed the pipelined tensor-core loop (b8 step 4.6 -> 5.0 ms)
        pdl_sync(USE_PDL)
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = load_x(
                x_ptr, rm[:, None] * stride_xm, K, rk[None, :], m_ok[:, None] & k_ok[None, :], SILU_MUL
            )
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    cfg: GemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) -> [M, N]; with silu_mul, x is [M, 2K] = [gate | up]."""
    m, kx = x.shape
    n, k = weight.shape
    if m > MAX_ROWS:
        raise ValueError(f"gemv handles at most {MAX_ROWS} rows; got {m}")
    if kx != (2 * k if silu_mul else k) or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(
            f"gemv: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} (K-contiguous)"
        )
    cfg = cfg or pick_config(m, n, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
            x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0),
            y.stride(0), BLOCK_M=1 if m == 1 else MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            HAS_BIAS=bias is not None, SILU_MUL=silu_mul, PREC="ieee" if x.dtype == torch.float32 else "tf32",
            **pdl_args(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return y
