"""Plain-torch reference of paged decode attention (one query token per sequence over its KV blocks)."""

from __future__ import annotations

import torch


def paged_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D]; caches [slots, Hk, D]; block_tables [B, max_blocks]; context_lens [B] -> [B, Hq, D]."""
    out = torch.zeros_like(q)
    bs = block_size
    group = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b, pos // bs].long() * bs + pos % bs
        lo = 0 if window is None else max(0, n - window)
        k = k_cache[slots[lo:]].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[slots[lo:]].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out
