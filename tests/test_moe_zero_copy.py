"""Zero-copy steps of the expert cache (server/layers/expert_zero_copy.py): MoE layers whose missing
experts are read from the host copy inside the kernel, the cache refilled between steps from statistics
read one step late. On the CPU the layers run the plain-torch reference with the same table logic, under a
copier whose copies land only when the test says so: every layer's output equals the all-resident
reference bit for bit, no table entry ever points at a slot whose copy has not landed (checked before every
layer call), the counters equal a recomputation from the routing and the tables, and admission follows its
rule. On a GPU (marked gpu) the same protocol runs with pinned host memory, the side-stream copier and no
host sync between steps, in bf16 at Qwen3-30B-A3B's expert shape."""

from __future__ import annotations

import random

import pytest
import torch

from actserve.kernels.moe_ref import fused_moe_ref
from actserve.server.layers import expert_cache
from actserve.server.layers.expert_cache import ExpertOffload, OffloadConfig
from actserve.server.layers.moe import SparseMoeBlock
from tests.moe_copiers import LateCopier

HIDDEN, INTER = 32, 24


def zero_copy_blocks(
    layers: int,
    experts: int,
    k: int,
    slots: int,
    admit_after: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    hidden: int = HIDDEN,
    inter: int = INTER,
) -> tuple[list[SparseMoeBlock], ExpertOffload, list[tuple[torch.Tensor, torch.Tensor]]]:
    """MoE blocks whose experts live in host copies (pinned on CUDA) with `slots` device slots, under one
    ExpertOffload started with zero copy on; and each layer's full weights on the device (the reference)."""
    torch.manual_seed(layers * 100 + slots)
    blocks, full = [], []
    cuda = device == "cuda"
    for _ in range(layers):
        b = SparseMoeBlock(hidden, experts, k, inter, True, ("gate_proj", "up_proj", "down_proj")).to(dtype)
        w13 = (torch.randn(experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
        w2 = (torch.randn(experts, hidden, inter) / inter**0.5).to(dtype)
        b.experts.offload_to_host(slots, dtype, pin=cuda)
        b.experts.to_empty(device=device)
        b.experts.host_w13.copy_(w13)
        b.experts.host_w2.copy_(w2)
        blocks.append(b.to(device).eval())
        full.append((w13.to(device), w2.to(device)))
    config = OffloadConfig(slots, 0, "never", "on", admit_after)
    offload = ExpertOffload(list(enumerate(blocks)), config, torch.device(device))
    for b in blocks:
        b.experts.after_loading()
    offload.start()
    assert offload.zero_copy is not None
    return blocks, offload, full


def routing(rng: random.Random, rows: int, k: int, hot: list[int], experts: int) -> torch.Tensor:
    """Each row's k distinct experts, mostly from a small `hot` set (so experts recur over steps), some -1."""
    out = []
    for _ in range(rows):
        pool = hot if rng.random() < 0.8 else list(range(experts))
        picks = rng.sample(pool, min(k, len(pool)))
        picks += [-1] * (k - len(picks))
        if rng.random() < 0.2:
            picks[-1] = -1
        out.append(picks)
    return torch.tensor(out)


def check_table(offload: ExpertOffload, full: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Every device table entry points at a slot holding exactly that expert; returns the entries seen."""
    seen = 0
    for layer, c in offload.caches.items():
        table = c.experts.slot_of.tolist()
        for e, s in enumerate(table):
            if s >= 0:
                assert torch.equal(c.experts.w13[s], full[layer][0][e]), (layer, e, s)
                assert torch.equal(c.experts.w2[s], full[layer][1][e]), (layer, e, s)
                seen += 1
    return seen


@pytest.mark.parametrize(
    ("slots", "admit_after", "eager_pairs"), [(1, 1, 64), (3, 1, 64), (3, 2, 1), (2, 1, 1)]
)
def test_steps_exact_and_no_slot_read_before_its_copy_lands(
    slots: int, admit_after: int, eager_pairs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 layers of 8 experts, 60 steps of 1-4 rows with drifting hot experts, copies landing at random
    later points. With `eager_pairs` 1, steps of more pairs than experts take the eager path between
    zero-copy ones (the two share the cache). Each layer's output is the all-resident reference's bits;
    every table entry holds its expert before each layer call; hits and misses equal a recomputation."""
    monkeypatch.setattr(expert_cache, "ZERO_COPY_PAIRS_PER_EXPERT", eager_pairs)
    blocks, offload, full = zero_copy_blocks(3, 8, 2, slots, admit_after)
    offload.copier = copier = LateCopier()
    rng = random.Random(slots * 10 + admit_after)
    hot = [[rng.randrange(8) for _ in range(3)] for _ in range(3)]
    entries = hits = misses = 0
    for step in range(60):
        offload.before_step()
        rows = rng.randint(1, 4)
        for layer, b in enumerate(blocks):
            if rng.random() < 0.1:  # the hot set drifts
                hot[layer][rng.randrange(3)] = rng.randrange(8)
            x = torch.randn(rows, HIDDEN)
            ids = routing(rng, rows, 2, hot[layer], 8)
            weights = torch.rand(rows, 2).masked_fill(ids < 0, 0.0)
            entries += check_table(offload, full)
            zero = rows * 2 <= eager_pairs * 8
            if zero:
                table = b.experts.slot_of
                used = torch.unique(ids[ids >= 0])
                hits += int((table[used] >= 0).sum())
                misses += int((table[used] < 0).sum())
            got = b.experts(x, ids, weights, 2)
            assert torch.equal(got, fused_moe_ref(x, *full[layer], ids.int(), weights)), (step, layer)
        offload.after_step()
        if rng.random() < 0.5:
            copier.land(rng.randint(0, copier.copies))
    offload.flush_stats()
    t = offload.telemetry.counters
    assert entries > 0 and copier.copies > 0 and copier.landed > 0
    eager_hits = t["moe_expert_cache_hits"] - hits
    if eager_pairs == 64:  # zero-copy steps only: the counters are exactly the recomputation
        assert (t["moe_expert_cache_hits"], t["moe_expert_cache_misses"]) == (hits, misses)
        assert t["moe_expert_zero_copy_bytes"] == misses * offload.caches[0].expert_bytes
    else:
        assert eager_hits >= 0 and t["moe_expert_cache_misses"] >= misses
    assert t["moe_expert_copy_bytes"] == copier.copies // 2 * offload.caches[0].expert_bytes


def test_admission_waits_for_the_miss_streak() -> None:
    """One layer, 4 experts, one slot holding expert 0. admit_after 2: expert 2 missed in steps 1 and 3
    (3 in between) is not copied; missed in steps 3 and 4 it is copied before step 5, into the slot of
    expert 0 (unused in step 4), and its table entry appears once the copy has landed. admit_after 0 never
    copies."""
    for admit, want_copy_before in ((2, 5), (1, 2), (0, None)):
        blocks, offload, full = zero_copy_blocks(1, 4, 1, 1, admit)
        offload.copier = copier = LateCopier()
        experts = blocks[0].experts
        x = torch.randn(1, HIDDEN)
        for step, e in enumerate([2, 3, 2, 2, 2, 2], start=1):
            offload.before_step()
            copied = copier.copies > 0
            assert copied == (want_copy_before is not None and step >= want_copy_before), (admit, step)
            if copied:
                cache = offload.caches[0]
                assert cache.expert_at.tolist() == [2]
                assert experts.slot_of.tolist()[2] == (0 if copier.landed else -1)
            experts(x, torch.tensor([[e]]), torch.ones(1, 1), 1)
            offload.after_step()
            if step == 5:
                copier.land()
        offload.flush_stats()
        assert experts.slot_of.tolist() == ([-1, -1, 0, -1] if want_copy_before else [0, -1, -1, -1])


def test_configure_keeps_zero_copy_and_admission() -> None:
    blocks, offload, _ = zero_copy_blocks(1, 4, 1, 2, 1)
    offload.configure(admit_after=3)
    assert offload.zero_copy is not None and offload.zero_copy.admit_after == 3
    with pytest.raises(ValueError, match="cannot be combined"):
        offload.configure(cpu_compute="always")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 6])
def test_cuda_zero_copy_steps_with_side_stream_refills(rows: int) -> None:
    """bf16, Qwen3-30B-A3B's expert shape (hidden 2048, inter 768), 4 layers of 32 experts, top-8, 8
    slots each: 40 steps with drifting hot experts, before/after-step calls as the engine makes them and no
    host sync between steps, so refills really overlap the layers reading the slots. Every output equals
    the all-resident kernel's bits; copies happen and land; the weights stayed pinned."""
    from actserve.kernels.moe import fused_moe

    layers, experts, k = 4, 32, 8
    blocks, offload, full = zero_copy_blocks(
        layers, experts, k, 8, 1, device="cuda", dtype=torch.bfloat16, hidden=2048, inter=768
    )
    assert blocks[0].experts.host_w13.is_pinned()
    rng = random.Random(rows)
    hot = [[rng.randrange(experts) for _ in range(10)] for _ in range(layers)]
    outs, wants = [], []
    for _ in range(40):
        offload.before_step()
        for layer, b in enumerate(blocks):
            if rng.random() < 0.2:
                hot[layer][rng.randrange(10)] = rng.randrange(experts)
            x = torch.randn(rows, 2048, device="cuda").bfloat16()
            ids = routing(rng, rows, k, hot[layer], experts).cuda()
            weights = torch.rand(rows, k, device="cuda").masked_fill(ids < 0, 0.0)
            outs.append(b.experts(x, ids, weights, k))
            wants.append(fused_moe(x, *full[layer], ids, weights, active_k=k))
        offload.after_step()
    torch.cuda.synchronize()
    for i, (got, want) in enumerate(zip(outs, wants, strict=True)):
        assert torch.equal(got, want), i
    offload.flush_stats()
    t = offload.telemetry.counters
    assert t["moe_expert_copy_bytes"] > 0 and t["moe_expert_zero_copy_bytes"] > 0
    assert t["moe_expert_cache_hits"] > 0
