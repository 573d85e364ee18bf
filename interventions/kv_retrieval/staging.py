"""Host side of the KV host tier for retrieving rows (docs/architecture.md §3 "KV tiers", §10): each
slot owns `width` GPU blocks (reserved by the engine) per layer; before a step, the blocks the row
chose at its previous step (one step stale) that live on the host are recalled into them, and the
kernel reads those blocks instead of the host ids.

Per slot and layer it remembers which host block each reserved block holds, so a block chosen again
is not copied again (consecutive steps mostly choose the same blocks).
"""

from __future__ import annotations

import numpy as np


class Staging:
    def __init__(self, slots: int, layers: int, width: int, reserved: range, host_base: int) -> None:
        self.width, self.host_base = width, host_base
        self.stage_ids = np.asarray(reserved, dtype=np.int64).reshape(slots, width)
        self.held = np.full((slots, layers, width), -1, dtype=np.int64)
        self.copied = 0  # blocks recalled since start (per layer)

    def reset(self, slot: int) -> None:
        self.held[slot] = -1

    def stage(
        self, slot: int, table: np.ndarray, cols: np.ndarray, count: np.ndarray, extra: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The ids the kernel reads for the row's chosen columns `cols` [L, K] (first `count[l]` of each
        layer, ascending) plus the columns `extra` (blocks that left the window since the choice), and
        the recalls that makes necessary: (ids [L, width], counts [L], (layers, host ids, gpu ids))."""
        layers = cols.shape[0]
        ids_out = np.zeros((layers, self.width), dtype=np.int32)
        n_out = np.zeros(layers, dtype=np.int32)
        rl: list[np.ndarray] = []
        rh: list[np.ndarray] = []
        rg: list[np.ndarray] = []
        stage = self.stage_ids[slot]
        for layer in range(layers):
            c = np.union1d(cols[layer, : count[layer]], extra)[: self.width]  # sorted, unique
            ids = table[c]
            host = ids >= self.host_base
            need = ids[host]
            held = self.held[slot, layer]
            missing = need[~np.isin(need, held)]
            if missing.size:
                free = np.flatnonzero(~np.isin(held, need))[: missing.size]
                held[free] = missing
                rl.append(np.full(missing.size, layer, dtype=np.int64))
                rh.append(missing)
                rg.append(stage[free])
            if need.size:
                order = np.argsort(held)
                at = order[np.searchsorted(held, need, sorter=order)]
                ids = ids.copy()
                ids[host] = stage[at]
            ids_out[layer, : ids.size] = ids
            n_out[layer] = ids.size
        empty = np.zeros(0, dtype=np.int64)
        recalls = (
            np.concatenate(rl) if rl else empty,
            np.concatenate(rh) if rh else empty,
            np.concatenate(rg) if rg else empty,
        )
        self.copied += int(recalls[0].size)
        return ids_out, n_out, recalls
