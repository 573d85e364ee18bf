"""A test copier for the expert cache (server/layers/expert_copier.py's protocol) whose copies land late:
only when the test calls `land()` or a handle at or after them is waited for, as copies on a side stream
would. A kernel that reads a slot whose copy it did not wait for sees the slot's old expert."""

from __future__ import annotations

from typing import Any

import torch

from actserve.server.layers.expert_copier import SyncCopier


class LateCopier(SyncCopier):
    """Copies land on `land()` or on a wait for a handle at or after them; `done` says whether they have.
    `landed`: the number of the last copy landed."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.landed = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copies += 1
        self.queue.append((self.copies, dst, src.clone()))

    def land(self, upto: int | None = None) -> None:
        while self.queue and (upto is None or self.queue[0][0] <= upto):
            n, dst, src = self.queue.pop(0)
            with torch.no_grad():
                dst.copy_(src)
            self.landed = n

    def wait(self, handle: Any) -> None:
        self.waits += 1
        self.land(handle)

    def done(self, handle: Any) -> bool:
        return self.landed >= handle
