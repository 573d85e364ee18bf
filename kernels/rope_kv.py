"""Rotary embedding of q and k fused with the paged KV-cache write: one launch per layer instead of a
dozen small ones (gathers, casts, rotate-half, index writes), which dominate small-batch decode."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from actserve.kernels.pdl import pdl_args, pdl_sync


@triton.jit
def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_out_ptr, kc_ptr, vc_ptr,
    stride_q, stride_k, stride_v, stride_cos, stride_kc, n_q, n_kv,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pdl_sync(USE_PDL)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    dtype = q_out_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + pos * stride_cos + d).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + d).to(dtype).to(tl.float32)
    if h < n_q:
        base = q_ptr + t * stride_q + h * HEAD_DIM
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        out = q_out_ptr + (t * n_q + h) * HEAD_DIM
        tl.store(out + d, (x1 * cos - x2 * sin).to(dtype))
        tl.store(out + HALF + d, (x2 * cos + x1 * sin).to(dtype))
    else:
        kh = h - n_q
        base = k_ptr + t * stride_k + kh * HEAD_DIM
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        r1 = (x1 * cos - x2 * sin).to(dtype)
        r2 = (x2 * cos + x1 * sin).to(dtype)
        slot = tl.load(slot_ptr + t)
        kc = kc_ptr + slot * stride_kc + kh * HEAD_DIM
        tl.store(kc + d, r1)
        tl.store(kc + HALF + d, r2)
        ko = k_out_ptr + (t * n_kv + kh) * HEAD_DIM
        tl.store(ko + d, r1)
        tl.store(ko + HALF + d, r2)
        vb = v_ptr + t * stride_v + kh * HEAD_DIM
        vc = vc_ptr + slot * stride_kc + kh * HEAD_DIM
        tl.store(vc + d, tl.load(vb + d))
        tl.store(vc + HALF + d, tl.load(vb + HALF + d))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rope_kv_ref`. q/k/v may be row-strided views (e.g. slices of a fused qkv)
    whose heads are contiguous within a row."""
    t, n_q, dim = q.shape
    n_kv = k.shape[1]
    q_out = torch.empty(t, n_q, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, n_kv, dim, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    _rope_kv_kernel[(t, n_q + n_kv)](
        q, k, v, cos, sin, positions, slots, q_out, k_out, k_cache, v_cache,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), k_cache.stride(0), n_q, n_kv,
        HEAD_DIM=dim, HALF=dim // 2, **pdl_args(q),
    )  # fmt: skip
    return q_out, k_out
