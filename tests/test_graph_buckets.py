"""Which CUDA graph a step replays: decode batch-size buckets and prefill prompt-length buckets (pure
host logic, so checked on the CPU; the graphs themselves are tested in tests/test_gpu.py)."""

from __future__ import annotations

import random

from actserve.server.engine.cuda_graphs import bucket_sizes, smallest_bucket
from actserve.server.engine.prefill_graphs import PREFILL_BUCKETS


def test_decode_buckets_cover_every_batch_size() -> None:
    for max_bs in (1, 3, 8, 17, 64, 100, 256):
        sizes = bucket_sizes(max_bs)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_bs
        for n in range(1, max_bs + 1):
            b = smallest_bucket(sizes, n)
            assert b is not None and b >= n
            assert all(s < n for s in sizes if s < b)  # no smaller bucket would hold n
        assert smallest_bucket(sizes, max_bs + 1) is None


def test_prefill_buckets_pick_the_least_padding() -> None:
    rng = random.Random(0)
    buckets = list(PREFILL_BUCKETS)
    for n in [1, 16, 17, 96, 97, 512] + [rng.randrange(1, 513) for _ in range(50)]:
        b = smallest_bucket(buckets, n)
        assert b is not None and b >= n and min(x for x in buckets if x >= n) == b
    assert smallest_bucket(buckets, 513) is None
