"""`Sequence.table_array`: the int32 mirror of a block table that decode steps read, against the list
itself after random growth, releases, re-allocations and host-tier moves."""

from __future__ import annotations

import random

import numpy as np

from actserve.server.engine.block_manager import BlockManager
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence


def test_table_array_follows_the_block_table() -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    bm = BlockManager(num_blocks=4096, block_size=4, host_base=10_000, num_host_blocks=4096)
    seqs = [Sequence(f"s{i}", [1] * 8, SamplingParams(max_tokens=8), []) for i in range(3)]
    tokens = [0, 0, 0]
    for _ in range(400):
        i = rng.randrange(3)
        s, op = seqs[i], rng.random()
        if op < 0.6:  # grow (often past the mirror's capacity)
            tokens[i] += rng.choice([1, 3, 40, 300])
            if bm.num_free >= tokens[i] // 4 + 1:
                bm.allocate(s, tokens[i])
        elif op < 0.75:  # release, then maybe refill to the same length with other blocks
            n = tokens[i]
            bm.release(s)
            tokens[i] = 0
            if rng.random() < 0.5 and n and bm.num_free >= n // 4 + 1:
                bm.allocate(s, n)
                tokens[i] = n
        else:  # cold blocks to the host tier: entries rewritten in place
            s.num_computed = tokens[i]
            bm.move_to_host(s, keep_first=1, keep_last=2)
        for t in seqs if rng.random() < 0.3 else [s]:
            got = t.table_array()
            assert got.dtype == np.int32
            assert got.tolist() == t.block_table, f"seed {seed}"
