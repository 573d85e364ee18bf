"""kv_retrieval's hook against plain-torch references written from the methods' definitions, one row at
a time in float64, on fresh random inputs (docs/architecture.md §10, "KV retrieval"): each method's block
choice and the table it builds (decode path, and the packed path's decode rows), ActQKV's probe and
per-layer budget across layers, the block summaries written when blocks fill, and the running
statistics and activation biases of the queries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actserve.interventions.base import ModelInfo
from actserve.interventions.kv_retrieval.hook import COLUMNS, INPUT, STAT_CAP, RetrievalHook
from actserve.interventions.kv_retrieval.staging import Staging
from actserve.interventions.kv_retrieval.state import RetrievalState
from actserve.kernels import kv_retrieval_ref as R

LAYERS, HQ, HK, D, BS, RING, WIDTH, IDS, SLOTS = 2, 4, 2, 8, 4, 8, 12, 60, 4
INFO = ModelInfo(
    "m", "/m", "LlamaForCausalLM", "native", LAYERS, HQ * D, 32, 256, torch.float32, torch.device("cpu"),
    block_size=BS, num_heads=HQ, num_kv_heads=HK, head_dim=D,
)  # fmt: skip


def random_state(g: torch.Generator) -> RetrievalState:
    st = RetrievalState(INFO, SLOTS, RING, WIDTH, IDS, quest=True, reps=True)
    assert st.rep is not None and st.kmin is not None and st.kmax is not None
    st.rep.copy_(torch.randn(st.rep.shape, generator=g))
    a, b = torch.randn(st.kmin.shape, generator=g), torch.randn(st.kmin.shape, generator=g)
    st.kmin.copy_(torch.minimum(a, b))
    st.kmax.copy_(torch.maximum(a, b))
    st.ring_q.copy_(torch.randn(st.ring_q.shape, generator=g))
    st.ring_bias.copy_(torch.rand(st.ring_bias.shape, generator=g) + 0.1)
    st.mean.copy_(torch.randn(st.mean.shape, generator=g) * 0.3)
    st.var.copy_(torch.rand(st.var.shape, generator=g) + 0.2)
    st.count.fill_(10)
    st.entropy.copy_(torch.rand(st.entropy.shape, generator=g) * 0.8 + 0.1)
    return st


def hook(st: RetrievalState, decode: bool = True) -> RetrievalHook:
    return RetrievalHook(st, LAYERS, HK, BS, D**-0.5, 2, decode)


def rows_input(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    cfg = torch.full((len(rows), COLUMNS), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        if r[0] >= 0:
            cfg[i] = torch.tensor(r, dtype=torch.int32)
    return {INPUT: cfg}


# -- references, one row at a time, float64 ------------------------------------------------------------
def ref_scores(method: int, a: torch.Tensor, ids: list[int], st: RetrievalState, layer: int) -> list[float]:
    """InfLLM / ActQKV: sum_h a_h . rep[g(h)]; Quest: sum_h sum_d max(q_hd min_d, q_hd max_d) (a = q)."""
    g = HQ // HK
    out = []
    for b in ids:
        s = 0.0
        for h in range(HQ):
            if method == R.QUEST:
                lo, hi = st.kmin[layer, b, h // g].double(), st.kmax[layer, b, h // g].double()  # type: ignore[index]
                s += float(torch.maximum(a[h] * lo, a[h] * hi).sum())
            else:
                s += float(a[h] @ st.rep[layer, b, h // g].double())  # type: ignore[index]
        out.append(s)
    return out


def ref_probe(st: RetrievalState, layer: int, slot: int, pos: int, q: torch.Tensor) -> torch.Tensor:
    """q + the activation-bias-weighted mean of the ring's queries of the last RING positions (the
    current one included: the hook appended it before selecting)."""
    keep = [i for i in range(RING) if pos - RING < int(st.ring_pos[layer, slot, i]) <= pos]
    w = torch.tensor([float(st.ring_bias[layer, slot, i]) for i in keep], dtype=torch.float64)
    xs = torch.stack([st.ring_q[layer, slot, i].double() for i in keep])
    return q.double() + torch.einsum("t,thd->hd", w / w.sum(), xs)


def ref_select(
    st: RetrievalState, layer: int, q: torch.Tensor, table: list[int], length: int, row: list[int],
    remaining: float, entropy: torch.Tensor,
) -> tuple[list[int], int, float]:  # fmt: skip
    """(the row's new table prefix, its length, the blocks left for the next layers)."""
    slot, method, k, sink, window, pos, _ = row
    if slot < 0:
        return table, length, remaining
    n = -(-length // BS)
    ws = max(n - window, sink)
    cands = list(range(sink, ws))
    a = ref_probe(st, layer, slot, pos, q) if method == R.ACTQKV else q.double()
    scores = ref_scores(method, a, [table[c] for c in cands], st, layer)
    k_sel = k
    if method == R.ACTQKV:
        if len(cands) >= 2:
            p = torch.tensor(scores, dtype=torch.float64).softmax(0)
            h = float(-(p * p.log()).sum()) / math.log(len(cands))
            entropy[layer] = 0.9 * entropy[layer] + 0.1 * h
        if layer == 0:
            remaining = float(k * LAYERS)
        share = float(entropy[layer] / entropy[layer:].sum())
        k_sel = int(min(max(math.floor(share * remaining + 0.5), max(1, k // 2)), min(2 * k, WIDTH)))
        remaining -= k_sel
    if len(cands) <= k:
        return table, length, remaining
    best = sorted(range(len(cands)), key=lambda i: -scores[i])[: min(k_sel, len(cands))]
    chosen = sorted(cands[i] for i in best)
    new = table[:sink] + [table[c] for c in chosen] + table[ws:n]
    return new, (sink + len(chosen)) * BS + length - ws * BS, remaining


ROWS = [  # slot, method, retrieve, sink, window, pos, offload
    [0, R.INFLLM, 3, 1, 2, 45, 0],
    [1, R.QUEST, 2, 2, 1, 50, 0],
    [2, R.ACTQKV, 3, 1, 1, 53, 0],
    [-1] * COLUMNS,
    [3, R.INFLLM, 9, 1, 1, 20, 0],  # 6 blocks of 21 tokens: 4 candidates <= 9, nothing changes
]


def setup_rows(
    g: torch.Generator,
) -> tuple[RetrievalState, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    st = random_state(g)
    for i in range(SLOTS):  # ring positions: some in the row's window, some stale (future or too old)
        p = ROWS[i][5] if i < 3 else ROWS[4][5]
        st.ring_pos[:, i] = torch.tensor([p - 1 - j if j % 3 else p + 5 for j in range(RING)])
    tables = torch.stack([torch.randperm(IDS, generator=g)[:14] for _ in ROWS]).to(torch.int32)
    lens = torch.tensor([r[5] + 1 if r[0] >= 0 else 30 for r in ROWS], dtype=torch.int32)
    return st, tables, lens, rows_input(ROWS)


def test_decode_selection_equals_each_methods_reference() -> None:
    """Rows of each method (slots 0..2), a row of another request and a row whose budget covers its
    context, over two layers (ActQKV's budget carries from layer 0 to layer 1)."""
    g = torch.Generator().manual_seed(3)
    st, tables, lens, inputs = setup_rows(g)
    hk = hook(st)
    ent = st.entropy.clone().double()
    remaining = [0.0] * len(ROWS)
    pos = torch.tensor([r[5] if r[0] >= 0 else 7 for r in ROWS])
    for layer in range(LAYERS):
        q = torch.randn(len(ROWS), HQ, D, generator=g)
        hk.queries(layer, q, pos, inputs)
        new_t, new_l = hk.select(layer, q, tables.clone(), lens.clone(), inputs)
        for i, row in enumerate(ROWS):
            want_t, want_l, remaining[i] = ref_select(
                st, layer, q[i], tables[i].tolist(), int(lens[i]), row, remaining[i],
                ent[row[0]] if row[0] >= 0 else ent[-1].clone(),
            )  # fmt: skip
            assert int(new_l[i]) == want_l, (layer, i)
            n_tok = -(-want_l // BS)
            assert new_t[i, :n_tok].tolist() == want_t[:n_tok], (layer, i)
            if row[0] < 0 or i == 4:  # another request's row, and a covered context: unchanged
                assert torch.equal(new_t[i], tables[i]) and int(new_l[i]) == int(lens[i])
        assert int(new_l[2]) < int(lens[2])  # retrieval acted on the ActQKV row
    assert torch.allclose(st.entropy[2].double(), ent[2], atol=1e-6)
    # 3 retrieving rows x 2 layers; InfLLM takes 3 blocks, Quest 2, ActQKV its layer's share
    assert st.counters.tolist() == [2 * (3 + 2) + int(st.sel_n[0, 2]) + int(st.sel_n[1, 2]), 6]


def test_packed_step_selects_as_the_decode_path() -> None:
    """Decode rows beside prompt rows in one packed (CPU) step choose what they would in a decode step:
    their queries go through the packed path's statistics and rings."""
    outs = []
    for decode in (True, False):
        g = torch.Generator().manual_seed(4)
        st, tables, lens, inputs = setup_rows(g)
        hk = hook(st, decode)
        pos = torch.tensor([r[5] if r[0] >= 0 else 7 for r in ROWS])
        res = []
        for layer in range(LAYERS):
            q = torch.randn(len(ROWS), HQ, D, generator=g)
            hk.queries(layer, q, pos, inputs)
            res.append(hk.select(layer, q, tables.clone(), lens.clone(), inputs))
            hk._stash.pop(layer, None)
        outs.append((res, st.mean.clone(), st.var.clone()))
    (a, mean_a, var_a), (b, mean_b, var_b) = outs
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        assert torch.equal(la, lb) and torch.equal(ta, tb)
    assert torch.allclose(mean_a, mean_b, atol=1e-5) and torch.allclose(var_a, var_b, atol=1e-5)


def test_offloaded_rows_read_the_staged_blocks() -> None:
    """With a host tier a row reads sink + the ids the host staged for this layer + window, while the
    layer's fresh choice is recorded (as columns) for the next step."""
    g = torch.Generator().manual_seed(4)
    st = random_state(g)
    rows = [[1, R.INFLLM, 2, 1, 1, 40, 1]]
    tables = torch.randperm(IDS, generator=g)[:12].to(torch.int32).unsqueeze(0)
    lens = torch.tensor([41], dtype=torch.int32)
    st.att_ids[0, 1, :3] = torch.tensor([55, 56, 57], dtype=torch.int32)
    st.att_n[0, 1] = 3
    hk = hook(st)
    q = torch.randn(1, HQ, D, generator=g)
    hk.queries(0, q, torch.tensor([40]), rows_input(rows))
    new_t, new_l = hk.select(0, q, tables, lens, rows_input(rows))
    n = 11
    assert new_t[0, :5].tolist() == [int(tables[0, 0]), 55, 56, 57, int(tables[0, n - 1])]
    assert int(new_l[0]) == (1 + 3) * BS + 41 - (n - 1) * BS
    assert int(st.sel_n[0, 1]) == 2 and all(1 <= c < n - 1 for c in st.sel_cols[0, 1, :2].tolist())


def ref_representative(qb: torch.Tensor, kb: torch.Tensor, count: int) -> torch.Tensor:
    """InfLLM's rule for one block: attention within the block, received per key, top `count` keys'
    mean, per KV head (query heads of a KV head summed)."""
    g, bs = HQ // HK, qb.shape[0]
    out = torch.zeros(HK, D, dtype=torch.float64)
    for kvh in range(HK):
        recv = torch.zeros(bs, dtype=torch.float64)
        for h in range(kvh * g, (kvh + 1) * g):
            for j in range(bs):
                logits = torch.stack([qb[j, h].double() @ kb[m, kvh].double() for m in range(bs)]) * D**-0.5
                recv += logits.softmax(0)
        top = sorted(range(bs), key=lambda m: -float(recv[m]))[:count]
        out[kvh] = torch.stack([kb[m, kvh].double() for m in top]).mean(0)
    return out


def test_representatives_equal_infllms_rule() -> None:
    """Blocks of 16 tokens, 1 and 3 representatives, on random queries and keys (scaled so that
    attention is peaked: the choice depends on every query head's share)."""
    g = torch.Generator().manual_seed(8)
    qb = torch.randn(6, 16, HQ, D, generator=g) * 2
    kb = torch.randn(6, 16, HK, D, generator=g) * 2
    for count in (1, 3):
        got = R.representatives_ref(qb, kb, D**-0.5, count)
        for i in range(qb.shape[0]):
            assert torch.allclose(got[i].double(), ref_representative(qb[i], kb[i], count), atol=1e-5)


def test_block_summaries_when_blocks_fill() -> None:
    """A packed step: slot 0's chunk fills a block whose first tokens came in an earlier step (queries
    from the ring) and a block wholly inside the chunk; a row of another request fills one too (its
    block's summaries are not written). InfLLM's representative and Quest's min/max equal the
    references; the ring then holds the chunk's last RING queries."""
    g = torch.Generator().manual_seed(5)
    st = random_state(g)
    rep0, lo0 = st.rep.clone(), st.kmin.clone()  # type: ignore[union-attr]
    kv = torch.randn(2, IDS * BS, HK, D, generator=g)
    # slot 0 computed positions 0..9 earlier (ring holds 2..9); this step: positions 10..17 (rows 0..7),
    # then a row of another request (row 8)
    layer = 1
    earlier = torch.randn(RING, HQ, D, generator=g)
    for i, p in enumerate(range(2, 10)):
        st.ring_q[layer, 0, p % RING] = earlier[i]
        st.ring_pos[layer, 0, p % RING] = p
    q = torch.randn(9, HQ, D, generator=g)
    pos = torch.tensor([*range(10, 18), 3])
    rows = [[0, R.INFLLM, 2, 1, 1, int(p), 0] for p in pos[:8]] + [[-1] * COLUMNS]
    inputs = rows_input(rows)
    hk = hook(st, decode=False)
    hk.queries(layer, q, pos, inputs)
    blocks = torch.tensor([21, 33, 7])  # positions 8..11 (rows 0,1 + ring 8,9), 12..15 (rows 2..5), other
    filled_rows = torch.tensor([1, 5, 8])
    hk.filled(layer, kv, blocks, filled_rows, inputs)
    ring_of = {p: earlier[i] for i, p in enumerate(range(2, 10))}
    block_q = {21: [ring_of[8], ring_of[9], q[0], q[1]], 33: [q[2], q[3], q[4], q[5]]}
    for b, qs in block_q.items():
        kb = kv[0, b * BS : (b + 1) * BS]
        want = ref_representative(torch.stack(qs), kb, 2)
        assert torch.allclose(st.rep[layer, b].double(), want, atol=1e-5), b  # type: ignore[index]
        assert torch.equal(st.kmin[layer, b], kb.amin(0)) and torch.equal(st.kmax[layer, b], kb.amax(0))  # type: ignore[index]
    assert torch.equal(st.rep[layer, 7], rep0[layer, 7]) and torch.equal(st.kmin[layer, 7], lo0[layer, 7])  # type: ignore[index]
    held = {int(st.ring_pos[layer, 0, i]): st.ring_q[layer, 0, i] for i in range(RING)}
    assert sorted(held) == list(range(10, 18))
    assert all(torch.equal(held[int(p)], q[i]) for i, p in enumerate(pos[:8]))


@pytest.mark.parametrize("decode", [True, False])
def test_running_statistics_and_biases(decode: bool) -> None:
    """Steps of queries into two slots (and rows of another request): each slot's mean and variance
    equal those of all its queries so far, in float64, and each query's activation bias in the ring is
    mean_c (x - mean)^2 / (var + mean(var) / 100) against the statistics that include it; a row at
    position 0 starts its slot afresh. Decode steps hold one row per slot; packed steps several."""
    g = torch.Generator().manual_seed(6)
    st = RetrievalState(INFO, SLOTS, RING, WIDTH, IDS, quest=False, reps=True)
    hk = hook(st, decode)
    steps = [([0, 1, -1], [0, 0, 0]), ([1, 0, -1], [1, 1, 9]), ([0, 1], [2, 2])]
    if not decode:
        steps = [([0, 0, 0, 1, -1], [0, 1, 2, 0, 0]), ([1, 0, -1, 1], [1, 3, 9, 2])]
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for slots, start in steps:
        q = torch.randn(len(slots), HQ, D, generator=g)
        rows = [
            [s, R.ACTQKV, 2, 1, 1, p, 0] if s >= 0 else [-1] * COLUMNS
            for s, p in zip(slots, start, strict=True)
        ]
        inputs = rows_input(rows)
        hk.queries(0, q, torch.tensor(start), inputs)
        if not decode:
            hk.filled(
                0,
                torch.zeros(2, IDS * BS, HK, D),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.long),
                inputs,
            )
        for i, s in enumerate(slots):
            if s >= 0:
                seen[s].append(q[i].flatten().double())
        for i, s in enumerate(slots):  # the biases of this step's queries, against the merged statistics
            if s < 0:
                continue
            x = torch.stack(seen[s])
            mu, var = x.mean(0), x.var(0, unbiased=False)
            denom = (var + var.mean() / 100).clamp_min(1e-20)  # a slot's first query: bias 0
            want = float(((q[i].flatten().double() - mu) ** 2 / denom).mean())
            at = start[i] % RING
            assert int(st.ring_pos[0, s, at]) == start[i]
            assert math.isclose(float(st.ring_bias[0, s, at]), want, rel_tol=1e-4, abs_tol=1e-6), (
                s,
                start[i],
            )
    for s, xs in seen.items():
        x = torch.stack(xs)
        assert torch.allclose(st.mean[0, s].double(), x.mean(0), atol=1e-5)
        assert torch.allclose(st.var[0, s].double(), x.var(0, unbiased=False), atol=1e-5)
        assert int(st.count[0, s]) == min(len(xs), STAT_CAP)
    q = torch.randn(1, HQ, D, generator=g)  # a restart at position 0 forgets what came before
    hk.queries(0, q, torch.tensor([0]), rows_input([[0, R.ACTQKV, 2, 1, 1, 0, 0]]))
    assert torch.allclose(st.mean[0, 0], q.flatten()) and int(st.count[0, 0]) == 1


def test_staging_recalls_only_what_is_missing() -> None:
    """The host side of the tier: host ids chosen are mapped to the slot's reserved blocks, blocks already
    held are not copied again, GPU ids pass through."""
    host_base = 100
    sg = Staging(slots=2, layers=2, width=4, reserved=range(50, 58), host_base=host_base)
    table = np.array([0, 1, 101, 102, 103, 5, 104, 6])
    cols = np.array([[2, 3, 5, 0], [1, 4, 6, 0]])
    count = np.array([3, 3])
    ids, n, (layers, host, gpu) = sg.stage(1, table, cols, count, np.array([], dtype=np.int64))
    assert n.tolist() == [3, 3]
    assert sorted(zip(layers.tolist(), host.tolist(), strict=True)) == [
        (0, 101),
        (0, 102),
        (1, 103),
        (1, 104),
    ]
    stage = {(int(a), int(h)): int(b) for a, h, b in zip(layers, host, gpu, strict=True)}
    assert ids[0, :3].tolist() == [stage[(0, 101)], stage[(0, 102)], 5]
    assert ids[1, :3].tolist() == [1, stage[(1, 103)], stage[(1, 104)]]
    assert all(54 <= b < 58 for b in gpu.tolist())  # slot 1's reserved blocks
    # next step: layer 0 keeps 102, drops 101, adds 104 (one copy); layer 1 the same blocks (none)
    cols2 = np.array([[3, 6, 0, 0], [1, 4, 6, 0]])
    ids2, n2, (layers2, host2, gpu2) = sg.stage(1, table, cols2, np.array([2, 3]), np.array([7]))
    assert list(zip(layers2.tolist(), host2.tolist(), strict=True)) == [(0, 104)]
    assert int(gpu2[0]) == stage[(0, 101)]  # reuses the block that held what was dropped
    assert ids2[0, :3].tolist() == [stage[(0, 102)], stage[(0, 101)], 6] and n2.tolist() == [3, 4]


def test_staging_equals_a_per_layer_loop() -> None:
    """Random choices over several steps: the ids the kernel reads and the copies equal a plain loop
    that keeps, per layer, which host block each reserved block holds (copies only what is missing)."""
    rng = np.random.default_rng(7)
    layers, k, width, host_base = 3, 6, 8, 1000
    table = np.concatenate([rng.permutation(40)[:10], 1000 + rng.permutation(200)[:30]])
    sg = Staging(slots=1, layers=layers, width=width, reserved=range(500, 500 + width), host_base=host_base)
    held = [dict() for _ in range(layers)]  # reserved position -> host id
    for _ in range(6):
        count = rng.integers(0, k + 1, layers)
        cols = np.stack([np.sort(rng.choice(35, k, replace=False)) for _ in range(layers)])
        extra = np.array(
            sorted(rng.choice(np.arange(35, 40), rng.integers(0, 2), replace=False)), dtype=np.int64
        )
        ids, n, (lay, host, gpu) = sg.stage(0, table, cols, count, extra)
        copies = set()
        for layer in range(layers):
            want_cols = sorted(set(cols[layer, : count[layer]].tolist()) | set(extra.tolist()))
            need = [int(table[c]) for c in want_cols if table[c] >= host_base]
            for pos in [p for p, h in held[layer].items() if h not in need]:
                del held[layer][pos]
            for h in need:
                if h not in held[layer].values():
                    pos = min(p for p in range(width) if p not in held[layer])
                    held[layer][pos] = h
                    copies.add((layer, h, 500 + pos))
            where = {h: 500 + p for p, h in held[layer].items()}
            want_ids = [where.get(int(table[c]), int(table[c])) for c in want_cols]
            assert int(n[layer]) == len(want_cols) and ids[layer, : n[layer]].tolist() == want_ids
        assert set(zip(lay.tolist(), host.tolist(), gpu.tolist(), strict=True)) == copies
