"""The fused MoE kernel (kernels/moe.py) and the fused router (kernels/moe_route.py) against their
plain-torch references (kernels/moe_ref.py), and the reference against float64 per-row arithmetic, on
fresh random inputs; expert ids mapped to slots through a table in the kernel, with missing experts read
from a host copy (zero copy). On the CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest.py) at
tiny shapes, where the "host" copy is another CPU tensor (the same index logic); on a GPU the same tests
run natively, plus bf16 at real layer shapes, a CUDA-graph replay, and the host copy in pinned memory read
over PCIe inside a graph (marked gpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actserve.kernels import moe
from actserve.kernels.moe import fused_moe, moe_align
from actserve.kernels.moe_ref import align_ref, expert_slots, fused_moe_ref, route_topk
from actserve.kernels.moe_route import route_topk as fused_route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["decode", "grouped"]


def case(rows: int, k: int, seed: int, hidden: int = 48, inter: int = 40, slots: int = 6):
    """Random weights in `slots` slots, and each row's k distinct slots with some -1 columns at the end."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g)
    w13 = torch.randn(slots, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(slots, hidden, inter, generator=g) / inter**0.5
    chosen = torch.stack([torch.randperm(slots, generator=g)[:k] for _ in range(rows)])
    used = torch.randint(1, k + 1, (rows,), generator=g)
    chosen = torch.where(torch.arange(k) < used.unsqueeze(1), chosen, -1)
    weights = torch.rand(rows, k, generator=g).masked_fill(chosen < 0, 0.0)
    dev = [t.to(DEVICE) for t in (x, w13, w2, chosen.int(), weights)]
    return tuple(dev)


def float64_moe(x, w13, w2, slots, weights) -> torch.Tensor:
    """Row by row, column by column, in float64: sum_c w[r,c] * W2_s (silu(W1_s x) * W3_s x)."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for r in range(x.shape[0]):
        for c in range(slots.shape[1]):
            s = int(slots[r, c])
            if s < 0:
                continue
            gu = w13[s].double().cpu() @ x[r].double().cpu()
            h = F.silu(gu[:inter]) * gu[inter:]
            out[r] += float(weights[r, c]) * (w2[s].double().cpu() @ h)
    return out


def test_reference_matches_float64() -> None:
    x, w13, w2, slots, weights = case(7, 3, seed=1)
    got = fused_moe_ref(x, w13, w2, slots, weights).cpu().double()
    assert (got - float64_moe(x, w13, w2, slots, weights)).abs().max().item() < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("rows", "k"), [(1, 2), (3, 2), (5, 3), (9, 4)])  # 3: pick_decode's few-row configs
def test_kernel_matches_reference(path: str, rows: int, k: int) -> None:
    x, w13, w2, slots, weights = case(rows, k, seed=rows * 10 + k)
    want = fused_moe_ref(x, w13, w2, slots, weights)
    got = fused_moe(x, w13, w2, slots, weights, path=path, active_k=2)
    assert (got - want).abs().max().item() < 2e-5


def test_decode_column_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """One program per row and tile adding every column itself (a small program target), or columns
    spread over programs and added by the sum kernel (a large one): the same result (bit for bit under
    the interpreter; compiled, the fused add may contract into an FMA)."""
    x, w13, w2, slots, weights = case(3, 4, seed=2)
    out = {}
    for target in (1, 4096):
        monkeypatch.setattr(moe, "DECODE_TARGET_PROGRAMS", target)
        out[target] = fused_moe(x, w13, w2, slots, weights, path="decode")
    assert (out[1] - fused_moe_ref(x, w13, w2, slots, weights)).abs().max().item() < 2e-5
    if DEVICE == "cpu":
        assert torch.equal(out[1], out[4096])
    assert torch.allclose(out[1], out[4096], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", [1, 4096])
def test_deferred_sum(monkeypatch: pytest.MonkeyPatch, target: int) -> None:
    """defer_sum: where the decode path adds the columns in a launch of its own, the unadded columns
    (PendingSum) that `sum_columns` adds to the plain call's bits; where one program adds them itself
    (target 1) or on the grouped path, the plain output."""
    from actserve.kernels.moe_ref import PendingSum, sum_columns

    monkeypatch.setattr(moe, "DECODE_TARGET_PROGRAMS", target)
    x, w13, w2, slots, weights = case(3, 4, seed=5)
    plain = fused_moe(x, w13, w2, slots, weights, path="decode")
    got = fused_moe(x, w13, w2, slots, weights, path="decode", defer_sum=True)
    if target == 1:
        assert isinstance(got, torch.Tensor) and torch.equal(got, plain)
    else:
        assert isinstance(got, PendingSum) and torch.equal(
            sum_columns(got.products, got.slots, x.dtype), plain
        )
    grouped = fused_moe(x, w13, w2, slots, weights, path="grouped", defer_sum=True)
    assert isinstance(grouped, torch.Tensor)


@pytest.mark.parametrize("path", PATHS)
def test_empty_columns_are_bit_identical(path: str) -> None:
    """A step widened with -1 columns (a wider per-request top_k elsewhere in the batch) gives each row
    exactly what the narrower step gives it."""
    x, w13, w2, slots, weights = case(6, 2, seed=7)
    narrow = fused_moe(x, w13, w2, slots, weights, path=path, active_k=2)
    wide_slots = F.pad(slots, (0, 3), value=-1)
    wide = fused_moe(x, w13, w2, wide_slots, F.pad(weights, (0, 3)), path=path, active_k=2)
    assert torch.equal(narrow, wide)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_matches_reference(block_m: int) -> None:
    _, _, _, slots, _ = case(11, 3, seed=block_m)
    got_pairs, got_slots = moe_align(slots, 6, block_m)
    pairs, block_slots = align_ref(slots.cpu(), 6, block_m)
    assert got_pairs[: len(pairs)].tolist() == pairs
    assert got_slots[: len(block_slots)].tolist() == block_slots
    assert (got_slots[len(block_slots) :] == -1).all()
    assert (got_pairs[len(pairs) :] == slots.numel()).all()


def test_route_topk_per_row_k_equals_router_with_that_k() -> None:
    """A row with k = row_k[r] gets what a router with num_experts_per_tok = k computes (transformers'
    order: softmax, top-k, renormalise), -1 / 0 in the columns after."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 8, generator=g)
    row_k = torch.tensor([1, 4, 2, 6, 3])
    for renormalize in (True, False):
        ids, weights = route_topk(logits, 6, renormalize, row_k=row_k)
        for r, k in enumerate(row_k.tolist()):
            probs = torch.softmax(logits[r].double(), -1)
            top = torch.topk(probs, k)
            want = top.values / top.values.sum() if renormalize else top.values
            assert ids[r, :k].tolist() == top.indices.tolist() and (ids[r, k:] == -1).all()
            assert torch.allclose(weights[r, :k].double(), want, atol=1e-6) and (weights[r, k:] == 0).all()


def test_slot_table_indirection() -> None:
    """Experts map to slots through the table: moving an expert to another slot (weights copied, entry
    rewritten) changes nothing."""
    x, w13, w2, slots, weights = case(4, 2, seed=9)
    ids = slots.long()
    before = fused_moe_ref(x, w13, w2, expert_slots(ids, None), weights)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    moved13, moved2 = torch.empty_like(w13), torch.empty_like(w2)
    moved13[perm], moved2[perm] = w13, w2  # expert e now lives in slot perm[e]
    after = fused_moe_ref(x, moved13, moved2, expert_slots(ids, perm.int()), weights)
    assert torch.equal(before, after)


def cached(experts: int, slots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random expert -> slot table: `slots` experts resident in a random order, the rest -1; and the
    slot -> expert map (the experts resident in each slot)."""
    g = torch.Generator().manual_seed(seed)
    resident = torch.randperm(experts, generator=g)[:slots]
    table = torch.full((experts,), -1, dtype=torch.int32)
    table[resident] = torch.arange(slots, dtype=torch.int32)
    return table.to(DEVICE), resident.to(DEVICE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("rows", "k", "slots"), [(1, 3, 2), (5, 2, 3), (9, 4, 0)])
def test_table_and_host_copy_equal_all_resident(path: str, rows: int, k: int, slots: int) -> None:
    """Ids mapped through a random table, experts not in it read from the host copy: bit-identical to the
    kernel on all experts resident, and `counts` holds each expert's routed pairs."""
    x, w13, w2, ids, weights = case(rows, k, seed=rows * 7 + k, slots=6)
    table, resident = cached(6, slots, seed=rows + k)
    dev13, dev2 = torch.zeros(max(slots, 1), *w13.shape[1:]), torch.zeros(max(slots, 1), *w2.shape[1:])
    dev13, dev2 = dev13.to(DEVICE), dev2.to(DEVICE)
    dev13[:slots], dev2[:slots] = w13[resident], w2[resident]
    counts = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    got = fused_moe(
        x, dev13, dev2, ids, weights, path=path, active_k=2, table=table, host=(w13, w2), counts=counts
    )
    want = fused_moe(x, w13, w2, ids, weights, path=path, active_k=2)
    assert torch.equal(got, want)
    assert (got - fused_moe_ref(x, w13, w2, ids, weights)).abs().max().item() < 2e-5
    flat = ids.reshape(-1)
    assert counts.tolist() == torch.bincount(flat[flat >= 0].long(), minlength=6).tolist()
    ref_counts = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    ref = fused_moe_ref(x, dev13, dev2, ids, weights, table=table, host=(w13, w2), counts=ref_counts)
    assert torch.equal(ref, fused_moe_ref(x, w13, w2, ids, weights))
    assert torch.equal(ref_counts, counts)


def test_table_checks() -> None:
    x, w13, w2, ids, weights = case(2, 2, seed=3)
    table = torch.arange(6, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="host weights need a table"):
        fused_moe(x, w13, w2, ids, weights, host=(w13, w2))
    with pytest.raises(ValueError, match="table must be"):
        fused_moe(x, w13, w2, ids, weights, table=table.long())
    with pytest.raises(ValueError, match="host copy"):
        fused_moe(x, w13[:2], w2[:2], ids, weights, table=table, host=(w13[:, :4], w2))
    with pytest.raises(ValueError, match="counts must be"):
        fused_moe(x, w13, w2, ids, weights, counts=torch.zeros(5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="no host copy"):
        fused_moe_ref(x, w13, w2, ids, weights, table=torch.full_like(table, -1))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(("rows", "experts", "k"), [(1, 8, 2), (5, 12, 3), (3, 128, 8)])
def test_fused_router_matches_reference(renormalize: bool, rows: int, experts: int, k: int) -> None:
    """Softmax, top-k and renormalisation in one kernel: the reference's ids (largest first) and weights on
    float32 logits; on bf16 logits, where equal logits are common and torch orders ties as it likes, the
    same top-k values, ties to the lower id, and each id's own (renormalised) probability."""
    g = torch.Generator().manual_seed(rows * experts + k)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(rows, experts, generator=g) * 3).to(DEVICE, dtype)
        ids, weights = fused_route(logits, k, renormalize)
        want_ids, want_w = route_topk(logits, k, renormalize)
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32
        if dtype == torch.float32:
            assert ids.tolist() == want_ids.tolist()
            assert (weights - want_w).abs().max().item() < 1e-6
            continue
        chosen = logits.float().gather(1, ids)
        assert torch.equal(chosen, logits.float().topk(k, dim=-1).values)
        same = chosen[:, 1:] == chosen[:, :-1]
        assert (ids[:, 1:][same] > ids[:, :-1][same]).all()
        probs = torch.softmax(logits.float(), -1).gather(1, ids)
        probs = probs / probs.sum(-1, keepdim=True) if renormalize else probs
        assert (weights - probs).abs().max().item() < 1e-6


def test_fused_router_ties_go_to_the_lower_expert() -> None:
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0, 0.0]], device=DEVICE)
    ids, weights = fused_route(logits, 4, True)
    assert ids.tolist() == [[1, 2, 4, 0]]
    assert abs(weights.sum().item() - 1.0) < 1e-6
    with pytest.raises(ValueError, match="top_k must be"):
        fused_route(logits, 7, True)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("hidden", "inter", "experts", "k"), [(4096, 14336, 8, 2), (2048, 768, 128, 8)])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_bf16_real_shapes(hidden: int, inter: int, experts: int, k: int, rows: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=g) / inter**0.5).bfloat16()
    ids, weights = route_topk(torch.randn(rows, experts, device="cuda", generator=g), k, True)
    slots = expert_slots(ids, None)
    want = fused_moe_ref(x, w13, w2, slots, weights).float()
    for path in PATHS:
        # NaN in the memory the kernel's buffers will get: an entry it fails to write shows
        poison = [torch.full((rows * k, n), float("nan"), device="cuda", dtype=t) for n, t in
                  ((hidden, torch.float32), (inter, torch.bfloat16), (hidden, torch.bfloat16))]  # fmt: skip
        del poison
        got = fused_moe(x, w13, w2, slots, weights, path=path).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, path


@pytest.mark.gpu
@gpu
def test_cuda_graph_replay() -> None:
    """Both paths capture (no host sync) and replay new routing in the same buffers."""
    x, w13, w2, slots, weights = (t.clone() for t in case(8, 2, seed=5))
    for path in PATHS:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fused_moe(x, w13, w2, slots, weights, path=path)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_moe(x, w13, w2, slots, weights, path=path)
        fresh = case(8, 2, seed=6)
        x.copy_(fresh[0])
        slots.copy_(fresh[3])
        weights.copy_(fresh[4])
        graph.replay()
        assert (out - fused_moe_ref(x, w13, w2, slots, weights)).abs().max().item() < 2e-5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", PATHS)
def test_pinned_host_copy_read_inside_a_graph(path: str) -> None:
    """bf16 at Qwen3-30B-A3B's expert shape: 3 of 16 experts in slots, the rest only in pinned host memory
    (registered as the expert cache registers it). Captured in a CUDA graph, replayed with fresh routing
    and a rewritten table: bit-identical to the kernel with every expert resident, counts exact."""
    from actserve.server.layers.expert_copier import pinned_empty

    hidden, inter, experts, k, rows = 2048, 768, 16, 8, 4 if path == "decode" else 40
    g = torch.Generator(device="cuda").manual_seed(11)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=g) / inter**0.5).bfloat16()
    h13 = pinned_empty(tuple(w13.shape), torch.bfloat16, pin=True)
    h2 = pinned_empty(tuple(w2.shape), torch.bfloat16, pin=True)
    h13.copy_(w13)
    h2.copy_(w2)
    assert h13.is_pinned() and not h13.is_cuda
    table = torch.full((experts,), -1, dtype=torch.int32, device="cuda")
    slots13, slots2 = torch.empty_like(w13[:3]), torch.empty_like(w2[:3])
    counts = torch.zeros(experts, dtype=torch.int32, device="cuda")
    x = torch.randn(rows, hidden, device="cuda", generator=g).bfloat16()
    ids, weights = route_topk(torch.randn(rows, experts, device="cuda", generator=g), k, True)

    def place(resident: list[int]) -> None:
        table.fill_(-1)
        for s, e in enumerate(resident):
            slots13[s].copy_(w13[e])
            slots2[s].copy_(w2[e])
            table[e] = s

    def run() -> torch.Tensor:
        return fused_moe(
            x,
            slots13,
            slots2,
            ids,
            weights,
            path=path,
            active_k=k,
            table=table,
            host=(h13, h2),
            counts=counts,
        )

    place([0, 1, 2])
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed, resident in ((1, [5, 9, 2]), (2, [15, 0, 7])):
        gg = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(rows, hidden, device="cuda", generator=gg).bfloat16())
        new_ids, new_w = route_topk(torch.randn(rows, experts, device="cuda", generator=gg), k, True)
        ids.copy_(new_ids)
        weights.copy_(new_w)
        place(resident)
        counts.zero_()
        graph.replay()
        want = fused_moe(x, w13, w2, ids, weights, path=path, active_k=k)
        assert torch.equal(out, want), (path, seed)
        assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=experts).tolist()


@pytest.mark.gpu
@gpu
def test_fused_router_in_a_graph() -> None:
    g = torch.Generator().manual_seed(3)

    def distinct() -> torch.Tensor:
        """bf16 logits without ties (k / 16 for distinct k is exact in bf16): torch.topk may order equal
        logits either way, the kernel takes the lower expert id first."""
        return (torch.stack([torch.randperm(128, generator=g) for _ in range(8)]) / 16 - 4).bfloat16().cuda()

    logits = distinct()
    fused_route(logits, 8, True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, weights = fused_route(logits, 8, True)
    logits.copy_(distinct())
    graph.replay()
    want_ids, want_w = route_topk(logits, 8, True)
    assert torch.equal(ids, want_ids) and (weights - want_w).abs().max().item() < 1e-6
