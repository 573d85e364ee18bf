"""The paged KV cache as plugins see it (docs/architecture.md §3, "KV tiers", and §6): block ids, the
optional host tier, and what a plugin may ask of them.

Every id a sequence's block table may hold lies in [0, `num_ids`): the GPU pool the block manager hands
out ([0, `gpu_blocks`)), one scratch block (`gpu_blocks`: padded CUDA-graph rows write there), the GPU
blocks reserved for plugins (`reserved`, only with a host tier), then the host tier's blocks
([`host_base`, `num_ids`)), which live in (pinned) host memory and must never reach an attention kernel.
A plugin keeping side data per block (e.g. a summary of its keys) sizes it by `num_ids`, so a block's
data stays where its id is, whichever tier holds the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class KVTier(Protocol):
    """The host tier of the KV cache (`--kv-offload-gb`): blocks that moved off the GPU."""

    host_base: int  # the first host id

    def recall(self, layer: int, host_ids: torch.Tensor, gpu_ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Copy layer `layer`'s K/V of host block `host_ids[r, j]` into GPU block `gpu_ids[r, j]` (a block
        the caller owns: one of its `reserved` blocks) for each row r and j < counts[r]. The lists are
        int32 tensors on the model's device (a kernel of the step may have written them): the copies are
        enqueued on the current stream with no host sync, so a decode CUDA graph may capture them, and
        the step's later kernels read the blocks. Bit-exact."""
        ...


@dataclass(frozen=True)
class KVSpace:
    """What `InterventionPlugin.bind_kv` gets once the KV cache is sized."""

    block_size: int
    gpu_blocks: int  # the block manager's pool: ids [0, gpu_blocks)
    num_ids: int  # every id a block table may hold (GPU pool, scratch, reserved, host tier)
    reserved: range  # GPU block ids reserved for this plugin (`reserved_kv_blocks`); empty without a tier
    tier: KVTier | None = None  # the host tier, None without `--kv-offload-gb`

    @property
    def host_base(self) -> int:
        """The first host-tier id (= num_ids without a tier)."""
        return self.tier.host_base if self.tier is not None else self.num_ids


@dataclass(frozen=True)
class KVResidency:
    """Which of a sequence's KV blocks must stay on the GPU when the server has a host tier: its first
    `sink_blocks` and last `window_blocks` blocks (the block being filled counts among them). Once its
    prompt is computed and one decode step has run, the engine moves its other full blocks to the host
    (blocks shared with other sequences stay), and its plugin's attention hook must never hand a host
    id to the kernel: it reads them through blocks it recalls (`KVTier.recall`)."""

    sink_blocks: int
    window_blocks: int
