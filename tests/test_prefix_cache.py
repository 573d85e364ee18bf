"""Prefix-cache bookkeeping in the block manager: chain keys, sharing, LRU eviction, counters, and an
invariant check under random operations (every block is referenced, free or evictable, exactly once)."""

from __future__ import annotations

import random
from pathlib import Path

from actserve.server.engine.block_manager import BlockManager
from actserve.server.engine.prefix_cache import block_keys, reusable_blocks
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, list(tokens), SamplingParams(max_tokens=4), [0])


def admit(bm: BlockManager, s: Sequence, extra: object = ("float32",)) -> int:
    """What the scheduler does: reuse the cached prefix, allocate the rest, compute, key the blocks."""
    reused = bm.match_prefix(s, extra)
    bm.record_lookup(s)
    bm.allocate(s, s.num_tokens)
    s.num_computed = s.num_tokens
    bm.commit(s)
    return reused


def check_invariants(bm: BlockManager) -> None:
    free, evictable = set(bm.free), set(bm.evictable)
    referenced = {b for b in range(bm.num_blocks) if bm.refs[b] > 0}
    assert len(free) == len(bm.free)
    assert not (free & evictable) and not (free & referenced) and not (evictable & referenced)
    assert free | evictable | referenced == set(range(bm.num_blocks))
    assert all(bm.key_of[b] for b in evictable)  # evictable blocks are exactly keyed unreferenced ones
    assert {b: k for k, b in bm.cached.items()} == bm.key_of


def test_keys_chain_over_tokens_and_extra() -> None:
    a = block_keys(list(range(12)), BS, "x")
    assert len(a) == 3 and len(set(a)) == 3
    b = block_keys([*range(4), 99, *range(5, 12)], BS, "x")  # differs in block 1: blocks 1 and 2 differ
    assert b[0] == a[0] and b[1] != a[1] and b[2] != a[2]
    assert block_keys(list(range(12)), BS, "y")[0] != a[0]
    assert block_keys(list(range(12)), BS, "x", max_blocks=2) == a[:2]
    assert [reusable_blocks(n, BS) for n in (1, 4, 5, 8, 9)] == [0, 0, 1, 1, 2]


def test_reuse_of_a_computed_prefix_counts_exact_tokens() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    first = seq(list(range(10)), "a")
    assert admit(bm, first) == 0
    second = seq(list(range(10)), "b")
    assert admit(bm, second) == 8  # 2 full blocks; the last prompt token's block is computed again
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert second.num_cached_tokens == 8
    assert (bm.queries, bm.hits) == (20, 8)
    check_invariants(bm)
    bm.release(first)
    assert bm.refs[second.block_table[0]] == 1  # still held by the second
    bm.release(second)
    assert len(bm.evictable) == 2 and bm.num_free == 16
    check_invariants(bm)
    third = seq([*range(4), 7, 7, 7, 7, 8], "c")  # shares block 0 only
    assert admit(bm, third) == 4
    other = seq(list(range(10)), "d")
    assert admit(bm, other, extra=("float32", ("steering", "v1"))) == 0  # a prompt-phase intervention
    check_invariants(bm)


def test_lru_eviction_and_disabled_cache() -> None:
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    old, new = seq(list(range(9)), "old"), seq(list(range(100, 109)), "new")
    admit(bm, old)
    admit(bm, new)
    old_keyed, new_keyed = old.block_table[:2], new.block_table[:2]
    bm.release(old)
    bm.release(new)
    assert list(bm.evictable) == old_keyed + new_keyed  # least recently released first
    filler = seq(list(range(200, 212)), "fill")  # 3 blocks: the 2 free ones, then the oldest evictable
    admit(bm, filler)
    assert old_keyed[0] in filler.block_table and old_keyed[1] not in filler.block_table
    new2 = seq(list(range(100, 109)), "new2")
    assert admit(bm, new2) == 8  # new's blocks survived; its third block evicts old's second
    assert new2.block_table[:2] == new_keyed and old_keyed[1] == new2.block_table[2]
    check_invariants(bm)
    bm.release(filler)
    bm.release(new2)
    assert admit(bm, seq(list(range(9)), "again")) == 0  # old's chain was evicted
    check_invariants(bm)
    off = BlockManager(6, BS)
    a = seq(list(range(9)))
    assert admit(off, a) == 0 and off.match_prefix(seq(list(range(9)), "b"), "x") == 0
    off.release(a)
    assert off.num_free == 6 and not off.evictable


def test_borrow_takes_free_blocks_first() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    s = seq(list(range(9)))
    admit(bm, s)
    bm.release(s)  # 2 keyed blocks evictable, 6 free
    before = list(bm.free)
    taken = bm.borrow(6)
    bm.give_back(taken)
    assert list(bm.free) == before and len(bm.evictable) == 2
    taken = bm.borrow(7)  # one evictable block is needed: it loses its key
    bm.give_back(taken)
    assert len(bm.evictable) == 1 and bm.num_free == 8
    check_invariants(bm)


def test_random_operations_keep_invariants() -> None:
    rng = random.Random(0)
    bm = BlockManager(24, BS, enable_prefix_caching=True)
    live: list[Sequence] = []
    reused_total = 0
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for step in range(400):
        if live and (rng.random() < 0.4 or bm.num_free < 8):
            bm.release(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(prefixes)[: rng.randrange(1, 13)] + [
                rng.randrange(50) for _ in range(rng.randrange(6))
            ]
            s = seq(tokens, f"s{step}")
            extra = rng.choice(["a", "b"])
            reused = bm.match_prefix(s, extra)
            assert reused % BS == 0 and reused < len(tokens)
            reused_total += reused
            if not bm.can_allocate(s.num_tokens - reused):
                bm.release(s)
                continue
            bm.allocate(s, s.num_tokens)
            s.num_computed = s.num_tokens
            bm.commit(s)
            live.append(s)
        check_invariants(bm)
    assert reused_total > 0


def test_intervention_prefix_keys(tinystories_dir: Path) -> None:
    """A prompt steered in the prompt phase gets a key (equal for equal vectors, different for another
    scale or direction); a generation-only vector, a logits-only plugin or none leave the prompt plain."""
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    reg = LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=32)).registry
    d = [0.25] * 128

    def key(spec: dict) -> tuple:
        plans = reg.prepare(spec)
        try:
            return reg.prefix_key(plans)
        finally:
            reg.release(plans)

    def steer(scale: float, phases: list[str], direction: list[float] = d) -> dict:
        return {"steering": {"vectors": [{"directions": {"1": direction}, "scale": scale, "phases": phases}]}}

    prompt = key(steer(2.0, ["prompt", "generation"]))
    assert prompt and prompt == key(steer(2.0, ["prompt"]))
    assert prompt != key(steer(3.0, ["prompt"]))
    assert prompt != key(steer(2.0, ["prompt"], [0.5] * 128))
    assert key(steer(2.0, ["generation"])) == ()
    assert key({}) == ()
    if "test_logit_bias" in reg.plugins:
        assert key({"test_logit_bias": {"token_ids": [3], "bias": 1.0}}) == ()
        assert key({**steer(2.0, ["prompt"]), "test_logit_bias": {"token_ids": [3], "bias": 1.0}}) == prompt
