"""The KV-retrieval decode kernels (kernels/kv_retrieval.py) against their plain-torch references
(kernels/kv_retrieval_ref.py) on fresh random state, and the paged-decode kernel reading the per-row
lists of chosen blocks they build: Triton's interpreter on the CPU, natively on a GPU.
Each kernel gets rows of every method, a row of another request (slot -1) and, where it matters, an
offloaded row and a row whose budget covers its context."""

from __future__ import annotations

import pytest
import torch

from actserve.kernels import kv_retrieval as K
from actserve.kernels import kv_retrieval_ref as R
from actserve.kernels.paged_decode import paged_decode
from actserve.kernels.paged_decode_ref import paged_decode_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
HQ, HK, D, BS, T, SLOTS, IDS, LAYERS = 4, 2, 16, 4, 8, 5, 50, 3


def cfg_rows(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), 7), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i] = torch.tensor(r, dtype=torch.int32)
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


def test_pick() -> None:
    """ActQKV's layer budget (the blocks left carry from layer to layer) and the table each row reads,
    in one kernel from the top-k in any order, equal `budget_ref` then `tables_ref` from it sorted."""
    g = torch.Generator().manual_seed(4)
    cfg = cfg_rows(ROWS)
    tables, lens = tables_and_lens(g)
    qa, qb = (torch.randn(len(ROWS), HK, D, generator=g).to(DEVICE) for _ in range(2))
    st = state(torch.Generator().manual_seed(9))
    sc = R.scores_ref(qa, qb, cfg, tables, lens, st["rep"], st["kmin"], st["kmax"], BS)
    kk = 6
    val, idx = sc.topk(kk, dim=1)
    att_ids = torch.randint(0, IDS, (SLOTS + 1, 9), generator=g).to(DEVICE, torch.int32)
    att_n = torch.tensor([0, 0, 0, 0, 3, 0], dtype=torch.int32, device=DEVICE)  # slot 4: row 5's
    sides = []
    for _ in range(2):
        sides.append({
            "entropy": st["entropy"].clone(), "remaining": st["remaining"].clone(),
            "sel": torch.zeros(SLOTS + 1, 8, dtype=torch.int32, device=DEVICE),
            "sel_n": torch.zeros(SLOTS + 1, dtype=torch.int32, device=DEVICE),
            "cnt": torch.zeros(2, dtype=torch.int64, device=DEVICE),
        })  # fmt: skip
    a, b = sides
    for layer in range(LAYERS):
        k_sel = R.budget_ref(sc, cfg, lens, a["entropy"], a["remaining"], layer, 12, BS)
        o1 = tables.clone()
        l1 = R.tables_ref(o1, lens, cfg, idx, val, k_sel, att_ids, att_n, a["sel"], a["sel_n"], a["cnt"], BS)
        shuffled = torch.randperm(kk, generator=g).to(DEVICE)  # the kernel takes the top-k unordered
        o2, l2 = K.pick(
            sc, tables, lens, cfg, idx[:, shuffled], val[:, shuffled], b["entropy"], b["remaining"],
            att_ids, att_n, b["sel"], b["sel_n"], b["cnt"], layer, 12, BS, R.ENTROPY_RATE,
        )  # fmt: skip
        assert torch.equal(l2, l1), layer
        for r in range(len(ROWS)):
            used = -(-int(l1[r]) // BS)
            assert torch.equal(o2[r, :used], o1[r, :used]), (layer, r)
            n = int(a["sel_n"][r])
            assert torch.equal(b["sel"][r, :n], a["sel"][r, :n]), (layer, r)
        for key in ("entropy", "remaining"):
            assert close(b[key], a[key], 1e-5), (layer, key)
        assert torch.equal(b["sel_n"], a["sel_n"]) and torch.equal(b["cnt"], a["cnt"])
    assert int(l1[3]) == int(lens[3]) and torch.equal(o2[3], tables[3])  # another request's row
    assert torch.equal(o2[4], tables[4]) and int(l1[4]) == int(lens[4])  # covered: unchanged
    assert o1[5, 1:4].tolist() == att_ids[4, :3].tolist()  # offloaded: the staged ids after its sink
    assert int(a["cnt"][1]) == 4 * LAYERS  # rows 0, 1, 2 and 5 retrieve at every layer


@pytest.mark.parametrize("reps", [1, 2])
def test_summaries(reps: int) -> None:
    g = torch.Generator().manual_seed(6 + reps)
    cfg = cfg_rows(ROWS)
    st = state(g)
    k_cache = torch.randn(IDS * BS, HK, D, generator=g).to(DEVICE) * 2
    st["ring_q"] *= 2
    blocks = torch.tensor([11, -1, 13, 7, -1, 30], device=DEVICE)  # row 3: another request's
    a, b = clone(st), clone(st)
    scale = D**-0.5
    R.summaries_ref(cfg, blocks, k_cache, a["ring_q"], a["rep"], a["kmin"], a["kmax"], BS, scale, reps)
    K.summaries(cfg, blocks, k_cache, b["ring_q"], b["rep"], b["kmin"], b["kmax"], BS, scale, reps)
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
