"""Paged KV bookkeeping: fixed-size blocks, each sequence's block table, and the prefix cache.

With prefix caching, a block may be shared: every block has a reference count, and a full prompt block
that was computed keeps its chain key (prefix_cache.py) after its sequences let go of it, as an
*evictable* block (LRU), until a new allocation needs the space. A sequence admitted with a cached
prefix starts with those blocks in its table and `num_computed` past them."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable

from actserve.server.engine.prefix_cache import block_keys, reusable_blocks
from actserve.server.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Hands out KV blocks; a sequence holds enough blocks for every token it has K/V for."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = False,
        host_base: int = 0,
        num_host_blocks: int = 0,
    ) -> None:
        """`host_base`, `num_host_blocks`: the host tier's ids [host_base, host_base + num_host_blocks)
        (docs/architecture.md §3, "KV tiers"); none by default."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))  # no owner, no cached content
        self.host_base = host_base or num_blocks
        self.host_free: deque[int] = deque(range(host_base, host_base + num_host_blocks))
        self.num_host_blocks = num_host_blocks
        self.refs = [0] * num_blocks
        self.caching = enable_prefix_caching
        self.cached: dict[bytes, int] = {}  # chain key -> block holding that prefix block
        self.key_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.queries = 0  # prompt tokens looked up in the cache
        self.hits = 0  # of them, found (their K/V reused)

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and evictable cached ones."""
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) <= self.num_free

    def _take(self) -> int:
        """A block for new content: a free one, else the least recently used evictable one (uncached)."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
        self.refs[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table to hold num_tokens tokens."""
        need = blocks_for(num_tokens, self.block_size) - len(seq.block_table)
        if need > self.num_free:
            raise RuntimeError("allocate() called without can_allocate()")
        for _ in range(max(need, 0)):
            seq.block_table.append(self._take())

    def needs_block(self, seq: Sequence, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) > len(seq.block_table)

    def borrow(self, num_blocks: int) -> list[int]:
        """Take blocks for work outside any sequence (the runner's collect mode); every borrowed block
        must come back through `give_back`. Free blocks first; evictable ones only when those run out."""
        if num_blocks > self.num_free:
            raise RuntimeError(f"borrow({num_blocks}) with only {self.num_free} free blocks")
        taken = [self._take() for _ in range(num_blocks)]
        for block in taken:
            self.refs[block] = 0
        return taken

    def give_back(self, blocks: list[int]) -> None:
        """Return borrowed blocks to the front of the free list, in order: after borrow + give_back the
        free list is exactly what it was (when no evictable block had to be borrowed)."""
        self.free.extendleft(reversed(blocks))

    def match_prefix(self, seq: Sequence, extra: Hashable) -> int:
        """Admit `seq` (no blocks yet) with the longest cached prefix of its prompt: those blocks join its
        table, `num_computed` moves past them; returns the number of tokens reused (0 without caching).
        A sequence that asks for prompt logprobs reuses nothing (a cached block keeps K/V, not the logits
        of its tokens), though its own blocks are cached for others as usual."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.caching:
            return 0
        if not seq.prefix_keys:  # once per sequence (a waiting one is looked up every step)
            reusable = reusable_blocks(seq.prompt_len, self.block_size)
            seq.prefix_keys = block_keys(seq.prompt_token_ids, self.block_size, extra, reusable)
        keys = seq.prefix_keys if seq.params.prompt_logprobs is None else []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            seq.block_table.append(block)
        reused = len(seq.block_table) * self.block_size
        seq.num_computed = seq.num_cached_tokens = reused
        return reused

    def record_lookup(self, seq: Sequence) -> None:
        """Count an admitted sequence's lookup: its prompt tokens queried, its reused tokens hit."""
        if self.caching:
            self.queries += seq.prompt_len
            self.hits += seq.num_cached_tokens

    def commit(self, seq: Sequence) -> None:
        """Key the prompt blocks `seq` has now computed, so later prompts can reuse them (a block whose
        key another block already holds stays unkeyed)."""
        if not self.caching or not seq.prefix_keys:
            return
        done = min(seq.num_computed // self.block_size, len(seq.prefix_keys), len(seq.block_table))
        for i in range(seq.prefix_committed, done):
            block = seq.block_table[i]
            key = seq.prefix_keys[i]
            if block not in self.key_of and key not in self.cached:
                self.cached[key] = block
                self.key_of[block] = key
        seq.prefix_committed = max(seq.prefix_committed, done)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; unreferenced keyed blocks stay cached (evictable, newest last);
        its host-tier blocks go back to the host's free list."""
        for block in seq.block_table:
            if block >= self.host_base:
                self.host_free.append(block)
                continue
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        seq.block_table = []
        seq.num_computed = seq.prefix_committed = seq.host_checked = 0

    # -- the host tier (docs/architecture.md §3, "KV tiers") -------------------------------------------
    @property
    def num_host_used(self) -> int:
        return self.num_host_blocks - len(self.host_free)

    @property
    def num_gpu_used(self) -> int:
        """GPU blocks some sequence holds (cached unreferenced ones count as free)."""
        return self.num_blocks - self.num_free

    def move_to_host(self, seq: Sequence, keep_first: int, keep_last: int) -> tuple[list[int], list[int]]:
        """Move `seq`'s full GPU blocks outside its first `keep_first` and last `keep_last` blocks to the
        host tier, as far as host blocks are free; blocks other sequences share stay. Their GPU blocks are
        freed (and uncached: the prefix cache hands out GPU blocks only); a block shared when it was
        considered stays for good (`Sequence.host_checked`: each block is considered once, so a step costs
        the blocks that turned cold since the last one). Returns (GPU ids, host ids) of
        the moved blocks, in table order: the caller copies their K/V before anything reuses the GPU ids
        (on CUDA, stream order does it)."""
        table = seq.block_table
        end = min(len(table) - keep_last, seq.num_computed // self.block_size)
        src: list[int] = []
        dst: list[int] = []
        start = max(keep_first, seq.host_checked)  # blocks before it were considered at earlier steps
        for j in range(start, end):
            block = table[j]
            if block >= self.host_base or self.refs[block] != 1:
                continue
            if not self.host_free:
                seq.host_checked = j  # the rest when host blocks free up
                return src, dst
            host = self.host_free.popleft()
            key = self.key_of.pop(block, None)
            if key is not None:
                del self.cached[key]
            self.refs[block] = 0
            self.free.append(block)
            table[j] = host
            seq.table_synced = min(seq.table_synced, j)  # its int32 mirror (Sequence.table_array) from here
            src.append(block)
            dst.append(host)
        seq.host_checked = max(seq.host_checked, end)
        return src, dst
