"""The plugin's resident tensors: per-block summaries indexed by block id, and per-sequence state in
slots (docs/architecture.md §10, "KV retrieval").

Per block id (all ids of `KVSpace.num_ids`, host tier included, plus one dump row that rows of other
requests write to), per layer: InfLLM's representative key per KV head, and Quest's elementwise min and
max of the keys. Per slot (one per retrieving sequence, plus a dump slot): the last `ring` queries with
their positions and activation biases, running mean and variance of the queries, ActQKV's running
entropy per layer and the blocks left to spread over the step's remaining layers, and, with a host tier,
per layer the host block each of the slot's reserved GPU blocks holds, and, per layer, the choice a
lag-1 sequence made at its previous step (candidate columns, reserved positions, count, position).
"""

from __future__ import annotations

import torch

from actserve.interventions.base import ModelInfo


class RetrievalState:
    def __init__(
        self,
        info: ModelInfo,
        slots: int,
        ring: int,
        width: int,
        num_ids: int,
        quest: bool,
        reps: bool,
        tier: bool = False,
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
        # with a host tier, per layer and slot: the host id each of the slot's `width` reserved GPU blocks
        # holds (-1 none), so a block chosen again is not copied again (kernels/kv_retrieval_ref.stage_ref)
        self.held = torch.full((layers, s, width), -1, dtype=torch.int32, device=dev) if tier else None
        # lag 1, per layer and slot: the candidate columns chosen at the position `lag_tag` (-1 none) for
        # the next step, ascending, `lag_n` of them, and with a tier the reserved position each host block
        # was staged at (-1: a GPU id then); kernels/kv_retrieval_ref.py `lagged_ref`, `remember_ref`
        self.lag_cols = torch.zeros(layers, s, width, dtype=torch.int32, device=dev)
        self.lag_at = torch.full((layers, s, width), -1, dtype=torch.int32, device=dev)
        self.lag_n = torch.zeros(layers, s, dtype=torch.int32, device=dev)
        self.lag_tag = torch.full((layers, s), -1, dtype=torch.int64, device=dev)
        # [retrieved blocks, (row, layer) selections that retrieved, block-layers recalled from the host]
        # summed since start
        self.counters = torch.zeros(3, dtype=torch.int64, device=dev)
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
        self.forget_host(slot)
        self.forget_lag(slot)

    def forget_lag(self, slot: int) -> None:
        """No valid previous choice: the slot's next decode step chooses afresh (a sequence (re)starts)."""
        self.lag_tag[:, slot] = -1

    def forget_host(self, slot: int) -> None:
        """The slot's reserved blocks hold nothing (a sequence (re)starts: its host ids mean nothing)."""
        if self.held is not None:
            self.held[:, slot] = -1

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Blocks `src` now live at ids `dst`: their summaries follow."""
        for t in (self.rep, self.kmin, self.kmax):
            if t is not None:
                t[:, dst] = t[:, src]
