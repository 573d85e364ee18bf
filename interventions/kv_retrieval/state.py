"""The plugin's resident tensors: per-block summaries indexed by block id, and per-sequence state in
slots (docs/architecture.md §10, "KV retrieval").

Per block id (all ids of `KVSpace.num_ids`, host tier included, plus one dump row that rows of other
requests write to), per layer: InfLLM's representative key per KV head, and Quest's elementwise min and
max of the keys. Per slot (one per retrieving sequence, plus a dump slot): the last `ring` queries with
their positions and activation biases, running mean and variance of the queries, ActQKV's running
entropy per layer and the blocks left to spread over the step's remaining layers, the last choice per
layer (which the host recalls with a host tier) and the ids the host staged for the kernel to read.
"""

from __future__ import annotations

import torch

from actserve.interventions.base import ModelInfo


class RetrievalState:
    def __init__(
        self, info: ModelInfo, slots: int, ring: int, width: int, num_ids: int, quest: bool, reps: bool
    ) -> None:
        layers, hq, hk, d = info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim
        dev, dt = info.device, info.dtype
        self.slots, self.ring, self.width, self.dump_id = slots, ring, width, num_ids
        s = slots + 1  # the last slot is the dump of rows without a plan
        self.ring_q = torch.zeros(layers, s, ring, hq, d, dtype=dt, device=dev)
        self.ring_pos = torch.full((layers, s, ring), -1, dtype=torch.long, device=dev)
        self.ring_bias = torch.zeros(layers, s, ring, dtype=torch.float32, device=dev)
        self.mean = torch.zeros(layers, s, hq * d, dtype=torch.float32, device=dev)
        self.var = torch.ones(layers, s, hq * d, dtype=torch.float32, device=dev)
        self.count = torch.zeros(layers, s, dtype=torch.float32, device=dev)
        self.entropy = torch.ones(s, layers, dtype=torch.float32, device=dev)
        self.remaining = torch.zeros(s, dtype=torch.float32, device=dev)
        # per layer: each slot's last choice (columns of its table) and, with a host tier, the ids the
        # host staged for it to read
        self.sel_cols = torch.zeros(layers, s, width, dtype=torch.int32, device=dev)
        self.sel_n = torch.zeros(layers, s, dtype=torch.int32, device=dev)
        self.att_ids = torch.zeros(layers, s, width + 1, dtype=torch.int32, device=dev)
        self.att_n = torch.zeros(layers, s, dtype=torch.int32, device=dev)
        # [retrieved blocks, (row, layer) selections that retrieved] summed since start
        self.counters = torch.zeros(2, dtype=torch.int64, device=dev)
        n = num_ids + 1
        self.rep = torch.zeros(layers, n, hk, d, dtype=dt, device=dev) if reps else None
        self.kmin = torch.zeros(layers, n, hk, d, dtype=dt, device=dev) if quest else None
        self.kmax = torch.zeros(layers, n, hk, d, dtype=dt, device=dev) if quest else None

    @staticmethod
    def block_bytes(info: ModelInfo, quest: bool, reps: bool) -> int:
        """Device bytes per block id of the summaries (what `kv_block_bytes` reports)."""
        es = torch.tensor([], dtype=info.dtype).element_size()
        per = info.num_layers * info.num_kv_heads * info.head_dim * es
        return per * (int(reps) + 2 * int(quest))

    def reset(self, slot: int) -> None:
        """A fresh sequence in `slot`: no queries seen, flat entropies."""
        self.ring_pos[:, slot] = -1
        self.mean[:, slot] = 0
        self.var[:, slot] = 1
        self.count[:, slot] = 0
        self.entropy[slot] = 1
        self.sel_n[:, slot] = 0
        self.att_n[:, slot] = 0

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Blocks `src` now live at ids `dst`: their summaries follow."""
        for t in (self.rep, self.kmin, self.kmax):
            if t is not None:
                t[:, dst] = t[:, src]
