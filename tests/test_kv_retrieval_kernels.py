"""The KV-retrieval decode kernels (kernels/kv_retrieval.py) against their plain-torch references
(kernels/kv_retrieval_ref.py) on fresh random state, and the paged-decode kernel reading the per-row
lists of chosen blocks they build: Triton's interpreter on the CPU, natively on a GPU.
Each kernel gets rows of every method, a row of another request (slot -1) and, where it matters, an
offloaded row and a row whose budget covers its context."""

from __future__ import annotations

import math

import pytest
import torch

from actserve.kernels import kv_retrieval as K
from actserve.kernels import kv_retrieval_ref as R
from actserve.kernels import kv_tier as TK
from actserve.kernels import kv_tier_ref as TR
from actserve.kernels.paged_decode import paged_decode
from actserve.kernels.paged_decode_ref import paged_decode_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
HQ, HK, D, BS, T, SLOTS, IDS, LAYERS = 4, 2, 16, 4, 8, 5, 50, 3


def cfg_rows(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), R.COLUMNS), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
    return out.to(DEVICE)


ROWS = [  # slot, method, k, sink, window, pos, offloaded
    [0, R.INFLLM, 3, 1, 2, 45, 0],
    [1, R.QUEST, 2, 2, 1, 50, 0],
    [2, R.ACTQKV, 3, 1, 1, 53, 0],
    [-1, -1, -1, -1, -1, -1, -1],
    [3, R.ACTQKV, 9, 1, 1, 20, 0],  # 4 candidates <= 9: the budget covers the context
    [4, R.INFLLM, 2, 1, 1, 39, 1],  # offloaded: reads the staged ids
]


def state(g: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE)

    return {
        "ring_q": rnd(SLOTS + 1, T, HQ, D),
        "ring_pos": torch.randint(0, 60, (SLOTS + 1, T), generator=g).to(DEVICE),
        "ring_bias": torch.rand(SLOTS + 1, T, generator=g).to(DEVICE),
        "mean": rnd(SLOTS + 1, HQ * D) * 0.3,
        "var": torch.rand(SLOTS + 1, HQ * D, generator=g).to(DEVICE) + 0.2,
        "count": torch.tensor([0.0, 5.0, 1024.0, 3.0, 7.0, 0.0]).to(DEVICE),
        "rep": rnd(IDS, HK, D),
        "kmin": rnd(IDS, HK, D) - 1,
        "kmax": rnd(IDS, HK, D) + 1,
        "entropy": torch.rand(SLOTS + 1, LAYERS, generator=g).to(DEVICE) + 0.1,
        "remaining": torch.rand(SLOTS + 1, generator=g).to(DEVICE) * 10,
    }


def clone(st: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in st.items()}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    return bool(torch.equal(fa, fb)) and bool(((a[fa] - b[fb]).abs() <= tol * (1 + b[fb].abs())).all())


def test_append() -> None:
    g = torch.Generator().manual_seed(1)
    rows = [
        r[:5] + [p] + r[6:] for r, p in zip(ROWS, [45, 0, 53, -1, 20, 39], strict=True)
    ]  # slot 1 restarts
    cfg = cfg_rows(rows)
    q = torch.randn(len(rows), HQ, D, generator=g).to(DEVICE)
    a, b = state(g), None
    b = clone(a)
    keys = ("ring_q", "ring_pos", "ring_bias", "mean", "var", "count")
    R.append_ref(q, cfg, *(a[k] for k in keys), cap=1024.0)
    K.append(q, cfg, *(b[k] for k in keys), cap=1024.0)
    for k in keys:
        assert close(b[k].float(), a[k].float(), 1e-5), k
    assert float(a["count"][2]) == 1024.0 and float(a["count"][1]) == 1.0  # capped; restarted


def test_query_vectors() -> None:
    g = torch.Generator().manual_seed(2)
    cfg = cfg_rows(ROWS)
    st = state(g)
    st["ring_pos"][2] = torch.tensor([53, 52, 40, 51, 60, 49, 46, 47])  # some outside (pos - T, pos]
    q = torch.randn(len(ROWS), HQ, D, generator=g).to(DEVICE)
    want = R.query_vectors_ref(q, cfg, st["ring_q"], st["ring_pos"], st["ring_bias"], HK)
    got = K.query_vectors(q, cfg, st["ring_q"], st["ring_pos"], st["ring_bias"], HK)
    for w, x in zip(want, got, strict=True):
        assert close(x, w)


def tables_and_lens(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = 16
    tables = torch.stack([torch.randperm(IDS, generator=g)[:w] for _ in ROWS]).to(torch.int32)
    lens = torch.tensor([r[5] + 1 if r[0] >= 0 else 30 for r in ROWS], dtype=torch.int32)
    return tables.to(DEVICE), lens.to(DEVICE)


@pytest.mark.parametrize("kinds", ["both", "rep", "minmax"])
def test_scores(kinds: str) -> None:
    g = torch.Generator().manual_seed(3)
    cfg = cfg_rows(ROWS)
    st = state(g)
    tables, lens = tables_and_lens(g)
    a = torch.randn(len(ROWS), HK, D, generator=g).to(DEVICE)
    b = torch.randn(len(ROWS), HK, D, generator=g).to(DEVICE)
    rep = st["rep"] if kinds != "minmax" else None
    lo, hi = (st["kmin"], st["kmax"]) if kinds != "rep" else (None, None)
    want = R.scores_ref(a, b, cfg, tables, lens, rep, lo, hi, BS)
    got = K.scores(a, b, cfg, tables, lens, rep, lo, hi, BS, block_w=8)
    assert close(got, want)
    assert torch.isfinite(want).any() and not torch.isfinite(want[3]).any()


def choose_loop(scores: torch.Tensor, k_sel: list[int]) -> list[list[int]]:
    """Per row: the columns of its k_sel best finite scores, equal scores in column order (a stable
    sort in plain Python)."""
    out = []
    for row, k in zip(scores.tolist(), k_sel, strict=True):
        cols = [c for c in range(len(row)) if math.isfinite(row[c])]
        out.append(sorted(sorted(cols, key=lambda c: -row[c])[:k]))
    return out


def test_choose_ref_takes_the_best_with_ties_in_column_order() -> None:
    g = torch.Generator().manual_seed(12)
    sc = torch.randint(-3, 4, (5, 40), generator=g).float()  # many ties
    sc[0, :5] = float("-inf")
    sc[1, 3] = float("nan")
    sc[2] = torch.where(sc[2] == 0, torch.tensor(-0.0), sc[2])
    k_sel = torch.tensor([0, 7, 12, 40, 3])
    got = R.choose_ref(sc, k_sel)
    want = choose_loop(sc, k_sel.tolist())
    assert [got[r].nonzero().flatten().tolist() for r in range(5)] == want


@pytest.mark.parametrize(("chunk", "split"), [(2048, 0), (4, 0), (2048, 4)])
@pytest.mark.parametrize("tie_scores", [False, True])
def test_select(tie_scores: bool, chunk: int, split: int) -> None:
    """ActQKV's layer budget (the blocks left carry from layer to layer), the choice (the k-th best
    score, found 2 bits a round, ties in column order) and the table each row reads, in one kernel,
    equal `budget_ref`, `choose_ref` and `tables_ref`; with a host tier the offloaded row's chosen host
    blocks map to its slot's reserved blocks as `stage_ref` maps them, over layers (blocks held from a
    previous layer's step are not copied again)."""
    g = torch.Generator().manual_seed(4 + tie_scores)
    cfg = cfg_rows(ROWS)
    tables, lens = tables_and_lens(g)
    # host ids [40, 50) (the state's summaries cover every id), reserved blocks from 100 (in a server they
    # sit below the host ids; the kernel does not mind)
    host_base, res_base, width = 40, 100, 12
    h = [host_base + i for i in range(9)]
    tables[5] = torch.tensor([3, h[0], h[1], 7, h[2], h[3], h[4], 8, h[5], 9, h[6], h[7], h[8], 5, 6, 2])
    st = state(torch.Generator().manual_seed(9))
    held0 = torch.full((SLOTS + 1, width), -1, dtype=torch.int32, device=DEVICE)
    held0[4, 2], held0[4, 5] = h[3], h[4]  # slot 4 (row 5) holds two host blocks already
    sides = []
    for _ in range(2):
        sides.append({
            "entropy": st["entropy"].clone(), "remaining": st["remaining"].clone(),
            "cnt": torch.zeros(3, dtype=torch.int64, device=DEVICE), "held": held0.clone(),
        })  # fmt: skip
    a, b = sides
    for layer in range(LAYERS):
        qa, qb = (torch.randn(len(ROWS), HK, D, generator=g).to(DEVICE) for _ in range(2))
        sc = R.scores_ref(qa, qb, cfg, tables, lens, st["rep"], st["kmin"], st["kmax"], BS)
        if tie_scores:  # integer scores: many ties, and zeros of both signs
            sc = torch.where(torch.isfinite(sc), sc.round().clamp(-2, 2), sc)
            sc = torch.where(
                sc == 0, torch.where(torch.rand(sc.shape, generator=g).to(sc.device) < 0.5, -0.0, 0.0), sc
            )
        k_sel = R.budget_ref(sc, cfg, lens, a["entropy"], a["remaining"], layer, width, BS)
        chosen = R.choose_ref(sc, k_sel)
        o1, l1 = R.tables_ref(tables, lens, cfg, chosen, a["cnt"], BS)
        c1 = R.stage_ref(o1, lens, cfg, chosen.sum(1), a["held"], res_base, host_base, a["cnt"], BS)
        o2, l2, c2 = K.select(
            sc, tables, lens, cfg, b["entropy"], b["remaining"], b["cnt"], layer, width, BS, R.ENTROPY_RATE,
            (b["held"], res_base, host_base), chunk=chunk, split=split,
        )  # fmt: skip
        assert c2 is not None
        assert torch.equal(l2, l1), layer
        for r in range(len(ROWS)):
            used = -(-int(l1[r]) // BS)
            assert torch.equal(o2[r, :used], o1[r, :used]), (layer, r)
        for key in ("entropy", "remaining"):
            assert close(b[key], a[key], 1e-5), (layer, key)
        assert torch.equal(b["cnt"], a["cnt"]) and torch.equal(b["held"], a["held"]), layer
        assert torch.equal(c2[2], c1[2]), layer
        for r in range(len(ROWS)):
            n = int(c1[2][r])
            assert torch.equal(c2[0][r, :n], c1[0][r, :n]) and torch.equal(c2[1][r, :n], c1[1][r, :n])
        # the offloaded row reads no host id, and a chosen host block sits in one of its slot's blocks
        used = -(-int(l1[5]) // BS)
        mid = o1[5, :used]
        assert ((mid < host_base) | ((mid >= res_base + 4 * width) & (mid < res_base + 5 * width))).all()
    assert int(l1[3]) == int(lens[3]) and torch.equal(o2[3], tables[3])  # another request's row
    assert torch.equal(o2[4], tables[4]) and int(l1[4]) == int(lens[4])  # covered: unchanged
    assert int(a["cnt"][1]) == 4 * LAYERS  # rows 0, 1, 2 and 5 retrieve at every layer
    assert 0 < int(a["cnt"][2]) < int(a["cnt"][0])  # host blocks were recalled, not all of them


def test_select_without_tier() -> None:
    """The same kernel without a host tier (no staging arguments): the tables of `tables_ref`."""
    g = torch.Generator().manual_seed(14)
    rows = [r[:6] + [0] for r in ROWS]
    cfg = cfg_rows(rows)
    tables, lens = tables_and_lens(g)
    st = state(torch.Generator().manual_seed(3))
    qa, qb = (torch.randn(len(rows), HK, D, generator=g).to(DEVICE) for _ in range(2))
    sc = R.scores_ref(qa, qb, cfg, tables, lens, st["rep"], st["kmin"], st["kmax"], BS)
    ent, rem = st["entropy"].clone(), st["remaining"].clone()
    cnt = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    chosen = R.choose_ref(sc, R.budget_ref(sc, cfg, lens, ent, rem, 1, 12, BS))
    o1, l1 = R.tables_ref(tables, lens, cfg, chosen, cnt, BS)
    cnt2 = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    o2, l2, copies = K.select(
        sc, tables, lens, cfg, st["entropy"], st["remaining"], cnt2, 1, 12, BS, R.ENTROPY_RATE
    )
    assert copies is None and torch.equal(l1, l2) and torch.equal(cnt, cnt2)
    for r in range(len(rows)):
        used = -(-int(l1[r]) // BS)
        assert torch.equal(o2[r, :used], o1[r, :used]), r


@pytest.mark.parametrize(("chunk", "split"), [(2048, 0), (128, 0), (2048, 128), (2048, 1024)])
@pytest.mark.parametrize("kind", ["spread", "equal"])
def test_select_wide_rows(kind: str, chunk: int, split: int) -> None:
    """Rows of 700 columns (several hundred candidates, a 1024-wide register tile): scores of mixed signs
    and magnitudes, or all equal (the choice is then the first columns); the chosen blocks equal
    `choose_ref`'s."""
    g = torch.Generator().manual_seed(16)
    w, bs = 700, 16
    rows = [
        [0, R.INFLLM, 60, 2, 3, 11000, 0],
        [1, R.QUEST, 17, 0, 1, 9000, 0],
        [2, R.INFLLM, 90, 4, 4, 7000, 0],
    ]
    cfg = cfg_rows(rows)
    lens = torch.tensor([r[5] + 1 for r in rows], dtype=torch.int32, device=DEVICE)
    tables = torch.stack([torch.randperm(5000, generator=g)[:w] for _ in rows]).to(DEVICE, torch.int32)
    sc = torch.randn(len(rows), w, generator=g) * torch.exp(torch.randn(len(rows), w, generator=g) * 3)
    if kind == "equal":
        sc = torch.full_like(sc, 0.25)
    _, sink, ws, _ = R.geometry(cfg.cpu(), lens.cpu(), bs)
    col = torch.arange(w)
    sc = torch.where((col >= sink[:, None]) & (col < ws[:, None]), sc, float("-inf")).to(DEVICE)
    cnt = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    ent = torch.ones(SLOTS + 1, LAYERS, device=DEVICE)
    rem = torch.zeros(SLOTS + 1, device=DEVICE)
    k_sel = R.budget_ref(sc, cfg, lens, ent.clone(), rem.clone(), 0, 200, bs)
    o1, l1 = R.tables_ref(tables, lens, cfg, R.choose_ref(sc, k_sel), cnt.clone(), bs)
    o2, l2, _ = K.select(
        sc, tables, lens, cfg, ent, rem, cnt, 0, 200, bs, R.ENTROPY_RATE, chunk=chunk, split=split
    )
    assert torch.equal(l1, l2)
    for r in range(len(rows)):
        used = -(-int(l1[r]) // bs)
        assert torch.equal(o2[r, :used], o1[r, :used]), r
    if kind == "equal":  # the first k candidates after the sink
        assert o1[0, 2:62].tolist() == tables[0, 2:62].tolist()


@pytest.mark.parametrize("programs", [2, 1, None])
def test_recall_blocks_copies_bit_exact(programs: int | None) -> None:
    """The host tier's recall kernel copies each listed host block's K and V into the listed GPU block of
    the layer and nothing else, as its reference does; it counts the blocks. Programs a row: fewer than a
    row's blocks (one loops over them), or the default share of RECALL_PROGRAMS (more than its blocks)."""
    g = torch.Generator().manual_seed(15)
    store = torch.randn(9, 2, BS, HK, D, generator=g)
    kv = torch.randn(2, 20, BS, HK, D, generator=g).to(DEVICE)
    src = torch.tensor([[103, 100, 0], [108, 0, 0], [0, 0, 0]], dtype=torch.int32, device=DEVICE)
    dst = torch.tensor([[4, 17, 0], [9, 0, 0], [0, 0, 0]], dtype=torch.int32, device=DEVICE)
    count = torch.tensor([2, 1, 0], dtype=torch.int32, device=DEVICE)
    want, got = kv.clone(), kv.clone()
    c1 = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    c2 = c1.clone()
    TR.recall_blocks_ref(store, want, src, dst, count, 100, c1)
    TK.recall_blocks(store.to(DEVICE), got, src, dst, count, 100, c2, programs=programs)
    assert torch.equal(got, want) and int(c2) == int(c1) == 3
    assert torch.equal(want[:, 4], store[3].to(DEVICE)) and torch.equal(want[:, 17], store[0].to(DEVICE))
    assert torch.equal(want[:, 9], store[8].to(DEVICE))
    untouched = [i for i in range(20) if i not in (4, 17, 9)]
    assert torch.equal(want[:, untouched], kv[:, untouched])


@pytest.mark.parametrize("reps", [1, 2])
def test_summaries(reps: int) -> None:
    g = torch.Generator().manual_seed(6 + reps)
    cfg = cfg_rows(ROWS)
    st = state(g)
    k_cache = torch.randn(IDS * BS, HK, D, generator=g).to(DEVICE) * 2
    st["ring_q"] *= 2
    # (block, row) pairs in any order: row 3 is another request's, -1 marks no block
    blocks = torch.tensor([30, 11, -1, 13, 7, -1], device=DEVICE)
    rows = torch.tensor([5, 0, 1, 2, 3, -1], device=DEVICE)
    a, b = clone(st), clone(st)
    scale = D**-0.5
    args = (BS, scale, reps)
    R.summaries_ref(cfg, blocks, rows, k_cache, a["ring_q"], a["rep"], a["kmin"], a["kmax"], *args)
    K.summaries(cfg, blocks, rows, k_cache, b["ring_q"], b["rep"], b["kmin"], b["kmax"], *args)
    for k in ("rep", "kmin", "kmax"):
        assert close(b[k], a[k], 1e-5), k
    assert torch.equal(a["rep"][7], st["rep"][7]) and not torch.equal(a["rep"][11], st["rep"][11])


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_reads_selected_block_lists(dtype: torch.dtype) -> None:
    """A row's table may be any ordered list of blocks (sink, chosen, window: not its logical blocks) with
    its length counting their tokens; entries past the length are never read (a retrieving row's table
    keeps stale or host-tier ids there)."""
    g = torch.Generator().manual_seed(11)
    batch, hk, group, dim, bs, nblocks = 3, 2, 3, 16, 4, 30
    k_cache = torch.randn(nblocks * bs, hk, dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(nblocks * bs, hk, dim, generator=g).to(DEVICE, dtype)
    q = torch.randn(batch, hk * group, dim, generator=g).to(DEVICE, dtype)
    width = 20
    tables = torch.full((batch, width), 10**7, dtype=torch.int32)  # ids far outside the cache
    lists = [[0, 17, 4, 9, 28, 12], [3, 21], [5, 6, 7, 8, 25, 26, 27, 29]]
    lens = []
    for r, blocks in enumerate(lists):
        tables[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        lens.append((len(blocks) - 1) * bs + 1 + r)  # the last listed block partly filled
    tables, lens_t = tables.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want = paged_decode_ref(q, k_cache, v_cache, tables, lens_t, 0.3, bs)
    got = paged_decode(q, k_cache, v_cache, tables, lens_t, 0.3, bs, tile=16)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float()).abs().max().item() < tol


@pytest.mark.parametrize(("chunk", "split"), [(2048, 0), (64, 0), (2048, 64)])
@pytest.mark.parametrize("kind", ["low_bits", "signs", "ties"])
def test_select_kth_edges(kind: str, chunk: int, split: int) -> None:
    """The k-th search (`_kth_largest`, 2 bits a round) on keys that the top bits do not separate:
    scores that differ only in their low mantissa bits (one float's neighbours), of both signs with
    zeros of both signs, subnormals and floats near the lowest (whose keys sit just above
    the no-key marker INT_MIN), or a few repeated values (ties split at the k-th); k from 1 to
    every finite candidate. The chosen blocks equal
    `choose_ref`'s (ties in column order)."""
    g = torch.Generator().manual_seed(21 + len(kind))
    w, bs, n = 300, 16, 8
    ks = [1, 2, 7, 50, 150, 290, 295, 400]  # 296 candidates per row (sink 2, window 2); the last covered
    rows = [[i, R.INFLLM, k, 2, 2, w * bs - 1, 0] for i, k in enumerate(ks)]
    cfg = cfg_rows(rows)
    lens = torch.full((n,), w * bs, dtype=torch.int32, device=DEVICE)
    tables = torch.stack([torch.randperm(5000, generator=g)[:w] for _ in rows]).to(DEVICE, torch.int32)
    if kind == "low_bits":  # 1.5 and its next few hundred floats up, and negative ones likewise
        ulp = torch.randint(0, 600, (n, w), generator=g, dtype=torch.int32)
        base = torch.tensor(1.5).view(torch.int32) + ulp
        sc = base.view(torch.float32) * torch.where(torch.rand(n, w, generator=g) < 0.3, -1.0, 1.0)
    elif kind == "signs":
        sc = torch.randn(n, w, generator=g) * torch.exp(torch.randn(n, w, generator=g) * 20)
        pick = torch.rand(n, w, generator=g)
        sc = torch.where(pick < 0.1, torch.tensor(-0.0), torch.where(pick < 0.2, torch.tensor(0.0), sc))
        sc = torch.where((pick > 0.2) & (pick < 0.3), torch.tensor(1e-40) * torch.sign(sc), sc)
        sc = torch.where((pick > 0.3) & (pick < 0.36), -3.3e38 + pick * 1e36, sc)
    else:
        sc = torch.randint(-2, 3, (n, w), generator=g).float() * 0.75
    col = torch.arange(w)
    sc = torch.where((col >= 2) & (col < w - 2), sc, float("-inf"))
    sc[6, 10:20] = float("-inf")  # 286 finite candidates: row 6 takes every one
    sc = sc.to(DEVICE)
    ent = torch.ones(n, LAYERS, device=DEVICE)
    rem = torch.zeros(n, device=DEVICE)
    cnt = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    chosen = R.choose_ref(sc, R.budget_ref(sc, cfg, lens, ent.clone(), rem.clone(), 0, 400, bs))
    o1, l1 = R.tables_ref(tables, lens, cfg, chosen, cnt.clone(), bs)
    o2, l2, _ = K.select(
        sc, tables, lens, cfg, ent, rem, cnt, 0, 400, bs, R.ENTROPY_RATE, chunk=chunk, split=split
    )
    assert torch.equal(l1, l2)
    for r in range(n):
        used = -(-int(l1[r]) // bs)
        assert torch.equal(o2[r, :used], o1[r, :used]), (kind, r)
    assert chosen.sum(1).tolist()[:7] == ks[:6] + [286]
