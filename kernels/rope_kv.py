"""Rotary embedding of q and k fused with the paged KV-cache write: one launch per layer instead of a
dozen small ones (gathers, casts, rotate-half, index writes), which dominate small-batch decode. With
per-head q/k RMSNorm weights (Qwen3, Qwen3-MoE) the norms run first in the same launch (in torch they
are eight small kernels each for q and k).

q, k and v may be views of a one-row sparse GEMV's pending float32 qkv sums (kernels/sparse_gemv.py
`is_sums`; `dtype` the model's): each entry is rounded to `dtype` first, as the GEMV's cast kernel would
have stored it, and every program zeroes the heads it read (each head is read by one program only), so
the cast launch goes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from actserve.kernels.pdl import pdl_args, pdl_sync


@triton.jit
def _head_norm(x1, x2, w_ptr, eps, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, dtype: tl.constexpr):
    """RMSNorm of one head given as its two halves (float32), rounded where `RMSNorm` (server/layers/
    norm.py) rounds: the normalised head in the model dtype, then times the weight, rounded again."""
    d = tl.arange(0, HALF)
    var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HEAD_DIM
    r = tl.rsqrt(var + eps)
    n1 = (x1 * r).to(dtype).to(tl.float32)
    n2 = (x2 * r).to(dtype).to(tl.float32)
    w1 = tl.load(w_ptr + d).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
    return (w1 * n1).to(dtype).to(tl.float32), (w2 * n2).to(dtype).to(tl.float32)


@triton.jit
def _zero_head(base, d, HALF: tl.constexpr):
    """Zero one head of float32 sums after its read."""
    tl.store(base + d, tl.zeros([HALF], tl.float32))
    tl.store(base + HALF + d, tl.zeros([HALF], tl.float32))


@triton.jit
def _load_head(
    base, d, w_ptr, eps, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, dtype: tl.constexpr,
    SUMS: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """One q or k head's halves in float32, rounded to the output dtype first (as the GEMV's cast would);
    SUMS: the head was float32 sums, zeroed after the read; NORM: its RMS norm applied."""
    x1 = tl.load(base + d).to(dtype).to(tl.float32)
    x2 = tl.load(base + HALF + d).to(dtype).to(tl.float32)
    if SUMS:
        _zero_head(base, d, HALF)
    if NORM:
        x1, x2 = _head_norm(x1, x2, w_ptr, eps, HEAD_DIM, HALF, dtype)
    return x1, x2


@triton.jit
def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_out_ptr, kc_ptr, vc_ptr,
    qw_ptr, kw_ptr, eps, stride_q, stride_k, stride_v, stride_cos, stride_kc, n_q, n_kv,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr, USE_PDL: tl.constexpr,
    SUMS: tl.constexpr = False,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    # positions and slots (the step's inputs, copied from the host before its first kernel) and the
    # rotary table are written by no kernel of the step: read before the wait (the inputs through L2,
    # `.cg`: buffers rewritten every step), so that only q/k/v wait for the GEMV before
    pos = tl.load(pos_ptr + t, cache_modifier=".cg")
    slot = tl.load(slot_ptr + t, cache_modifier=".cg")
    d = tl.arange(0, HALF)
    dtype = q_out_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + pos * stride_cos + d).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + d).to(dtype).to(tl.float32)
    pdl_sync(USE_PDL)
    if h < n_q:
        x1, x2 = _load_head(
            q_ptr + t * stride_q + h * HEAD_DIM, d, qw_ptr, eps, HEAD_DIM, HALF, dtype, SUMS, NORM
        )
        out = q_out_ptr + (t * n_q + h) * HEAD_DIM
        tl.store(out + d, (x1 * cos - x2 * sin).to(dtype))
        tl.store(out + HALF + d, (x2 * cos + x1 * sin).to(dtype))
    else:
        kh = h - n_q
        x1, x2 = _load_head(
            k_ptr + t * stride_k + kh * HEAD_DIM, d, kw_ptr, eps, HEAD_DIM, HALF, dtype, SUMS, NORM
        )
        r1 = (x1 * cos - x2 * sin).to(dtype)
        r2 = (x2 * cos + x1 * sin).to(dtype)
        kc = kc_ptr + slot * stride_kc + kh * HEAD_DIM
        tl.store(kc + d, r1)
        tl.store(kc + HALF + d, r2)
        ko = k_out_ptr + (t * n_kv + kh) * HEAD_DIM
        tl.store(ko + d, r1)
        tl.store(ko + HALF + d, r2)
        vb = v_ptr + t * stride_v + kh * HEAD_DIM
        vc = vc_ptr + slot * stride_kc + kh * HEAD_DIM
        v1 = tl.load(vb + d)
        v2 = tl.load(vb + HALF + d)
        if SUMS:  # rounded to the model dtype as the cast would store it, then the cache's
            v1, v2 = v1.to(dtype), v2.to(dtype)
            _zero_head(vb, d, HALF)
        tl.store(vc + d, v1)
        tl.store(vc + HALF + d, v2)


def rope_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rope_kv_ref`. q/k/v may be row-strided views (e.g. slices of a fused qkv)
    whose heads are contiguous within a row. `norm`: (q weight [head_dim], k weight [head_dim], eps) of
    a per-head RMSNorm applied to q and k before the rotation. `dtype` (default q's): the outputs'; q/k/v
    in float32 under a half `dtype` are pending sums (module docstring), zeroed here."""
    t, n_q, dim = q.shape
    n_kv = k.shape[1]
    dtype = dtype or q.dtype
    sums = q.dtype == torch.float32 and dtype != torch.float32
    q_out = torch.empty(t, n_q, dim, dtype=dtype, device=q.device)
    k_out = torch.empty(t, n_kv, dim, dtype=dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    qw, kw, eps = norm if norm is not None else (q, k, 0.0)
    _rope_kv_kernel[(t, n_q + n_kv)](
        q, k, v, cos, sin, positions, slots, q_out, k_out, k_cache, v_cache, qw, kw, eps,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), k_cache.stride(0), n_q, n_kv,
        HEAD_DIM=dim, HALF=dim // 2, NORM=norm is not None, SUMS=sums, **pdl_args(q),
    )  # fmt: skip
    return q_out, k_out
