"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

Every per-step input is a static buffer (token ids, positions, KV slots, block tables, context lengths,
and the steering columns: slot index, scale, normalize), so batches mixing steered and plain requests
replay the same graph; a row with index -1 is left untouched by the fused steering kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from actserve.kernels.steer_rmsnorm_ref import SteeringTensors
from actserve.server.layers.attention import AttentionBatch
from actserve.server.layers.hooks import StepHooks

log = logging.getLogger(__name__)


def bucket_sizes(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_bs]
    sizes += list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


@dataclass
class DecodeInputs:
    """Host-side arrays for one decode step (rows = sequences)."""

    ids: np.ndarray  # int64 [B]
    positions: np.ndarray  # int64 [B]
    slots: np.ndarray  # int64 [B]
    block_tables: np.ndarray  # int32 [B, max_blocks]
    context_lens: np.ndarray  # int32 [B]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_blocks: int,
        max_bs: int,
        dummy_slot: int,
        steer_table: tuple[torch.Tensor, torch.Tensor] | None,
        steer_width: int,
    ) -> None:
        dev = kv_caches[0].device
        self.model, self.kv_caches, self.block_size, self.dummy_slot = (
            model,
            kv_caches,
            block_size,
            dummy_slot,
        )
        self.max_bs, self.max_blocks, self.width = max_bs, max_blocks, steer_width
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slots = torch.full((max_bs,), dummy_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.index = torch.full((max_bs, steer_width), -1, dtype=torch.long, device=dev)
        self.scale = torch.zeros(max_bs, steer_width, dtype=torch.float32, device=dev)
        self.normalize = torch.zeros(max_bs, steer_width, dtype=torch.bool, device=dev)
        self.steer_table = steer_table
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.buckets = bucket_sizes(max_bs)
        self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        attn = AttentionBatch(self.slots[:b], [], self.tables[:b], self.lens[:b], self.block_size)
        hooks = None
        if self.steer_table is not None:
            table, mask = self.steer_table
            hooks = StepHooks(
                [], SteeringTensors(table, mask, self.index[:b], self.scale[:b], self.normalize[:b])
            )
        hidden = self.model(self.ids[:b], self.pos[:b], self.kv_caches, attn, hooks)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):
            self.lens[:b] = 1  # warm-up reads one (scratch) slot per row
            self.tables[:b] = self.dummy_slot // self.block_size
            for _ in range(2):
                self._forward(b)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = (graph, out)
        self.lens.zero_()
        self.tables.zero_()
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def run(self, inputs: DecodeInputs, steer: SteeringTensors | None) -> torch.Tensor:
        n = len(inputs.ids)
        b = self.bucket(n)
        assert b is not None
        nb = inputs.block_tables.shape[1]
        self.ids[:n].copy_(torch.from_numpy(inputs.ids), non_blocking=True)
        self.pos[:n].copy_(torch.from_numpy(inputs.positions), non_blocking=True)
        self.slots[:n].copy_(torch.from_numpy(inputs.slots), non_blocking=True)
        self.tables[:n, :nb].copy_(torch.from_numpy(inputs.block_tables), non_blocking=True)
        self.lens[:n].copy_(torch.from_numpy(inputs.context_lens), non_blocking=True)
        if b > n:  # padding rows: no context, K/V written to the scratch slot
            self.lens[n:b] = 0
            self.slots[n:b] = self.dummy_slot
        self.index[:b] = -1
        if steer is not None:
            w = steer.index.shape[1]
            self.index[:n, :w] = steer.index
            self.scale[:n, :w] = steer.scale
            self.normalize[:n, :w] = steer.normalize
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
