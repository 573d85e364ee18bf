"""Plain-torch reference: rotary embedding of q and k, and the paged KV-cache write, as transformers
computes rotary (rotate-half convention) in the model dtype."""

from __future__ import annotations

import torch

from actserve.kernels.steer_rmsnorm_ref import add_steer_rmsnorm_ref


def rope_kv_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k/v [T, Hk, D]; cos/sin [max_pos, D]; writes k (rotated) and v at `slots`.
    Returns rotated (q, k). `norm`: (q weight, k weight, eps) of a per-head RMSNorm first (Qwen3's
    q_norm / k_norm, as `RMSNorm` computes it)."""
    if norm is not None:
        qw, kw, eps = norm
        q = add_steer_rmsnorm_ref(None, q, qw, eps)[0]
        k = add_steer_rmsnorm_ref(None, k, kw, eps)[0]
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    k_cache[slots] = k
    v_cache[slots] = v
    return q, k


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
