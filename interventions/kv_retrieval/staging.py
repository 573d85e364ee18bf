"""Host side of the KV host tier for retrieving rows (docs/architecture.md §3 "KV tiers", §10): each
slot owns `width` GPU blocks (reserved by the engine) per layer; before a step, the blocks the row
chose at its previous step (one step stale) that live on the host are recalled into them, and the
kernel reads those blocks instead of the host ids.

Per slot and layer it remembers which host block each reserved block holds, so a block chosen again
is not copied again (consecutive steps mostly choose the same blocks). All layers at once, in numpy
array ops (a per-layer loop cost milliseconds per row and step).
"""

from __future__ import annotations

import numpy as np


class Staging:
    def __init__(self, slots: int, layers: int, width: int, reserved: range, host_base: int) -> None:
        self.width, self.host_base = width, host_base
        self.stage_ids = np.asarray(reserved, dtype=np.int64).reshape(slots, width)
        self.held = np.full((slots, layers, width), -1, dtype=np.int64)
        self.copied = 0  # block-layers recalled since start

    def reset(self, slot: int) -> None:
        self.held[slot] = -1

    def stage(
        self, slot: int, table: np.ndarray, cols: np.ndarray, count: np.ndarray, extra: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The ids the kernel reads for the row's chosen columns `cols` [L, K] (the first `count[l]` of
        each layer, ascending) and the columns `extra` (ascending, above them: blocks that left the window
        since the choice), and the recalls that makes necessary: (ids [L, width], counts [L],
        (layers, host ids, gpu ids))."""
        layers, k = cols.shape
        w = self.width
        ext = np.broadcast_to(np.asarray(extra, dtype=np.int64), (layers, len(extra)))
        chosen = np.arange(k)[None, :] < count[:, None]
        dup = (ext[:, :, None] == np.where(chosen, cols, -1)[:, None, :]).any(-1)
        cand = np.concatenate([cols.astype(np.int64), ext], 1)
        valid = np.concatenate([chosen, ~dup], 1)
        # compact each layer's valid columns to the front (stable: ascending order kept), at most `w`
        order = np.argsort(~valid, axis=1, kind="stable")
        cand = np.take_along_axis(cand, order, 1)[:, :w]
        valid = np.take_along_axis(valid, order, 1)[:, :w]
        ids = np.where(valid, table[np.where(valid, cand, 0)], -1)
        need = np.where(valid & (ids >= self.host_base), ids, -1)  # host ids, -1 elsewhere
        held = self.held[slot]
        present = (need[:, :, None] == held[:, None, :]).any(-1) | (need < 0)
        keep = (held[:, :, None] == need[:, None, :]).any(-1) & (held >= 0)
        missing = ~present
        free_first = np.argsort(keep, axis=1, kind="stable")  # free positions first, in order
        rank = np.cumsum(missing, axis=1) - 1
        target = np.take_along_axis(free_first, np.where(missing, rank, 0), 1)
        lay = np.nonzero(missing)[0]
        at = target[missing]
        held[lay, at] = need[missing]
        recalls = (lay.astype(np.int64), need[missing], self.stage_ids[slot][at])
        # the reserved block now holding each host id
        pos = (need[:, :, None] == held[:, None, :]).argmax(-1)
        out = np.where(need >= 0, self.stage_ids[slot][pos], ids)
        ids_out = np.zeros((layers, w), dtype=np.int32)
        ids_out[:, : out.shape[1]] = np.where(valid, out, 0)
        self.copied += int(lay.size)
        return ids_out, valid.sum(1).astype(np.int32), recalls
