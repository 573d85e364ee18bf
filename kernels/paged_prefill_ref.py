"""Plain-torch reference of paged prefill attention: each sequence's new query rows (the last
`num_queries` positions of its context) over its whole context read from KV blocks, causal."""

from __future__ import annotations

import torch


def paged_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    num_queries: list[int],
    scale: float,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] packed (sequence i's rows follow sequence i-1's); caches [slots, Hk, D];
    block_tables [S, max_blocks] -> [T, Hq, D], float32 math."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[1]
    row = 0
    for i, (n, nq) in enumerate(zip(context_lens, num_queries, strict=True)):
        pos = torch.arange(n, device=q.device)
        slots = block_tables[i, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        qpos = torch.arange(n - nq, n, device=q.device).unsqueeze(1)
        allowed = pos.unsqueeze(0) <= qpos
        if window is not None:
            allowed &= pos.unsqueeze(0) > qpos - window
        s = torch.einsum("qhd,nhd->hqn", q[row : row + nq].float(), k) * scale
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[row : row + nq] = torch.einsum("hqn,nhd->qhd", p, v).to(q.dtype)
        row += nq
    return out
