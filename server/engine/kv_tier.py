"""The host tier of the paged KV cache (`--kv-offload-gb`, docs/architecture.md §3 "KV tiers"): K/V of
blocks that moved off the GPU, in pinned host memory on CUDA (page-locked in place; plain memory on the
CPU), one tensor per layer [blocks, 2, block_size, kv_heads, head_dim] so a block of one layer is one
contiguous piece.

Moving out (`offload`) copies each layer's blocks in runs of consecutive host ids, on the current stream
(a later step that reuses the freed GPU blocks is ordered after the copy); the host reads nothing until a
recall, which first waits for the last offload. Moving back (`recall`, what plugins call through the
contract's `KVTier`) gathers the host blocks into a pinned buffer per layer and copies them to the GPU on
a side stream that the current stream then waits for. Both count the bytes they move.
"""

from __future__ import annotations

import numpy as np
import torch


def pin(t: torch.Tensor) -> None:
    """Page-lock a host tensor where it is (cudaHostRegister, portable): torch's pinned allocator rounds
    every allocation up to a power of two, which would double a tier of tens of GiB."""
    size = t.numel() * t.element_size()
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), size, 1))
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
        self.bytes_to_device = 0
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._offloaded: torch.cuda.Event | None = None

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
        if self.cuda:
            self._offloaded = torch.cuda.Event()
            self._offloaded.record()

    @torch.no_grad()
    def recall(self, layers: np.ndarray, host_ids: np.ndarray, gpu_ids: np.ndarray) -> None:
        """`KVTier.recall`: layer layers[i]'s K/V of host block host_ids[i] into GPU block gpu_ids[i]."""
        if len(layers) == 0:
            return
        if self._offloaded is not None:
            self._offloaded.synchronize()  # the host copy of a block must have arrived
        layers = np.asarray(layers, dtype=np.int64)
        order = np.argsort(layers, kind="stable")
        layers, hosts, gpus = layers[order], np.asarray(host_ids)[order], np.asarray(gpu_ids)[order]
        starts = np.flatnonzero(np.r_[True, np.diff(layers) != 0])
        ends = np.r_[starts[1:], len(layers)]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            layer = int(layers[a])
            h = torch.from_numpy(hosts[a:b] - self.host_base)
            store = self.store[layer]
            buf = torch.empty((b - a, *store.shape[1:]), dtype=store.dtype, pin_memory=self.cuda)
            torch.index_select(store, 0, h, out=buf)
            if self.stream is None:
                self.kv[layer][:, torch.from_numpy(gpus[a:b])] = buf.transpose(0, 1)
                continue
            with torch.cuda.stream(self.stream):  # everything the copy touches lives on the side stream
                g = torch.from_numpy(gpus[a:b]).pin_memory().to(self.device, non_blocking=True)
                blocks = buf.to(self.device, non_blocking=True)
                self.kv[layer][:, g] = blocks.transpose(0, 1)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.bytes_to_device += len(layers) * self.layer_block_bytes
