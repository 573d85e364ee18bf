"""kv_retrieval's hook against plain-torch references written from the methods' definitions, one row at
a time in float64, on fresh random inputs (docs/architecture.md §10, "KV retrieval"): each method's block
choice and the table it builds (decode path, and the packed path's decode rows), ActQKV's probe and
per-layer budget across layers, the block summaries written when blocks fill, and the running
statistics and activation biases of the queries."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from actserve.interventions.base import KVSpace, ModelInfo, RowSpan
from actserve.interventions.kv_retrieval.hook import COLUMNS, INPUT, STAT_CAP, RetrievalHook
from actserve.interventions.kv_retrieval.plugin import KVRetrievalPlugin
from actserve.interventions.kv_retrieval.schema import KVRetrievalSpec
from actserve.interventions.kv_retrieval.state import RetrievalState
from actserve.kernels import kv_retrieval as K
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
            cfg[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
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


def ref_choice(
    st: RetrievalState, layer: int, q: torch.Tensor, table: list[int], length: int, row: list[int],
    remaining: float, entropy: torch.Tensor,
) -> tuple[list[int], float]:  # fmt: skip
    """The candidate columns `ref_select` chooses (also when the budget covers the context), and the
    blocks left."""
    slot, method, k, sink, window, pos = row[:6]
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
    best = sorted(range(len(cands)), key=lambda i: -scores[i])[: min(k_sel, len(cands))]
    return sorted(cands[i] for i in best), remaining


def ref_assemble(table: list[int], length: int, row: list[int], cols: list[int]) -> tuple[list[int], int]:
    """The table a row reads from chosen columns, with the current sink and window (a covered context:
    its whole table)."""
    k, sink, window = row[2], row[3], row[4]
    n = -(-length // BS)
    ws = max(n - window, sink)
    if ws - sink <= k:
        return table, length
    return table[:sink] + [table[c] for c in cols] + table[ws:n], (sink + len(cols)) * BS + length - ws * BS


def ref_select(
    st: RetrievalState, layer: int, q: torch.Tensor, table: list[int], length: int, row: list[int],
    remaining: float, entropy: torch.Tensor,
) -> tuple[list[int], int, float]:  # fmt: skip
    """(the row's new table prefix, its length, the blocks left for the next layers)."""
    if row[0] < 0:
        return table, length, remaining
    cols, remaining = ref_choice(st, layer, q, table, length, row, remaining, entropy)
    return (*ref_assemble(table, length, row, cols), remaining)


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
    act_blocks = 0
    for layer in range(LAYERS):
        q = torch.randn(len(ROWS), HQ, D, generator=g)
        hk.queries(layer, q, pos, inputs)
        new_t, new_l = hk.select(layer, q, tables.clone(), lens.clone(), inputs)
        for i, row in enumerate(ROWS):
            want_t, want_l, remaining[i] = ref_select(
                st, layer, q[i], tables[i].tolist(), int(lens[i]), row, remaining[i],
                ent[row[0]] if row[0] >= 0 else ent[-1].clone(),
            )  # fmt: skip
            if i == 2:  # the ActQKV row's table: its sink block, its layer's blocks, its window block
                act_blocks += -(-want_l // BS) - 2
            assert int(new_l[i]) == want_l, (layer, i)
            n_tok = -(-want_l // BS)
            assert new_t[i, :n_tok].tolist() == want_t[:n_tok], (layer, i)
            if row[0] < 0 or i == 4:  # another request's row, and a covered context: unchanged
                assert torch.equal(new_t[i], tables[i]) and int(new_l[i]) == int(lens[i])
        assert int(new_l[2]) < int(lens[2])  # retrieval acted on the ActQKV row
    assert torch.allclose(st.entropy[2].double(), ent[2], atol=1e-6)
    # 3 retrieving rows x 2 layers; InfLLM takes 3 blocks, Quest 2, ActQKV its layer's share
    assert st.counters.tolist() == [2 * (3 + 2) + act_blocks, 6, 0]


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


class RecordingTier:
    """A host tier that records what it is asked to recall."""

    host_base = 40

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[tuple[int, int]]]] = []

    def recall(self, layer: int, host_ids: torch.Tensor, gpu_ids: torch.Tensor, counts: torch.Tensor) -> None:
        pairs = [
            (int(host_ids[r, j]), int(gpu_ids[r, j]))
            for r in range(len(counts))
            for j in range(int(counts[r]))
        ]
        self.calls.append((layer, pairs))


def test_offloaded_rows_read_their_choice_through_reserved_blocks() -> None:
    """With a host tier a row reads the blocks it chooses at this step: the chosen host blocks through
    its slot's reserved GPU blocks (recalled now; a block the slot holds already is not copied again),
    in the order and with the length of the same choice without the tier."""
    g = torch.Generator().manual_seed(4)
    tier = RecordingTier()
    reserved = range(100, 100 + SLOTS * WIDTH)
    kv = KVSpace(BS, 40, IDS, reserved, tier)
    st = random_state(g)
    tiered = RetrievalState(INFO, SLOTS, RING, WIDTH, IDS, quest=True, reps=True, tier=True)
    for name in ("rep", "kmin", "kmax", "ring_q", "ring_pos", "ring_bias", "mean", "var", "count", "entropy"):
        getattr(tiered, name).copy_(getattr(st, name))
    row = [1, R.INFLLM, 3, 1, 1, 40, 0]
    ids = torch.randperm(40, generator=g)[:12].to(torch.int32)
    host = ids.clone()
    host[1:10] = torch.arange(40, 49, dtype=torch.int32)  # the cold blocks' host ids
    tiered.move(ids[1:10].long(), host[1:10].long())  # their summaries follow (`blocks_moved`)
    lens = torch.tensor([41], dtype=torch.int32)
    plain, offloaded = hook(st), RetrievalHook(tiered, LAYERS, HK, BS, D**-0.5, 2, True, kv)
    seen_host: set[tuple[int, int]] = set()
    for step in range(2):  # the same query twice: the second step's choice is held already
        q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(30))
        for layer in range(LAYERS):
            pos = torch.tensor([40 + step])
            inp0 = rows_input([row[:5] + [40 + step, 0]])
            inp1 = rows_input([row[:5] + [40 + step, 1]])  # offloaded
            plain.queries(layer, q, pos, inp0)
            offloaded.queries(layer, q, pos, inp1)
            t0, l0 = plain.select(layer, q, ids.unsqueeze(0), lens + step, inp0)
            t1, l1 = offloaded.select(layer, q, host.unsqueeze(0), lens + step, inp1)
            assert torch.equal(l0, l1)
            used = -(-int(l0[0]) // BS)
            assert int(t1[0, 0]) == int(ids[0]) and int(t1[0, used - 1]) == int(ids[10])  # sink, window
            mid0, mid1 = t0[0, 1 : used - 1].tolist(), t1[0, 1 : used - 1].tolist()
            copies = tier.calls[-1][1]
            assert tier.calls[-1][0] == layer
            for a, b in zip(mid0, mid1, strict=True):  # each chosen block, or the slot's copy of it
                col = ids.tolist().index(a)
                if int(host[col]) >= tier.host_base:
                    assert b in range(100 + WIDTH, 100 + 2 * WIDTH)  # slot 1's reserved blocks
                    assert (int(host[col]), b) in copies or step == 1
                    seen_host.add((layer, int(host[col])))
                else:
                    assert b == a
            if step == 1:
                assert copies == []  # held from the step before
    assert seen_host and int(tiered.counters[2]) == len(seen_host)


def test_offloaded_rows_and_the_graph_variant_agree() -> None:
    """A decode row is offloaded (its `kv_retrieval` input says so, and the step replays the graph variant
    with the tier's work) once the engine has asked which of its blocks stay (`kv_residency`) and its
    table holds a host id; a prompt chunk (a restart) clears that and the slot's reserved blocks."""
    plugin = KVRetrievalPlugin(INFO)
    plugin.configure({"slots": 2, "max_budget_tokens": 24})
    plugin.bind_kv(KVSpace(BS, 40, IDS, range(100, 100 + 2 * plugin.width), RecordingTier()))
    spec = KVRetrievalSpec(method="infllm", budget_tokens=24, sink_tokens=4, window_tokens=4, lag=0)
    hosted, plain = plugin.prepare(spec, "p"), plugin.prepare(spec, "q")
    for plan in (hosted, plain):
        plugin.activate(plan)
    gpu_table, host_table = list(range(12)), [0, 41, 42, 43, 4, 5, 6, 7, 8, 9, 10, 11]

    def step(count: int = 1, pos0: int = 45) -> tuple[str, list[int]]:
        spans = [
            RowSpan(hosted, 0, count, pos0, 30, (), host_table),
            RowSpan(plain, count, 1, 45, 30, (), gpu_table),
        ]
        mode = plugin.graph_mode(spans, count + 1)
        arrays = {INPUT: np.full((count + 1, COLUMNS), -1, dtype=np.int32)}
        plugin.fill_row_inputs(spans, arrays)
        return mode, arrays[INPUT][:, R.OFFLOAD].tolist()

    assert step() == ("", [0, 0])  # host ids, but the engine has not moved anything yet
    for plan in (hosted, plain):
        plugin.kv_residency(plan)
    assert step() == ("host", [1, 0])
    assert plugin.state is not None and plugin.state.held is not None
    plugin.state.held[:, hosted.slot] = 7  # as if it held blocks
    assert step(count=3, pos0=0) == ("", [0, 0, 0, 0])  # a restart: prompt chunk
    assert bool((plugin.state.held[:, hosted.slot] == -1).all()) and not hosted.may_host
    assert step() == ("", [0, 0])  # its table is looked at again once the engine asks


def stage_loop(
    held: list[dict[int, int]], slot: int, chosen: list[int], host_base: int, base: int, width: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """stage_ref for one row, in plain Python: positions keep the chosen host ids they hold, missing
    ones take the lowest free positions in table order. -> (ids read, copies (host id, GPU id))."""
    pos_of = {h: p for p, h in held[slot].items()}
    keep = {pos_of[h] for h in chosen if h >= host_base and h in pos_of}
    free = [p for p in range(width) if p not in keep]
    out, copies = [], []
    for h in chosen:
        if h < host_base:
            out.append(h)
            continue
        if h in pos_of:
            out.append(base + slot * width + pos_of[h])
            continue
        p = free.pop(0)
        held[slot][p] = h
        out.append(base + slot * width + p)
        copies.append((h, base + slot * width + p))
    return out, copies


def test_stage_ref_equals_a_plain_loop() -> None:
    """Random choices over several steps for two offloaded rows (and a row that is not offloaded): the
    ids read and the copies equal a loop that keeps which host block each reserved block holds."""
    rng = np.random.default_rng(7)
    width, host_base, base, bs = 6, 1000, 500, 4
    held_t = torch.full((3, width), -1, dtype=torch.int32)
    held_l: list[dict[int, int]] = [{} for _ in range(3)]
    cfg = torch.tensor(
        [[0, 0, 3, 1, 1, 99, 1], [2, 0, 3, 2, 1, 99, 1], [1, 0, 3, 1, 1, 99, 0]], dtype=torch.int32
    )
    lens = torch.full((3,), 100, dtype=torch.int32)
    counters = torch.zeros(3, dtype=torch.int64)
    total = 0
    for _ in range(6):
        out = torch.zeros(3, 30, dtype=torch.int32)
        m = torch.tensor([int(rng.integers(0, width + 1)) for _ in range(3)])
        chosen = []
        for r in range(3):
            ids = [
                int(x) for x in rng.choice(np.r_[np.arange(20), host_base + np.arange(12)], int(m[r]), False)
            ]
            sink = int(cfg[r, 3])
            out[r, sink : sink + len(ids)] = torch.tensor(ids, dtype=torch.int32)
            chosen.append(ids)
        before = out.clone()
        src, dst, n = R.stage_ref(out, lens, cfg, m, held_t, base, host_base, counters, bs)
        for r in range(3):
            sink = int(cfg[r, 3])
            if r == 2:  # not offloaded: untouched
                assert torch.equal(out[r], before[r]) and int(n[r]) == 0
                continue
            want, copies = stage_loop(held_l, int(cfg[r, 0]), chosen[r], host_base, base, width)
            assert out[r, sink : sink + len(want)].tolist() == want
            got = list(zip(src[r, : n[r]].tolist(), dst[r, : n[r]].tolist(), strict=True))
            assert got == copies
            total += len(copies)
        for s in range(3):
            assert {p: h for p, h in enumerate(held_t[s].tolist()) if h >= 0} == held_l[s]
    assert int(counters[2]) == total > 0


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


# -- lag 1: one step stale ------------------------------------------------------------------------------
LAG_ROWS = [  # slot, method, retrieve, sink, window, pos, offload, lag
    [0, R.INFLLM, 3, 1, 2, 41, 0, 1],
    [1, R.QUEST, 2, 2, 1, 46, 0, 1],
    [2, R.ACTQKV, 3, 1, 1, 49, 0, 1],
    [-1] * COLUMNS,
    [3, R.INFLLM, 3, 1, 1, 44, 0, 0],  # lag 0 beside them
]


def test_lagged_choice_is_the_reference_choice_of_the_previous_query() -> None:
    """Lag 1 rows read at step t the columns chosen from step t-1's query (the reference's choice at
    that step), with step t's sink and window; the first step chooses from its own query (no valid
    previous choice), a lag 0 row always does, and a restart (`forget_lag`) chooses afresh again.
    Positions cross a block boundary (the window moves)."""
    g = torch.Generator().manual_seed(21)
    st = random_state(g)
    hk = RetrievalHook(st, LAYERS, HK, BS, D**-0.5, 2, True, lag=True)
    tables = torch.stack([torch.randperm(IDS, generator=g)[:16] for _ in LAG_ROWS]).to(torch.int32)
    ent = st.entropy.clone().double()
    remaining = [0.0] * len(LAG_ROWS)
    prev: dict[tuple[int, int], list[int]] = {}  # (row, layer): columns chosen at the previous step
    for step in range(5):
        if step == 3:
            st.forget_lag(0)  # row 0's sequence restarts: no previous choice
        rows = [r[:5] + [r[5] + step] + r[6:] if r[0] >= 0 else r for r in LAG_ROWS]
        inputs = rows_input(rows)
        lens = torch.tensor([r[5] + 1 if r[0] >= 0 else 30 for r in rows], dtype=torch.int32)
        pos = torch.tensor([r[5] if r[0] >= 0 else 7 for r in rows])
        for layer in range(LAYERS):
            q = torch.randn(len(rows), HQ, D, generator=g)
            hk.queries(layer, q, pos, inputs)
            want: dict[int, list[int]] = {}
            for i, row in enumerate(rows):
                if row[0] < 0:
                    continue
                want[i], remaining[i] = ref_choice(
                    st, layer, q[i], tables[i].tolist(), int(lens[i]), row, remaining[i], ent[row[0]]
                )  # fmt: skip
            new_t, new_l = hk.select(layer, q, tables.clone(), lens.clone(), inputs)
            hk.filled(layer, torch.zeros(2, IDS * BS, HK, D), torch.tensor([-1]), torch.tensor([-1]), inputs)
            for i, row in enumerate(rows):
                if row[0] < 0:
                    assert torch.equal(new_t[i], tables[i]) and int(new_l[i]) == int(lens[i])
                    continue
                stale = row[7] == 1 and step > 0 and not (i == 0 and step == 3)
                cols = prev[i, layer] if stale else want[i]
                t, n_tok = ref_assemble(tables[i].tolist(), int(lens[i]), row, cols)
                assert int(new_l[i]) == n_tok, (step, layer, i)
                assert new_t[i, : -(-n_tok // BS)].tolist() == t[: -(-n_tok // BS)], (step, layer, i)
                prev[i, layer] = want[i]
    assert torch.allclose(st.entropy[2].double(), ent[2], atol=1e-6)  # one budget update per step


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lag_state(g: torch.Generator) -> RetrievalState:
    info = dataclasses.replace(INFO, device=DEV)
    st = RetrievalState(info, SLOTS, RING, WIDTH, IDS, quest=True, reps=True, tier=True)
    src = random_state(g)
    for name in ("rep", "kmin", "kmax", "ring_q", "ring_pos", "ring_bias", "mean", "var", "count", "entropy"):
        getattr(st, name).copy_(getattr(src, name))
    return st


@pytest.mark.parametrize("split", [0, 4])
def test_lag_kernels_equal_the_references(split: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode path's kernels (Triton's interpreter here) with lag 1 rows, a lag 0 row, another
    request's row and an offloaded row whose blocks move to the host step by step (a block chosen as a
    GPU id comes back as a host id: recalled when its table is assembled) choose, build and recall what
    the plain-torch path does: tables, lengths, the kept choices, held blocks, copies and counters. On a
    GPU the kernels' next choice runs on the side stream. `split`: `select` over parts of 4 columns."""
    monkeypatch.setattr(K, "SELECT_SPLIT", split)
    g = torch.Generator().manual_seed(22)
    st_ref = lag_state(g)
    st_ker = lag_state(torch.Generator().manual_seed(22))
    tiers = (RecordingTier(), RecordingTier())
    hooks = []
    for st, tier in zip((st_ref, st_ker), tiers, strict=True):
        kv = KVSpace(BS, 40, IDS, range(100, 100 + SLOTS * WIDTH), tier)
        hooks.append(RetrievalHook(st, LAYERS, HK, BS, D**-0.5, 2, True, kv, lag=True))
    hooks[0]._kernels = lambda t: False  # type: ignore[method-assign]
    hooks[1]._kernels = lambda t: True  # type: ignore[method-assign]
    base = torch.stack([torch.randperm(40, generator=g)[:16] for _ in LAG_ROWS]).to(torch.int32)
    rows0 = [*LAG_ROWS[:3], LAG_ROWS[3], [3, R.INFLLM, 3, 1, 1, 44, 1, 1], LAG_ROWS[4][:5] + [40, 0, 0]]
    base = torch.cat([base, base[4:5]])
    for step in range(4):
        rows = [r[:5] + [r[5] + step] + r[6:] if r[0] >= 0 else r for r in rows0]
        rows[5][0] = 4
        inputs = {k: v.to(DEV) for k, v in rows_input(rows).items()}
        lens = torch.tensor([r[5] + 1 if r[0] >= 0 else 30 for r in rows], dtype=torch.int32).to(DEV)
        pos = torch.tensor([r[5] if r[0] >= 0 else 7 for r in rows]).to(DEV)
        tables = base.clone()
        cold = 8 + step  # row 4's blocks [1, cold) live on the host (more of them each step)
        tables[4, 1:cold] = 40 + torch.arange(1, cold, dtype=torch.int32)
        tables = tables.to(DEV)
        kv_cache = torch.zeros(2, IDS * BS, HK, D, device=DEV)
        none = torch.tensor([-1], device=DEV)
        for layer in range(LAYERS):
            q = torch.randn(len(rows), HQ, D, generator=g).to(DEV)
            outs = []
            for hk in hooks:
                hk.queries(layer, q, pos, inputs)
                outs.append(hk.select(layer, q, tables.clone(), lens.clone(), inputs))
                hk.filled(layer, kv_cache, none, none, inputs)
            if DEV.type == "cuda":  # the side stream's work of this layer (joined at the last layer)
                torch.cuda.synchronize()
            (t0, l0), (t1, l1) = outs
            assert torch.equal(l0, l1), (step, layer)
            for r in range(len(rows)):
                used = -(-int(l0[r]) // BS)
                assert torch.equal(t0[r, :used], t1[r, :used]), (step, layer, r)
                read = t0[r, :used]
                assert ((read < 40) | (read >= 100)).all() or r == 3  # no host id reaches attention
            copies = [sorted(c for _, pairs in tier.calls for c in pairs) for tier in tiers]
            assert copies[0] == copies[1], (step, layer)
            for name in ("lag_cols", "lag_n", "lag_tag", "held", "counters"):
                a, b = getattr(st_ref, name), getattr(st_ker, name)
                if name == "lag_cols":  # entries past a slot's count are not read
                    live = torch.arange(WIDTH, device=DEV) < st_ref.lag_n.unsqueeze(-1)
                    a, b = a[live], b[live]
                assert torch.equal(a, b), (step, layer, name)
            assert torch.allclose(st_ref.entropy, st_ker.entropy, atol=1e-5)
    assert int(st_ref.counters[2]) > 0 and bool((st_ref.lag_tag[:, :4] >= 0).all())  # slots 0-3: lag 1


@pytest.mark.parametrize("split", [0, 4])
def test_all_lagged_steps_equal_the_reference_path(split: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps whose every retrieving row reads its previous step's choice (`all_lagged`: no fresh
    choice on the step's path; the append, the next choice and the summaries on the side stream, here
    Triton's interpreter in program order) after a first lag-1 step, beside another request's row,
    build the tables, keep the choices and write the statistics and summaries the plain-torch path does;
    a row the device does not flag (its slot forgotten) reads its whole table and chooses again."""
    monkeypatch.setattr(K, "SELECT_SPLIT", split)
    g = torch.Generator().manual_seed(31)
    st_ref, st_ker = lag_state(g), lag_state(torch.Generator().manual_seed(31))
    ref_hook = RetrievalHook(st_ref, LAYERS, HK, BS, D**-0.5, 2, True, None, lag=True)
    ref_hook._kernels = lambda t: False  # type: ignore[method-assign]
    first = RetrievalHook(st_ker, LAYERS, HK, BS, D**-0.5, 2, True, None, lag=True)
    every = RetrievalHook(st_ker, LAYERS, HK, BS, D**-0.5, 2, True, None, lag=True, all_lagged=True)
    for hk in (first, every):
        hk._kernels = lambda t: True  # type: ignore[method-assign]
    rows0 = LAG_ROWS[:4]
    base = torch.stack([torch.randperm(40, generator=g)[:16] for _ in rows0]).to(torch.int32)
    kv_cache = torch.randn(2, IDS * BS, HK, D, generator=g).to(DEV)
    for step in range(5):
        rows = [r[:5] + [r[5] + step] + r[6:] if r[0] >= 0 else r for r in rows0]
        inputs = {k: v.to(DEV) for k, v in rows_input(rows).items()}
        lens = torch.tensor([r[5] + 1 if r[0] >= 0 else 30 for r in rows], dtype=torch.int32).to(DEV)
        pos = torch.tensor([r[5] if r[0] >= 0 else 7 for r in rows]).to(DEV)
        tables = base.to(DEV)
        if step == 3:  # slot 1 restarts on both sides: not flagged, its whole table this step
            for st in (st_ref, st_ker):
                st.forget_lag(1)
        # the block row 0 completes this step, if any (position 41 + step ends block (41 + step) // BS)
        done = (rows[0][5] + 1) % BS == 0
        blocks = torch.tensor([int(base[0, rows[0][5] // BS])] if done else [-1], device=DEV)
        filled_rows = torch.tensor([0 if done else -1], device=DEV)
        hk = first if step == 0 else every
        before = [st.counters.clone() for st in (st_ref, st_ker)]
        for layer in range(LAYERS):
            q = torch.randn(len(rows), HQ, D, generator=g).to(DEV)
            outs = []
            for h in (ref_hook, hk):
                h.queries(layer, q, pos, inputs)
                outs.append(h.select(layer, q, tables.clone(), lens.clone(), inputs))
                h.filled(layer, kv_cache, blocks, filled_rows, inputs)
                if DEV.type == "cuda":
                    torch.cuda.synchronize()
            (t0, l0), (t1, l1) = outs
            for r in range(len(rows)):
                if step == 3 and r == 1:  # the restarted row: its whole table (the reference chooses)
                    assert int(l1[r]) == int(lens[r]) and torch.equal(t1[r], tables[r])
                    continue
                assert int(l0[r]) == int(l1[r]), (step, layer, r)
                used = -(-int(l0[r]) // BS)
                assert torch.equal(t0[r, :used], t1[r, :used]), (step, layer, r)
            for name in ("lag_cols", "lag_n", "lag_tag", "count", "ring_pos"):
                a, b = getattr(st_ref, name), getattr(st_ker, name)
                if name == "lag_cols":
                    live = torch.arange(WIDTH, device=DEV) < st_ref.lag_n.unsqueeze(-1)
                    a, b = a[live], b[live]
                assert torch.equal(a, b), (step, layer, name)
            for name in ("entropy", "mean", "var", "ring_q", "ring_bias", "rep", "kmin", "kmax"):
                a, b = getattr(st_ref, name), getattr(st_ker, name)
                assert torch.allclose(a, b, atol=1e-5), (step, layer, name)
        added = [st.counters - b for st, b in zip((st_ref, st_ker), before, strict=True)]
        if step != 3:  # blocks retrieved and selections made over the step (all_lagged: at its first layer)
            assert torch.equal(added[0][:2], added[1][:2]), step
    assert st_ker.lag_tag[:, :3].tolist() == [[45, 50, 53]] * LAYERS  # every slot chose at its last step


def test_graph_mode_all_lagged_after_a_decode_step() -> None:
    """The graph variant without a fresh choice ("lag+all") only for steps whose every row is a lag-1
    decode row right after a decode step of its own sequence: not the first step after a prompt, not
    beside a lag 0 row, not after a restart."""
    plugin = KVRetrievalPlugin(INFO)
    plugin.configure({"slots": 2, "max_budget_tokens": 24})
    plugin.bind_kv(KVSpace(BS, 40, IDS, range(100, 100 + 2 * plugin.width), None))
    lag1 = KVRetrievalSpec(method="infllm", budget_tokens=24, sink_tokens=4, window_tokens=4, lag=1)
    lag0 = KVRetrievalSpec(method="infllm", budget_tokens=24, sink_tokens=4, window_tokens=4, lag=0)
    a, b = plugin.prepare(lag1, "a"), plugin.prepare(lag0, "b")
    for plan in (a, b):
        plugin.activate(plan)

    def step(*spans: RowSpan) -> str:
        n = sum(sp.count for sp in spans)
        mode = plugin.graph_mode(list(spans), n)
        plugin.fill_row_inputs(list(spans), {INPUT: np.full((n, COLUMNS), -1, dtype=np.int32)})
        return mode

    assert step(RowSpan(a, 0, 30, 0, 30)) == "lag"  # the prompt
    assert step(RowSpan(a, 0, 1, 30, 30)) == "lag"  # the first decode step chooses afresh
    assert step(RowSpan(a, 0, 1, 31, 30)) == "lag+all"
    assert step(RowSpan(a, 0, 1, 32, 30)) == "lag+all"
    assert step(RowSpan(a, 0, 1, 33, 30), RowSpan(b, 1, 1, 40, 30)) == "lag"  # a lag 0 row beside it
    assert step(RowSpan(a, 0, 1, 34, 30)) == "lag+all"
    assert step(RowSpan(a, 0, 1, 36, 30)) == "lag"  # not the position after the last decode step
    assert step(RowSpan(a, 0, 4, 0, 4)) == "lag"  # a restart
    assert step(RowSpan(a, 0, 1, 4, 4)) == "lag"
    assert step(RowSpan(a, 0, 1, 5, 4)) == "lag+all"
    # the variants whose hooks fork the next choice onto a side stream say so (captured without PDL)
    assert [plugin.graph_hooks(m).side_stream for m in ("", "lag", "lag+all")] == [False, True, True]


def test_assemble_every_layer_at_once_equals_one_layer_at_a_time() -> None:
    """`assemble` over lag views with a layer dimension (one launch a step) gives each layer the tables,
    lengths, flags and configurations of a launch of that layer alone, and the same counter totals."""
    from actserve.kernels import kv_retrieval as kern

    g = torch.Generator().manual_seed(47)
    st = lag_state(g)
    rows = [r[:5] + [r[5] + 3] + r[6:] if r[0] >= 0 else r for r in LAG_ROWS[:4]]
    cfg = rows_input(rows)[INPUT].to(DEV)
    lens = torch.tensor([r[5] + 1 if r[0] >= 0 else 30 for r in rows], dtype=torch.int32, device=DEV)
    tables = torch.stack([torch.randperm(40, generator=g)[:16] for _ in rows]).to(torch.int32).to(DEV)
    for layer in range(LAYERS):  # random previous choices, ascending, within each row's candidates
        for r in rows:
            if r[0] < 0:
                continue
            n = int(torch.randint(1, 4, (1,), generator=g))
            cols = torch.randperm(8, generator=g)[:n].sort().values + r[3]
            st.lag_cols[layer, r[0], :n] = cols.to(torch.int32)
            st.lag_n[layer, r[0]] = n
            # most choices made at the previous position, some stale (those rows get their whole table)
            st.lag_tag[layer, r[0]] = r[5] - 1 - int(torch.rand(1, generator=g) < 0.3)
    views = (st.lag_cols, st.lag_at, st.lag_n, st.lag_tag)
    c0 = st.counters.clone()
    every = kern.assemble(cfg, tables, lens, *views, None, st.counters, BS, full=True)
    c1 = st.counters.clone()
    for layer in range(LAYERS):
        one = kern.assemble(cfg, tables, lens, *(v[layer] for v in views), None, st.counters, BS, full=True)
        assert torch.equal(every.flag[layer], one.flag) and torch.equal(every.new_len[layer], one.new_len)
        assert torch.equal(every.cfg_now[layer], one.cfg_now) and torch.equal(
            every.cfg_next[layer], one.cfg_next
        )
        for r in range(len(rows)):
            used = -(-int(one.new_len[r]) // BS)
            assert torch.equal(every.out[layer, r, :used], one.out[r, :used]), (layer, r)
    assert torch.equal(c1 - c0, st.counters - c1)
    assert 0 < int(every.flag.sum()) < every.flag.numel()  # both kinds of row were exercised
