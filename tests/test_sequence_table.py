"""`Sequence.table_array`, the int32 mirror of a block table that decode steps read instead of converting
the list each step: it equals the list after appends, after the host tier rewrites entries in place
(`BlockManager.move_to_host`), after a release and a fresh allocation, and after the list is replaced."""

from __future__ import annotations

import random

import numpy as np

from actserve.server.engine.block_manager import BlockManager
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence

BS = 4


def same(seq: Sequence) -> bool:
    got = seq.table_array()
    return got.dtype == np.int32 and got.tolist() == seq.block_table


def test_table_array_follows_the_block_table() -> None:
    rng = random.Random(3)
    bm = BlockManager(400, BS, host_base=1000, num_host_blocks=300)
    seq = Sequence("a", [rng.randrange(100) for _ in range(9)], SamplingParams(max_tokens=2000), [])
    tokens = 9
    bm.allocate(seq, tokens)
    assert same(seq)
    for step in range(60):  # decode steps: a block now and then; cold blocks to the host tier at times
        tokens += rng.randrange(1, 12)
        bm.allocate(seq, tokens)
        seq.num_computed = tokens
        assert same(seq), step
        if step % 7 == 3:
            src, dst = bm.move_to_host(seq, keep_first=1, keep_last=2)
            assert src and same(seq), step
            assert any(b >= 1000 for b in seq.table_array())
    bm.release(seq)
    assert same(seq) and seq.table_array().shape == (0,)
    seq.num_computed, seq.host_checked = 0, 0
    bm.allocate(seq, 30)
    assert same(seq)
    seq.block_table = [7, 8, 9]  # a table replaced by another list
    assert same(seq)
