"""Paged KV bookkeeping: a free list of fixed-size blocks and each sequence's block table."""

from __future__ import annotations

from collections import deque

from actserve.server.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Hands out KV blocks; a sequence holds enough blocks for every token it has K/V for."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table to hold num_tokens tokens."""
        need = blocks_for(num_tokens, self.block_size) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError("allocate() called without can_allocate()")
        for _ in range(max(need, 0)):
            seq.block_table.append(self.free.popleft())

    def needs_block(self, seq: Sequence, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) > len(seq.block_table)

    def borrow(self, num_blocks: int) -> list[int]:
        """Take blocks off the free list for work outside any sequence (the runner's collect mode); every
        borrowed block must come back through `give_back`."""
        if num_blocks > len(self.free):
            raise RuntimeError(f"borrow({num_blocks}) with only {len(self.free)} free blocks")
        return [self.free.popleft() for _ in range(num_blocks)]

    def give_back(self, blocks: list[int]) -> None:
        """Return borrowed blocks to the front of the free list, in order: after borrow + give_back the
        free list is exactly what it was."""
        self.free.extendleft(reversed(blocks))

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
