"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

Every per-step input is a static device buffer (token ids, positions, KV slots, context lengths, block
tables, and the fused table's per-row columns: slot index, scale, normalize, e.g. steering's), filled
from pinned host buffers with three asynchronous copies per step. Batches mixing steered and plain
requests replay the same graph; a row with index -1 is left untouched by the fused kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from actserve.kernels.steer_rmsnorm_ref import SteeringTensors
from actserve.server.contract.hooks import StepHooks
from actserve.server.layers.attention import AttentionBatch

log = logging.getLogger(__name__)


def bucket_sizes(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_bs]
    sizes += list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def smallest_bucket(buckets: list[int], n: int) -> int | None:
    """The first (smallest) of the ascending `buckets` that holds `n`; None when none does."""
    return next((b for b in buckets if b >= n), None)


def capture_graph(fn: Callable[[], torch.Tensor], pool: object) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm `fn` up twice (Triton compiles, cuBLAS picks its kernels), then capture it into `pool`."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


@dataclass
class DecodeInputs:
    """Host-side arrays for one decode step (rows = sequences)."""

    ids: np.ndarray  # int64 [B]
    positions: np.ndarray  # int64 [B]
    slots: np.ndarray  # int64 [B]
    block_tables: np.ndarray  # int32 [B, width]
    context_lens: np.ndarray  # int64 [B]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_blocks: int,
        max_bs: int,
        dummy_slot: int,
        fused_table: tuple[torch.Tensor, torch.Tensor] | None,
        fused_width: int,
    ) -> None:
        dev = kv_caches[0].device
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.dummy_slot, self.max_bs, self.width, self.fused_table = (
            dummy_slot,
            max_bs,
            fused_width,
            fused_table,
        )
        # int64 layout: ids | positions | slots | lens | steer index (max_bs x W) | normalize (max_bs x W)
        n_int = max_bs * (4 + 2 * fused_width)
        self.host_int = torch.zeros(n_int, dtype=torch.long, pin_memory=True)
        self.host_scale = torch.zeros(max_bs, fused_width, dtype=torch.float32, pin_memory=True)
        self.host_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, pin_memory=True)
        self.dev_int = torch.zeros(n_int, dtype=torch.long, device=dev)
        self.scale = torch.zeros(max_bs, fused_width, dtype=torch.float32, device=dev)
        self.tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.h = self._views(self.host_int)
        self.d = self._views(self.dev_int)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.copied = torch.cuda.Event()  # the last step's host-to-device copies
        self.buckets = bucket_sizes(max_bs)
        self._capture()

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        b, w = self.max_bs, self.width
        return {
            "ids": buf[0:b],
            "pos": buf[b : 2 * b],
            "slots": buf[2 * b : 3 * b],
            "lens": buf[3 * b : 4 * b],
            "index": buf[4 * b : 4 * b + b * w].view(b, w),
            "normalize": buf[4 * b + b * w :].view(b, w),
        }

    def _forward(self, b: int) -> torch.Tensor:
        d = self.d
        attn = AttentionBatch(d["slots"][:b], [], self.tables[:b], d["lens"][:b], self.block_size)
        hooks = None
        if self.fused_table is not None:
            table, mask = self.fused_table
            tensors = SteeringTensors(table, mask, d["index"][:b], self.scale[:b], d["normalize"][:b])
            hooks = StepHooks([], tensors)
        hidden = self.model(d["ids"][:b], d["pos"][:b], self.kv_caches, attn, hooks)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        d = self.d
        d["slots"].fill_(self.dummy_slot)
        d["index"].fill_(-1)
        d["lens"].fill_(1)  # warm-up reads one (scratch) slot per row
        self.tables.fill_(self.dummy_slot // self.block_size)
        for b in reversed(self.buckets):
            self.graphs[b] = capture_graph(lambda b=b: self._forward(b), pool)
            pool = self.graphs[b][0].pool()
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def bucket(self, n: int) -> int | None:
        return smallest_bucket(self.buckets, n)

    def run(
        self,
        inputs: DecodeInputs,
        fused: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fused: host (index, scale, normalize) columns for the n rows, or None. device_ids: the rows'
        input tokens when they are still on the device (chained steps)."""
        n = len(inputs.ids)
        b = self.bucket(n)
        assert b is not None
        # a chained step is launched before the previous one's copies have surely run on the device:
        # wait for them before overwriting the pinned buffers they read (normally long done)
        self.copied.synchronize()
        h = self.h
        h["ids"][:n] = torch.from_numpy(inputs.ids)
        h["pos"][:n] = torch.from_numpy(inputs.positions)
        h["slots"][:n] = torch.from_numpy(inputs.slots)
        h["slots"][n:b] = self.dummy_slot  # padding rows: no context, K/V to the scratch slot
        h["lens"][:n] = torch.from_numpy(inputs.context_lens)
        h["lens"][n:b] = 0
        h["index"][:b] = -1
        if fused is not None:
            index, scale, normalize = fused
            w = index.shape[1]
            h["index"][:n, :w] = torch.from_numpy(index)
            h["normalize"][:n, :w] = torch.from_numpy(normalize)
            self.host_scale[:n, :w] = torch.from_numpy(scale)
        nb = inputs.block_tables.shape[1]
        self.host_tables[:n, :nb] = torch.from_numpy(inputs.block_tables)
        self.dev_int.copy_(self.host_int, non_blocking=True)
        self.scale.copy_(self.host_scale, non_blocking=True)
        self.tables[:n].copy_(self.host_tables[:n], non_blocking=True)
        self.copied.record()
        if device_ids is not None:
            self.d["ids"][:n].copy_(device_ids)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
