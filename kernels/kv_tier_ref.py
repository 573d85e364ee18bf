"""Plain-torch reference of the host tier's recall (kernels/kv_tier.py): K/V of KV blocks in host memory
copied into GPU blocks of one layer, as a step's kernels list them (docs/architecture.md §3 "KV tiers").

`store` [host blocks, 2, block_size, kv_heads, head_dim]: one layer's host tier (a block's K and V one
contiguous piece); `kv` [2, blocks, block_size, kv_heads, head_dim]: that layer's GPU cache. Row r copies
host block src[r, j] - host_base into GPU block dst[r, j] for j < count[r]; `counter` [1] int64 counts
the blocks copied. Bit-exact (a copy)."""

from __future__ import annotations

import torch


def recall_blocks_ref(
    store: torch.Tensor,
    kv: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    count: torch.Tensor,
    host_base: int,
    counter: torch.Tensor,
) -> None:
    j = torch.arange(src.shape[1], device=src.device)
    valid = j.unsqueeze(0) < count.unsqueeze(1).long()
    host = (src[valid].long() - host_base).to(store.device)
    gpu = dst[valid].long().to(kv.device)
    kv[:, gpu] = store[host].transpose(0, 1).to(kv.device)
    counter += valid.sum().to(counter.dtype)
