"""Prefix caching: which full KV blocks hold which prompt prefix (docs/architecture.md §3).

A full prompt block is keyed by a hash chain: its key hashes the previous block's key, its tokens and
an `extra` key for everything else that shapes a prompt's KV (the model's dtype and the identity and
scale of every intervention active in the prompt phase, `InterventionRegistry.prefix_key`). Two
prompts share block i only when their first (i+1) blocks of tokens and their extra keys are equal.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Hashable, Sequence

# the key of the (absent) block before the first one
ROOT = b"actserve-prefix-root"


def block_keys(
    tokens: Sequence[int], block_size: int, extra: Hashable, max_blocks: int | None = None
) -> list[bytes]:
    """The chain keys of the full blocks of `tokens` (at most `max_blocks`), each a SHA-256 digest
    (collisions are not a practical concern, unlike Python's 64-bit `hash`)."""
    n = len(tokens) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    tag = repr(extra).encode()
    # the tokens as little-endian uint32 bytes, packed once (per-token to_bytes cost 3 ms for 4k tokens)
    packed = array("I", tokens[: n * block_size])
    if sys.byteorder == "big":
        packed.byteswap()
    data = memoryview(packed.tobytes())
    width = block_size * packed.itemsize
    keys: list[bytes] = []
    parent = ROOT
    for i in range(n):
        h = hashlib.sha256(parent)
        h.update(tag)
        h.update(data[i * width : (i + 1) * width])
        parent = h.digest()
        keys.append(parent)
    return keys


def reusable_blocks(prompt_len: int, block_size: int) -> int:
    """How many leading full blocks of a prompt may come from the cache: all full ones but at least the
    last prompt token is computed again (its logits start the generation)."""
    return max(prompt_len - 1, 0) // block_size
