"""The host tier of the paged KV cache (`--kv-offload-gb`, docs/architecture.md §3 "KV tiers"): K/V of
blocks that moved off the GPU, in pinned host memory on CUDA (page-locked in place and mapped into the
device's address space; plain memory on the CPU), one tensor per layer [blocks, 2, block_size, kv_heads,
head_dim] so a block of one layer is one contiguous piece.

Moving out (`offload`) copies each layer's blocks in runs of consecutive host ids, on the current stream
(a later step that reuses the freed GPU blocks is ordered after the copy). Moving back (`recall`, what
plugins call through the contract's `KVTier`) is a kernel of the step (kernels/kv_tier.py) that reads
the host blocks through their device address, from lists on the device: stream order puts it after the
offload that wrote them, and no host sync is needed. Offload bytes are counted on the host, recalled
blocks by the kernel on the device (read when the metrics are, `bytes_to_device`).
"""

from __future__ import annotations

import numpy as np
import torch

from actserve.kernels.kv_tier_ref import recall_blocks_ref

PORTABLE_AND_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped


def pin(t: torch.Tensor) -> None:
    """Page-lock a host tensor where it is (cudaHostRegister, portable and mapped: kernels read it through
    its address); torch's pinned allocator rounds every allocation up to a power of two, which would
    double a tier of tens of GiB."""
    size = t.numel() * t.element_size()
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), size, PORTABLE_AND_MAPPED))
    if err != 0:
        raise RuntimeError(
            f"--kv-offload-gb: pinning {size / 2**30:.1f} GiB of host memory failed (cudaError {err})"
        )


class HostTier:
    def __init__(
        self, kv_caches: list[torch.Tensor], block_size: int, num_blocks: int, host_base: int
    ) -> None:
        first = kv_caches[0]
        _, _, kvh, d = first.shape
        self.device = first.device
        self.cuda = first.is_cuda
        self.block_size, self.num_blocks, self.host_base = block_size, num_blocks, host_base
        self.kv = [c.view(2, -1, block_size, kvh, d) for c in kv_caches]
        shape = (num_blocks, 2, block_size, kvh, d)
        self.store = [torch.empty(shape, dtype=first.dtype) for _ in kv_caches]
        if self.cuda:
            for t in self.store:
                pin(t)
        self.layer_block_bytes = 2 * block_size * kvh * d * first.element_size()
        self.bytes_to_host = 0
        self.recalled = torch.zeros(1, dtype=torch.int64, device=self.device)  # block-layers, on the device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store)

    @torch.no_grad()
    def offload(self, gpu_ids: list[int], host_ids: list[int]) -> None:
        """Copy every layer's K/V of GPU blocks `gpu_ids` into host blocks `host_ids`."""
        if not gpu_ids:
            return
        src = torch.tensor(gpu_ids, dtype=torch.long, device=self.device)
        dst = np.asarray(host_ids, dtype=np.int64) - self.host_base
        runs = np.flatnonzero(np.diff(dst) != 1) + 1
        bounds = [0, *runs.tolist(), len(dst)]
        for kv, store in zip(self.kv, self.store, strict=True):
            picked = kv.index_select(1, src).transpose(0, 1)  # [n, 2, bs, kvh, d]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                h = int(dst[a])
                store[h : h + (b - a)].copy_(picked[a:b], non_blocking=self.cuda)
        self.bytes_to_host += len(gpu_ids) * len(self.kv) * self.layer_block_bytes

    @property
    def bytes_to_device(self) -> int:
        """Bytes recalled so far (reads the device counter: a sync, for the metrics)."""
        return int(self.recalled.item()) * self.layer_block_bytes

    @torch.no_grad()
    def recall(self, layer: int, host_ids: torch.Tensor, gpu_ids: torch.Tensor, counts: torch.Tensor) -> None:
        """`KVTier.recall`: row r's blocks host_ids[r, j] -> gpu_ids[r, j] of `layer`, j < counts[r]."""
        args = (self.store[layer], self.kv[layer], host_ids, gpu_ids, counts, self.host_base, self.recalled)
        if self.cuda:
            from actserve.kernels.kv_tier import recall_blocks

            recall_blocks(*args)
        else:
            recall_blocks_ref(*args)
