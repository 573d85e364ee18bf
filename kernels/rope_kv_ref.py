"""Plain-torch reference: rotary embedding of q and k, and the paged KV-cache write, as transformers
computes rotary (rotate-half convention) in the model dtype."""

from __future__ import annotations

import torch


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k/v [T, Hk, D]; cos/sin [max_pos, D]; writes k (rotated) and v at `slots`.
    Returns rotated (q, k)."""
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
