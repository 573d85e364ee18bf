"""KV-retrieval decode kernels (Triton versions of kernels/kv_retrieval_ref.py; semantics there): a
decode step of retrieving rows costs a few launches per layer instead of hundreds of small torch ops,
which inside a CUDA graph still cost a few microseconds each.

Per layer: `append` (grid rows: the query into the slot's ring, its running statistics and activation
bias, one tile of all query channels), `query_vectors` (grid rows x KV heads), `scores` (grid rows x
column tiles: each candidate block's summaries, all KV heads in one load, read by id through the row's
table, no gathered copy), `select` (grid rows: ActQKV's entropy and its share of the step's blocks, the
k-th best score found 2 bits a round (16 block-wide counts over the row's keys, read in chunks up to
its own blocks), the chosen columns compacted in ascending order into the row's new table, its length;
with a host tier, the chosen host blocks mapped to the slot's reserved GPU blocks and the copies listed for
kernels/kv_tier.py); after attention, `summaries` (grid filled blocks x KV heads: a block's
representative key and min/max when a row's token completed it). `select` split over programs
(`SELECT_SPLIT`, off until measured in the step): `_select_part_kernel` (grid rows x parts of the columns,
held in registers: softmax sums and the part's best candidates) then `_select_merge_kernel` (grid rows).
No host sync; fixed shapes: they run inside decode CUDA graphs.

Lag 1 (kv_retrieval_ref `lagged_ref`, `assemble_ref`, `remember_ref`): `assemble` (grid rows) checks
each lag-1 row's previous choice and builds its table from it (flag 1), and writes two copies of the
row configuration, one with only the other rows (for this step's fresh choice), one with only the
flagged rows (for their next choice: `query_vectors`, `scores` and `select` in phase 2, on a side
stream); `select` in phase 1 skips the flagged rows, and in both phases keeps lag-1 rows' choices.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from actserve.kernels import kv_retrieval_ref as ref

# the row configuration's columns and the method ids (kv_retrieval_ref), as constants the kernels may read
SLOT = tl.constexpr(ref.SLOT)
METHOD = tl.constexpr(ref.METHOD)
RETRIEVE = tl.constexpr(ref.RETRIEVE)
SINK = tl.constexpr(ref.SINK)
WINDOW = tl.constexpr(ref.WINDOW)
POS = tl.constexpr(ref.POS)
OFFLOAD = tl.constexpr(ref.OFFLOAD)
LAG = tl.constexpr(ref.LAG)
COLUMNS = tl.constexpr(ref.COLUMNS)
QUEST = tl.constexpr(ref.QUEST)
ACTQKV = tl.constexpr(ref.ACTQKV)
# `select`'s columns a pass and warps (one program a row): 2048 / 8 was the fastest alone at 32k-128k
# (bench/results/kv_select_speed_s5.log); bench/kv_retrieval_speed.py --select measures others in the step
SELECT_CHUNK = 2048
SELECT_WARPS = 8
# columns a program takes when `select` splits a row over programs (0: one program a row); not yet measured
# in the step on the H200, hence off (bench/kv_retrieval_speed.py --select CHUNK/WARPS/SPLIT)
SELECT_SPLIT = 0


@triton.jit
def _geometry(cfg_ptr, len_ptr, r, stride_cfg, BS: tl.constexpr):
    n = (tl.load(len_ptr + r).to(tl.int64) + BS - 1) // BS
    sink = tl.maximum(tl.load(cfg_ptr + r * stride_cfg + SINK).to(tl.int64), 0)
    win = tl.maximum(tl.load(cfg_ptr + r * stride_cfg + WINDOW).to(tl.int64), 0)
    ws = tl.maximum(n - win, sink)
    return n, sink, ws, tl.maximum(ws - sink, 0)


@triton.jit
def _append_kernel(
    q_ptr, cfg_ptr, rq_ptr, rp_ptr, rb_ptr, mean_ptr, var_ptr, cnt_ptr,
    cap, C, T, stride_q, stride_cfg, stride_rqs, stride_rqt, stride_rps, stride_ms,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    slot = tl.load(cfg_ptr + r * stride_cfg + SLOT).to(tl.int64)
    if slot < 0:
        return
    p = tl.load(cfg_ptr + r * stride_cfg + POS).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    fresh = p == 0
    n0 = tl.where(fresh, 0.0, tl.load(cnt_ptr + slot))
    n = n0 + 1.0
    xq = tl.load(q_ptr + r * stride_q + c, mask=cm, other=0.0)
    x = xq.to(tl.float32)
    mu = tl.where(fresh, 0.0, tl.load(mean_ptr + slot * stride_ms + c, mask=cm, other=0.0))
    v = tl.where(fresh, 1.0, tl.load(var_ptr + slot * stride_ms + c, mask=cm, other=1.0))
    delta = x - mu
    mu2 = mu + delta / n
    v2 = (v * n0 + delta * (x - mu2)) / n
    tl.store(mean_ptr + slot * stride_ms + c, mu2, mask=cm)
    tl.store(var_ptr + slot * stride_ms + c, v2, mask=cm)
    tl.store(cnt_ptr + slot, tl.minimum(n, cap))
    mv = tl.sum(tl.where(cm, v2, 0.0), axis=0) / C
    dev = (x - mu2) * (x - mu2) / tl.maximum(v2 + mv / 100, 1e-20)
    bias = tl.sum(tl.where(cm, dev, 0.0), axis=0) / C
    at = p % T
    tl.store(rq_ptr + slot * stride_rqs + at * stride_rqt + c, xq.to(rq_ptr.dtype.element_ty), mask=cm)
    tl.store(rp_ptr + slot * stride_rps + at, p)
    tl.store(rb_ptr + slot * stride_rps + at, bias)


@triton.jit
def _query_vectors_kernel(
    q_ptr, cfg_ptr, rq_ptr, rp_ptr, rb_ptr, a_ptr, b_ptr,
    T, stride_q, stride_cfg, stride_rqs, stride_rqt, stride_rps, stride_a,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, T_PAD: tl.constexpr, T_CHUNK: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    slot = tl.load(cfg_ptr + r * stride_cfg + SLOT).to(tl.int64)
    method = tl.load(cfg_ptr + r * stride_cfg + METHOD)
    h = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    hm = h < G
    ch = (g * G + h)[:, None] * D + d[None, :]
    qg = tl.load(q_ptr + r * stride_q + ch, mask=hm[:, None], other=0.0).to(tl.float32)
    a = tl.sum(qg, axis=0)
    b = tl.zeros([D], tl.float32)
    if (slot >= 0) & (method == QUEST):
        a = tl.sum(tl.maximum(qg, 0.0), axis=0)
        b = tl.sum(tl.minimum(qg, 0.0), axis=0)
    if (slot >= 0) & (method == ACTQKV):
        p = tl.load(cfg_ptr + r * stride_cfg + POS).to(tl.int64)
        t = tl.arange(0, T_PAD)
        rp = tl.load(rp_ptr + slot * stride_rps + t, mask=t < T, other=-1)
        ok = (rp >= 0) & (rp <= p) & (rp > p - T)
        wsum = tl.sum(
            tl.where(ok, tl.load(rb_ptr + slot * stride_rps + t, mask=t < T, other=0.0), 0.0), axis=0
        )
        # T_CHUNK ring entries per load (32: two round trips to memory for the default ring of 64; one
        # query at a time made this kernel a chain of T dependent round trips)
        acc = tl.zeros([D], tl.float32)
        for t0 in range(0, T, T_CHUNK):
            tc = t0 + tl.arange(0, T_CHUNK)
            tm = tc < T
            rpc = tl.load(rp_ptr + slot * stride_rps + tc, mask=tm, other=-1)
            wc = tl.load(rb_ptr + slot * stride_rps + tc, mask=tm, other=0.0) / tl.maximum(wsum, 1e-30)
            wc = tl.where((rpc >= 0) & (rpc <= p) & (rpc > p - T), wc, 0.0)
            at = rq_ptr + slot * stride_rqs + tc[:, None, None].to(tl.int64) * stride_rqt + ch[None, :, :]
            x = tl.load(at, mask=tm[:, None, None] & hm[None, :, None], other=0.0)
            acc += tl.sum(wc[:, None] * tl.sum(x.to(tl.float32), axis=1), axis=0)
        a = a + acc  # the current query beside the window's probe
    tl.store(a_ptr + r * stride_a + g * D + d, a)
    tl.store(b_ptr + r * stride_a + g * D + d, b)


@triton.jit
def _scores_kernel(
    a_ptr, b_ptr, cfg_ptr, bt_ptr, len_ptr, rep_ptr, kmin_ptr, kmax_ptr, out_ptr,
    W, stride_a, stride_cfg, stride_bt, stride_xi, stride_xg, stride_o,
    HK: tl.constexpr, D: tl.constexpr, HD_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_REP: tl.constexpr, HAS_MINMAX: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    slot = tl.load(cfg_ptr + r * stride_cfg + SLOT)
    method = tl.load(cfg_ptr + r * stride_cfg + METHOD)
    _, sink, ws, _ = _geometry(cfg_ptr, len_ptr, r, stride_cfg, BS)
    ws = tl.where(slot >= 0, ws, 0)  # rows of other requests: no candidate
    if not HAS_MINMAX:  # nor rows of a method whose summaries this server does not keep
        ws = tl.where(method == QUEST, 0, ws)
    if not HAS_REP:
        ws = tl.where(method != QUEST, 0, ws)
    if tl.program_id(1) * BLOCK_W >= ws:  # past the row's candidates (a short row in a wide table)
        tl.store(out_ptr + r * stride_o + cols, tl.full([BLOCK_W], float("-inf"), tl.float32), mask=cols < W)
        return
    cand = (cols >= sink) & (cols < ws) & (cols < W)
    ids = tl.load(bt_ptr + r * stride_bt + cols, mask=cand, other=0).to(tl.int64)
    # every KV head's summary of a block in one load (one contiguous piece per id)
    hd = tl.arange(0, HD_PAD)
    hm = hd < HK * D
    av = tl.load(a_ptr + r * stride_a + hd, mask=hm, other=0.0)
    off = ids[:, None] * stride_xi + ((hd // D) * stride_xg + hd % D)[None, :]
    m2 = cand[:, None] & hm[None, :]
    acc = tl.zeros([BLOCK_W], tl.float32)
    quest = method == QUEST
    if HAS_MINMAX:
        if quest:
            bv = tl.load(b_ptr + r * stride_a + hd, mask=hm, other=0.0)
            hi = tl.load(kmax_ptr + off, mask=m2, other=0.0).to(tl.float32)
            lo = tl.load(kmin_ptr + off, mask=m2, other=0.0).to(tl.float32)
            acc += tl.sum(hi * av[None, :] + lo * bv[None, :], axis=1)
    if HAS_REP:
        if not quest:
            x = tl.load(rep_ptr + off, mask=m2, other=0.0).to(tl.float32)
            acc += tl.sum(x * av[None, :], axis=1)
    tl.store(out_ptr + r * stride_o + cols, tl.where(cand, acc, float("-inf")), mask=cols < W)


@triton.jit
def _layer_blocks(
    srow, hi, W, ent_ptr, rem_ptr, slot, k, n_cand, layer, L, width, stride_e,
    BLOCK_W: tl.constexpr, L_PAD: tl.constexpr, RATE: tl.constexpr,
):  # fmt: skip
    """ActQKV's blocks at this layer (budget_ref): the entropy of softmax(scores) over the row's
    candidates (its scores at columns below hi, -inf at the others, as `scores` writes them; read in
    chunks of BLOCK_W), its running mean for the layer, and the layer's share of the blocks left."""
    c = tl.arange(0, BLOCK_W)
    mx = tl.full([BLOCK_W], float("-inf"), tl.float32)
    for c0 in range(0, hi, BLOCK_W):  # chunks from 0: aligned, vector loads; the sink's scores are -inf
        mx = tl.maximum(mx, tl.load(srow + c0 + c, mask=c0 + c < W, other=float("-inf")))
    m = tl.max(mx, axis=0)
    ze = tl.zeros([BLOCK_W], tl.float32)
    se = tl.zeros([BLOCK_W], tl.float32)
    for c0 in range(0, hi, BLOCK_W):
        x = tl.load(srow + c0 + c, mask=c0 + c < W, other=float("-inf"))
        live = x > float("-inf")
        dx = tl.where(live, x - m, 0.0)
        e = tl.where(live, tl.exp(dx), 0.0)
        ze += e
        se += e * dx
    return _budget_blocks(
        tl.sum(ze, axis=0), tl.sum(se, axis=0), ent_ptr, rem_ptr, slot, k, n_cand, layer, L, width, stride_e,
        L_PAD, RATE,
    )  # fmt: skip


@triton.jit
def _budget_blocks(
    z, s1, ent_ptr, rem_ptr, slot, k, n_cand, layer, L, width, stride_e,
    L_PAD: tl.constexpr, RATE: tl.constexpr,
):  # fmt: skip
    """The rest of `_layer_blocks` from the softmax's sums over the row's candidates (z = sum exp(x - m),
    s1 = sum exp(x - m) (x - m), m their max), which `_select_merge_kernel` gathers from its parts."""
    h = tl.log(tl.maximum(z, 1e-30)) - s1 / tl.maximum(z, 1e-30)
    hn = h / tl.log(tl.maximum(n_cand, 2).to(tl.float32))
    ent = tl.load(ent_ptr + slot * stride_e + layer)
    if n_cand >= 2:
        ent = (1.0 - RATE) * ent + RATE * hn
        tl.store(ent_ptr + slot * stride_e + layer, ent)
    j = tl.arange(0, L_PAD)
    later = tl.load(ent_ptr + slot * stride_e + j, mask=(j > layer) & (j < L), other=0.0)
    total = tl.maximum(ent + tl.sum(later, axis=0), 1e-6)
    rem = tl.load(rem_ptr + slot)
    if layer == 0:
        rem = (k * L).to(tl.float32)
    kl = tl.floor(ent / total * rem + 0.5)
    lo = tl.maximum(k // 2, 1).to(tl.float32)
    kl = tl.minimum(tl.maximum(kl, lo), tl.minimum(2 * k, width).to(tl.float32))
    tl.store(rem_ptr + slot, rem - kl)
    return tl.minimum(kl.to(tl.int64), n_cand)


@triton.jit
def _stage(
    base, r, slot, m, held_ptr, work_ptr, csrc_ptr, cdst_ptr, cn_ptr, cnt_ptr, width, res_base, host_base,
    stride_held, stride_w, stride_c, at_row, keep_at, K_PAD: tl.constexpr, H_CHUNK: tl.constexpr,
):  # fmt: skip
    """stage_ref for one offloaded row: its chosen ids (at `base`, `m` of them) that are host ids are
    read from the slot's reserved blocks; `work` (2 x width per row) holds which positions keep a chosen
    block, then the free positions in order. `keep_at`: each chosen entry's position (-1 for GPU ids)
    into `at_row` (a lag-1 row's choice)."""
    tl.debug_barrier()  # the chosen ids stored by all threads are visible
    j = tl.arange(0, K_PAD)
    jm = j < m
    ids = tl.load(base + j, mask=jm, other=-1)
    need = jm & (ids >= host_base)
    hit = tl.full([K_PAD], -1, tl.int32)
    wrow = work_ptr + r * stride_w
    hrow = held_ptr + slot * stride_held
    for p0 in range(0, width, H_CHUNK):
        p = p0 + tl.arange(0, H_CHUNK)
        pm = p < width
        h = tl.load(hrow + p, mask=pm, other=-1)
        eq = need[:, None] & pm[None, :] & (ids[:, None] == h[None, :])
        hit = tl.maximum(hit, tl.max(tl.where(eq, p[None, :], -1), axis=1))
        tl.store(wrow + p, tl.max(eq.to(tl.int32), axis=0), mask=pm)
    tl.debug_barrier()
    keep = tl.load(wrow + j, mask=j < width, other=1)
    free = (keep == 0).to(tl.int32)
    tl.store(wrow + width + tl.cumsum(free, axis=0) - free, j, mask=free > 0)
    tl.debug_barrier()
    miss = need & (hit < 0)
    mi = miss.to(tl.int32)
    rank = tl.cumsum(mi, axis=0) - mi
    tgt = tl.load(wrow + width + rank, mask=miss, other=0)
    staged = (res_base + slot * width + tl.where(miss, tgt, hit)).to(tl.int32)
    tl.store(base + j, staged, mask=need)
    if keep_at:
        tl.store(at_row + j, tl.where(need, tl.where(miss, tgt, hit), -1), mask=jm)
    tl.store(hrow + tgt, ids, mask=miss)
    tl.store(csrc_ptr + r * stride_c + rank, ids, mask=miss)
    tl.store(cdst_ptr + r * stride_c + rank, staged, mask=miss)
    copies = tl.sum(mi, axis=0)
    tl.store(cn_ptr + r, copies)
    tl.atomic_add(cnt_ptr + 2, copies.to(tl.int64))


@triton.jit
def _keys(x, cols, lo, hi):
    """An int32 key per column whose order is the float score's (-0.0 as 0.0), for the finite scores at
    columns [lo, hi); INT_MIN (no key) elsewhere. -> (key, whether it has one)."""
    ok = (cols >= lo) & (cols < hi) & (x == x) & (tl.abs(x) < float("inf"))
    bits = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    return tl.where(ok, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits), -2147483648), ok


@triton.jit
def _kth_largest(krow, hi, W, kk, BLOCK_W: tl.constexpr):
    """The kk-th largest of the row's keys (`krow`: written by `_keys` up to hi, rounded up to a chunk,
    INT_MIN for none; 1 <= kk <= the others): the largest t with at least kk keys >= t, 2 bits a round
    from the top (16 rounds; a bisection on the bits took 31, and each round's block-wide reduction is
    most of its cost; a byte a round through `tl.histogram`, 4 rounds, took twice as long on the H200:
    57 vs 31 us at 128k, bench/results/kv_select_speed_radix.log). A round counts the keys >= t + j 2^s
    for j = 1, 2, 3: three compares per key into int32 counts per thread, packed into 21-bit fields of
    one int64 for one reduction; the counts at or above each j are then scalar. Keys are read in chunks
    of BLOCK_W from column 0 (aligned; L1/L2: 32 KiB a row at 128k tokens), so a round costs the row's
    blocks, not the table's width."""
    c = tl.arange(0, BLOCK_W)
    t = kk.to(tl.int64) * 0 - 2147483648
    for r in tl.static_range(16):
        s = 30 - 2 * r
        t1 = (t + (1 << s)).to(tl.int32)  # <= INT_MAX: t + 4 * 2^s bounds the keys still in question
        t2 = (t + (2 << s)).to(tl.int32)
        t3 = (t + (3 << s)).to(tl.int32)
        n1 = tl.zeros([BLOCK_W], tl.int32)
        n2 = tl.zeros([BLOCK_W], tl.int32)
        n3 = tl.zeros([BLOCK_W], tl.int32)
        for c0 in range(0, hi, BLOCK_W):  # chunks from 0: aligned, vector loads
            key = tl.load(krow + c0 + c, mask=c0 + c < W, other=-2147483648)
            n1 += (key >= t1).to(tl.int32)
            n2 += (key >= t2).to(tl.int32)
            n3 += (key >= t3).to(tl.int32)
        word = tl.sum(n1.to(tl.int64) + (n2.to(tl.int64) << 21) + (n3.to(tl.int64) << 42), axis=0)
        t = _raise(t, word, kk, s)
    return t.to(tl.int32)


@triton.jit
def _raise(t, word, kk, s):
    """A round's threshold: t + j 2^s for the largest j in 0..3 with at least kk keys >= it (`word`: the
    counts for j = 1, 2, 3 in 21-bit fields)."""
    c3 = (word >> 42).to(tl.int32)
    c2 = ((word >> 21) & 0x1FFFFF).to(tl.int32)
    c1 = (word & 0x1FFFFF).to(tl.int32)
    j = (c1 >= kk).to(tl.int64) + (c2 >= kk).to(tl.int64) + (c3 >= kk).to(tl.int64)
    return t + (j << s)


@triton.jit
def _kth_largest_of(key, kk):
    """`_kth_largest` of keys held in registers (a tensor; INT_MIN for none)."""
    t = kk.to(tl.int64) * 0 - 2147483648
    for r in tl.static_range(16):
        s = 30 - 2 * r
        t1 = (t + (1 << s)).to(tl.int32)
        t2 = (t + (2 << s)).to(tl.int32)
        t3 = (t + (3 << s)).to(tl.int32)
        c = (key >= t1).to(tl.int64) + ((key >= t2).to(tl.int64) << 21) + ((key >= t3).to(tl.int64) << 42)
        t = _raise(t, tl.sum(c, axis=0), kk, s)
    return t.to(tl.int32)


@triton.jit
def _top_in_order(key, kk):
    """The kk largest keys (INT_MIN: none; kk <= those that are not) with ties at the k-th taken in
    order: [N] int32 1 where taken."""
    t = _kth_largest_of(key, tl.maximum(kk, 1))
    gt = (key > t).to(tl.int32)
    eq = ((key == t) & (key != -2147483648)).to(tl.int32)
    need = kk - tl.sum(gt, axis=0)
    eq = tl.where(tl.cumsum(eq, axis=0) - eq < need, eq, 0)
    return tl.where(kk > 0, gt | eq, 0)


@triton.jit
def _copy_row(row_in, row_out, W, BLOCK_W: tl.constexpr):
    c = tl.arange(0, BLOCK_W)
    for c0 in range(0, W, BLOCK_W):
        tl.store(row_out + c0 + c, tl.load(row_in + c0 + c, mask=c0 + c < W), mask=c0 + c < W)


@triton.jit
def _left_alone(flag_ptr, cn_ptr, r, TIER: tl.constexpr, PHASE: tl.constexpr):
    """Whether this phase of `select` leaves row r alone: phase 1 the rows `assemble` flagged (it built
    their tables and listed their copies), phase 2 the others. With a tier (`cn`: copies per row) a row
    phase 1 keeps, and every row in phases 0 and 2, starts with no copies."""
    skip = r < 0  # False
    if PHASE == 1:
        skip = tl.load(flag_ptr + r) != 0
        if TIER:
            if skip == 0:
                tl.store(cn_ptr + r, 0)
    else:
        if TIER:
            tl.store(cn_ptr + r, 0)
    if PHASE == 2:
        skip = tl.load(flag_ptr + r) == 0
    return skip


@triton.jit
def _finish_row(
    r, slot, m, keep, covered, off, sink, ws, length, row_in, row_out, newlen_ptr, cfg_ptr, cnt_ptr, ln_ptr,
    tag_ptr, held_ptr, work_ptr, csrc_ptr, cdst_ptr, cn_ptr, lat_ptr, W, width, res_base, host_base,
    stride_cfg, stride_held, stride_w, stride_c, stride_lag,
    BS: tl.constexpr, BLOCK_W: tl.constexpr, K_PAD: tl.constexpr, H_CHUNK: tl.constexpr, TIER: tl.constexpr,
    PHASE: tl.constexpr,
):  # fmt: skip
    """The end of a chosen row in both `select` paths: a lag-1 row's choice kept (its count and
    position), a covered row's table copied whole (its choice kept, its table as it is), else its new
    length, the blocks read counted where the table is built, and with a tier its host blocks staged."""
    if keep:
        tl.store(ln_ptr + slot, m)
        tl.store(tag_ptr + slot, tl.load(cfg_ptr + r * stride_cfg + POS).to(tl.int64))
    if covered:
        if PHASE != 2:
            _copy_row(row_in, row_out, W, BLOCK_W)
            tl.store(newlen_ptr + r, length)
    else:
        if PHASE != 2:
            tl.atomic_add(cnt_ptr, m.to(tl.int64))
            tl.atomic_add(cnt_ptr + 1, 1)
            tl.store(newlen_ptr + r, ((sink + m) * BS + length - ws * BS).to(length.dtype))
        if TIER:
            if off > 0:
                _stage(
                    row_out + sink, r, slot, m, held_ptr, work_ptr, csrc_ptr, cdst_ptr, cn_ptr, cnt_ptr,
                    width, res_base, host_base, stride_held, stride_w, stride_c, lat_ptr + slot * stride_lag,
                    keep, K_PAD, H_CHUNK,
                )  # fmt: skip


@triton.jit
def _select_kernel(
    s_ptr, key_ptr, bt_ptr, out_ptr, len_ptr, newlen_ptr, cfg_ptr, ent_ptr, rem_ptr, cnt_ptr,
    held_ptr, work_ptr, csrc_ptr, cdst_ptr, cn_ptr, flag_ptr, lcol_ptr, lat_ptr, ln_ptr, tag_ptr,
    layer, L, W, width, res_base, host_base,
    stride_s, stride_bt, stride_cfg, stride_e, stride_held, stride_w, stride_c, stride_lag,
    BS: tl.constexpr, BLOCK_W: tl.constexpr, L_PAD: tl.constexpr, RATE: tl.constexpr,
    K_PAD: tl.constexpr, H_CHUNK: tl.constexpr, TIER: tl.constexpr, PHASE: tl.constexpr,
):  # fmt: skip
    """budget_ref, choose_ref, tables_ref (and stage_ref with a host tier) for one row, over its columns
    in chunks of BLOCK_W: a pass costs the row's blocks, not the table's width (at 32k tokens in a
    server that takes 128k, a sixth). PHASE 0: every row (no lag in the step); 1: the rows `assemble`
    did not flag; 2: the flagged rows' next choice (no table: `out` is scratch). In phases 1 and 2 a
    lag-1 row's choice is kept for the next step (`remember_ref`), even when its context is covered."""
    r = tl.program_id(0).to(tl.int64)
    slot = tl.load(cfg_ptr + r * stride_cfg + SLOT).to(tl.int64)
    length = tl.load(len_ptr + r)
    if _left_alone(flag_ptr, cn_ptr, r, TIER, PHASE):
        return
    row_in = bt_ptr + r * stride_bt
    row_out = out_ptr + r * stride_bt
    srow = s_ptr + r * stride_s
    if slot < 0:  # another request's row: its table as it is
        _copy_row(row_in, row_out, W, BLOCK_W)
        tl.store(newlen_ptr + r, length)
        return
    # a lag-1 row (phases 1 and 2): its choice kept for the next step
    keep = slot < 0  # False
    if PHASE != 0:
        keep = tl.load(cfg_ptr + r * stride_cfg + LAG) > 0
    n, sink, ws, n_cand = _geometry(cfg_ptr, len_ptr, r, stride_cfg, BS)
    # int32 scalars from here: per-column arithmetic against int64 would widen every column
    n, sink, ws = n.to(tl.int32), sink.to(tl.int32), ws.to(tl.int32)
    hi = tl.minimum(ws, W)  # candidates: columns [sink, hi)
    k = tl.load(cfg_ptr + r * stride_cfg + RETRIEVE).to(tl.int64)
    k_sel = tl.minimum(k, n_cand)
    if tl.load(cfg_ptr + r * stride_cfg + METHOD) == ACTQKV:
        k_sel = _layer_blocks(
            srow, hi, W, ent_ptr, rem_ptr, slot, k, n_cand, layer, L, width, stride_e, BLOCK_W, L_PAD, RATE
        )
    off = tl.load(cfg_ptr + r * stride_cfg + OFFLOAD)
    covered = (n_cand <= k) & (off <= 0)  # a covered context keeps its table: full attention bit for bit
    if covered & (keep == 0):
        _copy_row(row_in, row_out, W, BLOCK_W)
        tl.store(newlen_ptr + r, length)
        return
    table = (covered == 0) & (PHASE != 2)  # the row's new table is written (not only its choice)
    # the k_sel best finite candidates: t, the kk-th largest of an int32 key whose order is the float's
    # (`_kth_largest`); those above t and the first of those equal to t in column order; the chosen
    # columns compacted in ascending order (no sort)
    c = tl.arange(0, BLOCK_W)
    krow = key_ptr + r * W  # the row's keys (scratch), written once here, read by every pass after
    cnt = tl.zeros([BLOCK_W], tl.int32)  # finite candidates
    for c0 in range(0, hi, BLOCK_W):  # keys of whole chunks (INT_MIN outside [sink, hi)), read whole
        x = tl.load(srow + c0 + c, mask=c0 + c < W, other=float("-inf"))
        key, ok = _keys(x, c0 + c, sink, hi)
        tl.store(krow + c0 + c, key, mask=c0 + c < W)
        cnt += ok.to(tl.int32)
    kk = tl.minimum(k_sel, tl.sum(cnt, axis=0)).to(tl.int32)
    tl.debug_barrier()  # the keys stored by all threads are visible
    t = _kth_largest(krow, hi, W, tl.maximum(kk, 1), BLOCK_W)
    both = tl.zeros([BLOCK_W], tl.int64)  # keys > t and keys = t, in one int64
    for c0 in range(0, hi, BLOCK_W):
        key = tl.load(krow + c0 + c, mask=c0 + c < W, other=-2147483648)
        both += (key > t).to(tl.int64) + (((key == t) & (key != -2147483648)).to(tl.int64) << 32)
    both_n = tl.sum(both, axis=0)
    need = kk - (both_n & 0xFFFFFFFF).to(tl.int32)
    ties = need < (both_n >> 32).to(tl.int32)  # ties at t: the first `need` of them in column order
    m = kk  # exactly kk taken: those above t, then `need` of those at t
    # the row's entries, chunk by chunk: sink in place, the chosen compacted after it, the window
    taken = sink * 0  # chosen in earlier chunks
    seen = sink * 0  # keys = t in earlier chunks
    for c0 in range(0, n, BLOCK_W):
        cols = c0 + c
        key = tl.load(krow + cols, mask=(cols >= sink) & (cols < hi), other=-2147483648)
        gt = (key > t).to(tl.int32)
        eq = ((key == t) & (key != -2147483648)).to(tl.int32)
        if ties:
            before = seen + tl.cumsum(eq, axis=0) - eq
            seen += tl.sum(eq, axis=0)
            eq = tl.where(before < need, eq, 0)
        take = tl.where(kk > 0, gt | eq, 0)
        at = tl.where(
            take > 0,
            sink + taken + tl.cumsum(take, axis=0) - take,
            tl.where(cols < sink, cols, sink + m - ws + cols),
        )
        used = (cols < sink) | (take > 0) | ((cols >= ws) & (cols < n))
        # otherwise the chosen entries only (phase 2: staging reads them), or nothing
        used = tl.where(table, used, (take > 0) & (PHASE == 2))
        tl.store(row_out + at, tl.load(row_in + cols, mask=used), mask=used)
        if keep:  # the chosen columns, ascending; reserved positions: none unless staged below
            j = taken + tl.cumsum(take, axis=0) - take
            tl.store(lcol_ptr + slot * stride_lag + j, cols, mask=take > 0)
            tl.store(lat_ptr + slot * stride_lag + j, -1, mask=take > 0)
        taken += tl.sum(take, axis=0)
    _finish_row(
        r, slot, m, keep, covered, off, sink, ws, length, row_in, row_out, newlen_ptr, cfg_ptr, cnt_ptr,
        ln_ptr, tag_ptr, held_ptr, work_ptr, csrc_ptr, cdst_ptr, cn_ptr, lat_ptr, W, width, res_base,
        host_base, stride_cfg, stride_held, stride_w, stride_c, stride_lag, BS, BLOCK_W, K_PAD, H_CHUNK,
        TIER, PHASE,
    )  # fmt: skip


@triton.jit
def _select_part_kernel(
    s_ptr, cfg_ptr, len_ptr, flag_ptr, ckey_ptr, ccol_ptr, cn_ptr, st_ptr, W, width,
    stride_s, stride_cfg, stride_cr, stride_cp, stride_sr,
    BS: tl.constexpr, BLOCK_S: tl.constexpr, PHASE: tl.constexpr,
):  # fmt: skip
    """`select` split over programs (`split`), part 1 of 2, program (row, p) for the row's columns
    [p BLOCK_S, (p + 1) BLOCK_S), held in registers: the softmax sums of its scores (max, sum exp, sum
    exp x, finite candidates: `st`) and its best candidates, as many as the row may take at any layer
    (ActQKV: min(2k, width); else k), ties in column order, their keys and columns compacted in column
    order (`ckey`, `ccol`, their number `cn`). The row's choice is among them: a column among a row's k
    best is among its part's k best."""
    r = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    slot = tl.load(cfg_ptr + r * stride_cfg + SLOT)
    if _left_alone(flag_ptr, cn_ptr, r, False, PHASE):
        return
    if slot < 0:
        return
    _, sink, ws, n_cand = _geometry(cfg_ptr, len_ptr, r, stride_cfg, BS)
    hi = tl.minimum(ws, W).to(tl.int32)
    at = st_ptr + r * stride_sr + part * 4
    if part * BLOCK_S >= hi:  # past the row's candidates: nothing (their scores are -inf)
        tl.store(at, float("-inf"))
        tl.store(at + 1, 0.0)
        tl.store(at + 2, 0.0)
        tl.store(at + 3, 0.0)
        tl.store(cn_ptr + r * tl.num_programs(1) + part, 0)
        return
    k = tl.load(cfg_ptr + r * stride_cfg + RETRIEVE)
    if tl.load(cfg_ptr + r * stride_cfg + METHOD) == ACTQKV:
        k = tl.minimum(2 * k, width)
    cols = part * BLOCK_S + tl.arange(0, BLOCK_S)
    x = tl.load(s_ptr + r * stride_s + cols, mask=cols < W, other=float("-inf"))
    key, ok = _keys(x, cols, sink.to(tl.int32), hi)
    cnt = tl.sum(ok.to(tl.int32), axis=0)
    live = x > float("-inf")  # as `_layer_blocks` (and budget_ref) count them: every column
    mx = tl.max(tl.where(live, x, float("-inf")), axis=0)
    dx = tl.where(live, x - tl.where(mx > float("-inf"), mx, 0.0), 0.0)
    e = tl.where(live, tl.exp(dx), 0.0)
    tl.store(at, mx)
    tl.store(at + 1, tl.sum(e, axis=0))
    tl.store(at + 2, tl.sum(e * dx, axis=0))
    tl.store(at + 3, cnt.to(tl.float32))
    kk = tl.minimum(tl.minimum(k, n_cand).to(tl.int32), cnt)
    take = _top_in_order(key, kk)
    pos = tl.cumsum(take, axis=0) - take
    base = r * stride_cr + part * stride_cp
    tl.store(ckey_ptr + base + pos, key, mask=take > 0)
    tl.store(ccol_ptr + base + pos, cols, mask=take > 0)
    tl.store(cn_ptr + r * tl.num_programs(1) + part, kk)


@triton.jit
def _select_merge_kernel(
    ckey_ptr, ccol_ptr, cn_ptr, st_ptr, bt_ptr, out_ptr, len_ptr, newlen_ptr, cfg_ptr, ent_ptr, rem_ptr,
    cnt_ptr, held_ptr, work_ptr, csrc_ptr, cdst_ptr, copies_ptr, flag_ptr, lcol_ptr, lat_ptr, ln_ptr,
    tag_ptr, layer, L, W, width, res_base, host_base, parts,
    stride_bt, stride_cfg, stride_e, stride_held, stride_w, stride_c, stride_lag, stride_cr, stride_cp,
    stride_sr,
    BS: tl.constexpr, BLOCK_W: tl.constexpr, L_PAD: tl.constexpr, RATE: tl.constexpr, K_PAD: tl.constexpr,
    P_PAD: tl.constexpr, H_CHUNK: tl.constexpr, TIER: tl.constexpr, PHASE: tl.constexpr,
):  # fmt: skip
    """Part 2 of 2, one program a row: `_select_kernel`'s result from the parts' sums and candidates
    (the row's k_sel best among them, ties in column order: the candidates are in column order), the
    table written from the chosen columns, the sink and the window only (not a pass over the row)."""
    r = tl.program_id(0).to(tl.int64)
    slot = tl.load(cfg_ptr + r * stride_cfg + SLOT).to(tl.int64)
    length = tl.load(len_ptr + r)
    if _left_alone(flag_ptr, copies_ptr, r, TIER, PHASE):
        return
    row_in = bt_ptr + r * stride_bt
    row_out = out_ptr + r * stride_bt
    if slot < 0:
        _copy_row(row_in, row_out, W, BLOCK_W)
        tl.store(newlen_ptr + r, length)
        return
    keep = slot < 0  # False
    if PHASE != 0:
        keep = tl.load(cfg_ptr + r * stride_cfg + LAG) > 0
    n, sink, ws, n_cand = _geometry(cfg_ptr, len_ptr, r, stride_cfg, BS)
    n, sink, ws = n.to(tl.int32), sink.to(tl.int32), ws.to(tl.int32)
    k = tl.load(cfg_ptr + r * stride_cfg + RETRIEVE).to(tl.int64)
    pp = tl.arange(0, P_PAD)
    pm = pp < parts
    at = st_ptr + r * stride_sr + pp * 4
    mp = tl.load(at, mask=pm, other=float("-inf"))
    zp = tl.load(at + 1, mask=pm, other=0.0)
    sp = tl.load(at + 2, mask=pm, other=0.0)
    finite = tl.sum(tl.load(at + 3, mask=pm, other=0.0), axis=0).to(tl.int32)
    dm = tl.where(zp > 0, mp - tl.max(mp, axis=0), 0.0)  # each part's max against the row's
    w = tl.where(zp > 0, tl.exp(dm), 0.0)
    z = tl.sum(zp * w, axis=0)
    s1 = tl.sum(w * (sp + dm * zp), axis=0)
    k_sel = tl.minimum(k, n_cand)
    if tl.load(cfg_ptr + r * stride_cfg + METHOD) == ACTQKV:
        k_sel = _budget_blocks(
            z, s1, ent_ptr, rem_ptr, slot, k, n_cand, layer, L, width, stride_e, L_PAD, RATE
        )  # fmt: skip
    off = tl.load(cfg_ptr + r * stride_cfg + OFFLOAD)
    covered = (n_cand <= k) & (off <= 0)
    if covered & (keep == 0):
        _copy_row(row_in, row_out, W, BLOCK_W)
        tl.store(newlen_ptr + r, length)
        return
    table = (covered == 0) & (PHASE != 2)
    kk = tl.minimum(k_sel, finite).to(tl.int32)
    i = tl.arange(0, P_PAD * K_PAD)  # the parts' candidates, part by part: in column order
    ip = i // K_PAD
    ok = (ip < parts) & (i % K_PAD < tl.load(cn_ptr + r * parts + ip, mask=ip < parts, other=0))
    src = r * stride_cr + ip * stride_cp + i % K_PAD
    key = tl.load(ckey_ptr + src, mask=ok, other=-2147483648)
    col = tl.load(ccol_ptr + src, mask=ok, other=0)
    take = _top_in_order(key, kk)
    pos = tl.cumsum(take, axis=0) - take
    m = kk
    used = tl.where(table, take > 0, (take > 0) & (PHASE == 2))  # a covered row's is copied whole below
    tl.store(row_out + sink + pos, tl.load(row_in + col, mask=used), mask=used)
    if table:  # the sink in place, the window after the chosen
        c = tl.arange(0, BLOCK_W)
        for c0 in range(0, sink, BLOCK_W):
            cs = c0 + c
            tl.store(row_out + cs, tl.load(row_in + cs, mask=cs < sink), mask=cs < sink)
        for c0 in range(ws, n, BLOCK_W):
            cs = c0 + c
            tl.store(row_out + sink + m - ws + cs, tl.load(row_in + cs, mask=cs < n), mask=cs < n)
    if keep:
        tl.store(lcol_ptr + slot * stride_lag + pos, col, mask=take > 0)
        tl.store(lat_ptr + slot * stride_lag + pos, -1, mask=take > 0)
    _finish_row(
        r, slot, m, keep, covered, off, sink, ws, length, row_in, row_out, newlen_ptr, cfg_ptr, cnt_ptr,
        ln_ptr, tag_ptr, held_ptr, work_ptr, csrc_ptr, cdst_ptr, copies_ptr, lat_ptr, W, width, res_base,
        host_base, stride_cfg, stride_held, stride_w, stride_c, stride_lag, BS, BLOCK_W, K_PAD, H_CHUNK,
        TIER, PHASE,
    )  # fmt: skip


@triton.jit
def _assemble_kernel(
    cfg_ptr, bt_ptr, len_ptr, out_ptr, newlen_ptr, flag_ptr, now_ptr, next_ptr,
    lcol_ptr, lat_ptr, ln_ptr, tag_ptr, held_ptr, work_ptr, csrc_ptr, cdst_ptr, cn_ptr, cnt_ptr,
    W, width, res_base, host_base, stride_cfg, stride_bt, stride_out, stride_lag, stride_held, stride_w,
    stride_c, layer_lag, layer_n, layer_out,
    BS: tl.constexpr, BLOCK_W: tl.constexpr, K_PAD: tl.constexpr, C_PAD: tl.constexpr,
    H_CHUNK: tl.constexpr, TIER: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    """lagged_ref and assemble_ref for one row, its two masked configurations (only_rows) and, with a
    host tier, stage_ref of an offloaded row's table: its host ids read where `lag_at` says they were
    staged, unless one is not held there (a block that moved to the host since): then `_stage`. FULL (a
    step without `select` phase 1): a row not flagged keeps its whole table (full attention). Program
    axis 1 is the layer (`layer_*`: the lag views' and outputs' layer strides; one layer: 0)."""
    r = tl.program_id(0).to(tl.int64)
    lyr = tl.program_id(1).to(tl.int64)
    rows = tl.num_programs(0)
    lcol_ptr += lyr * layer_lag
    lat_ptr += lyr * layer_lag
    ln_ptr += lyr * layer_n
    tag_ptr += lyr * layer_n
    out_ptr += lyr * layer_out
    newlen_ptr += lyr * rows
    flag_ptr += lyr * rows
    now_ptr += lyr * rows * COLUMNS
    next_ptr += lyr * rows * COLUMNS
    if TIER:
        tl.store(cn_ptr + r, 0)
    cc = tl.arange(0, C_PAD)
    cm = cc < COLUMNS
    row_cfg = tl.load(cfg_ptr + r * stride_cfg + cc, mask=cm, other=-1)
    slot = tl.load(cfg_ptr + r * stride_cfg + SLOT).to(tl.int64)
    lag = tl.load(cfg_ptr + r * stride_cfg + LAG)
    s = tl.maximum(slot, 0)
    ok = (slot >= 0) & (lag > 0)
    ok = ok & (tl.load(tag_ptr + s) == tl.load(cfg_ptr + r * stride_cfg + POS).to(tl.int64) - 1)
    n, sink, ws, n_cand = _geometry(cfg_ptr, len_ptr, r, stride_cfg, BS)
    n, sink, ws = n.to(tl.int32), sink.to(tl.int32), ws.to(tl.int32)
    m = tl.load(ln_ptr + s)
    j = tl.arange(0, K_PAD)
    live = j < m
    cols = tl.load(lcol_ptr + s * stride_lag + j, mask=live, other=0)
    bad = live & ((cols < sink) | (cols >= ws))
    ok = ok & (tl.sum(bad.to(tl.int32), axis=0) == 0)
    k = tl.load(cfg_ptr + r * stride_cfg + RETRIEVE).to(tl.int64)
    off = tl.load(cfg_ptr + r * stride_cfg + OFFLOAD)
    ok = ok & ((n_cand > k) | (off <= 0) | (m >= n_cand))  # covered and offloaded: every candidate
    tl.store(flag_ptr + r, ok.to(tl.int32))
    tl.store(now_ptr + r * COLUMNS + cc, tl.where((cc == SLOT) & ok, -1, row_cfg), mask=cm)
    tl.store(next_ptr + r * COLUMNS + cc, tl.where((cc == SLOT) & (ok == 0), -1, row_cfg), mask=cm)
    length = tl.load(len_ptr + r)
    row_in = bt_ptr + r * stride_bt
    row_out = out_ptr + r * stride_out
    if ok == 0:
        if FULL:
            _copy_row(row_in, row_out, W, BLOCK_W)
            tl.store(newlen_ptr + r, length)
        return
    if (n_cand <= k) & (off <= 0):  # covered: full attention bit for bit
        _copy_row(row_in, row_out, W, BLOCK_W)
        tl.store(newlen_ptr + r, length)
        return
    c = tl.arange(0, BLOCK_W)
    for c0 in range(0, sink, BLOCK_W):  # the sink in place
        cs = c0 + c
        tl.store(row_out + cs, tl.load(row_in + cs, mask=cs < sink), mask=cs < sink)
    ids = tl.load(row_in + cols, mask=live, other=0)
    mapped = ids
    missing = m * 0
    if TIER:
        if off > 0:
            host = live & (ids >= host_base)
            pos = tl.load(lat_ptr + s * stride_lag + j, mask=host, other=-1)
            there = tl.load(held_ptr + s * stride_held + tl.maximum(pos, 0), mask=host, other=-1)
            missing = tl.sum((host & ((pos < 0) | (there != ids))).to(tl.int32), axis=0)
            if missing == 0:
                mapped = tl.where(host, (res_base + s * width + pos).to(ids.dtype), ids)
    tl.store(row_out + sink + j, mapped, mask=live)
    for c0 in range(ws, n, BLOCK_W):  # then the window
        cs = c0 + c
        tl.store(row_out + sink + m - ws + cs, tl.load(row_in + cs, mask=cs < n), mask=cs < n)
    tl.atomic_add(cnt_ptr, m.to(tl.int64))
    tl.atomic_add(cnt_ptr + 1, 1)
    tl.store(newlen_ptr + r, ((sink + m) * BS + length - ws * BS).to(length.dtype))
    if TIER:
        if off > 0:
            if missing > 0:  # the blocks of the choice it does not hold: staged as a fresh choice's
                _stage(
                    row_out + sink, r, s, m, held_ptr, work_ptr, csrc_ptr, cdst_ptr, cn_ptr, cnt_ptr, width,
                    res_base, host_base, stride_held, stride_w, stride_c, lat_ptr, False, K_PAD, H_CHUNK,
                )  # fmt: skip


@triton.jit
def _summaries_kernel(
    cfg_ptr, blk_ptr, row_ptr, k_ptr, rq_ptr, rep_ptr, kmin_ptr, kmax_ptr,
    T, scale, stride_cfg, stride_ks, stride_kh, stride_rqs, stride_rqt, stride_xi, stride_xg,
    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, REPS: tl.constexpr,
    HAS_REP: tl.constexpr, HAS_MINMAX: tl.constexpr, USE_DOT: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    r = tl.load(row_ptr + i).to(tl.int64)
    blk = tl.load(blk_ptr + i).to(tl.int64)
    if r < 0 or blk < 0:
        return
    slot = tl.load(cfg_ptr + r * stride_cfg + SLOT).to(tl.int64)
    if slot < 0:
        return
    p = tl.load(cfg_ptr + r * stride_cfg + POS).to(tl.int64)
    j = tl.arange(0, BS)
    d = tl.arange(0, D)
    kb = tl.load(k_ptr + (blk * BS + j)[:, None] * stride_ks + g * stride_kh + d[None, :]).to(tl.float32)
    dst = blk * stride_xi + g * stride_xg + d
    if HAS_MINMAX:
        tl.store(kmin_ptr + dst, tl.min(kb, axis=0).to(kmin_ptr.dtype.element_ty))
        tl.store(kmax_ptr + dst, tl.max(kb, axis=0).to(kmax_ptr.dtype.element_ty))
    if HAS_REP:
        ring = (p - (BS - 1) + j) % T
        received = tl.zeros([BS], tl.float32)
        for h in range(G):
            qh = tl.load(
                rq_ptr + slot * stride_rqs + ring[:, None] * stride_rqt + (g * G + h) * D + d[None, :]
            )
            if USE_DOT:
                logits = tl.dot(qh.to(tl.float32), tl.trans(kb), input_precision="ieee") * scale
            else:  # blocks or heads too small for tl.dot (tests)
                logits = tl.sum(qh.to(tl.float32)[:, None, :] * kb[None, :, :], axis=2) * scale
            e = tl.exp(logits - tl.max(logits, axis=1)[:, None])  # [query, key]
            received += tl.sum(e / tl.sum(e, axis=1)[:, None], axis=0)
        chosen = tl.zeros([BS], tl.int32)
        for _ in range(REPS):
            left = tl.where(chosen > 0, float("-inf"), received)
            best = tl.max(left, axis=0)
            first = tl.min(tl.where(left == best, j, BS), axis=0)
            chosen = tl.where(j == first, 1, chosen)
        rep = tl.sum(tl.where(chosen[:, None] > 0, kb, 0.0), axis=0) / REPS
        tl.store(rep_ptr + dst, rep.to(rep_ptr.dtype.element_ty))


# -- launchers -----------------------------------------------------------------------------------------
def append(
    q: torch.Tensor, cfg: torch.Tensor, ring_q: torch.Tensor, ring_pos: torch.Tensor, ring_bias: torch.Tensor,
    mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, cap: float,
) -> None:  # fmt: skip
    rows, c = q.shape[0], mean.shape[1]
    qf = q.reshape(rows, c)
    _append_kernel[(rows,)](
        qf, cfg, ring_q, ring_pos, ring_bias, mean, var, count, float(cap), c, ring_q.shape[1],
        qf.stride(0), cfg.stride(0), ring_q.stride(0), ring_q.stride(1), ring_pos.stride(0), mean.stride(0),
        BLOCK_C=triton.next_power_of_2(c), num_warps=8,
    )  # fmt: skip


def query_vectors(
    q: torch.Tensor, cfg: torch.Tensor, ring_q: torch.Tensor, ring_pos: torch.Tensor, ring_bias: torch.Tensor,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    rows, hq, d = q.shape
    g = hq // kv_heads
    a = torch.empty(rows, kv_heads, d, dtype=torch.float32, device=q.device)
    b = torch.empty_like(a)
    qf = q.reshape(rows, hq * d)
    t = ring_q.shape[1]
    _query_vectors_kernel[(rows, kv_heads)](
        qf, cfg, ring_q, ring_pos, ring_bias, a, b, t, qf.stride(0), cfg.stride(0), ring_q.stride(0),
        ring_q.stride(1), ring_pos.stride(0), a.stride(0),
        G=g, G_PAD=triton.next_power_of_2(g), D=d, T_PAD=triton.next_power_of_2(t),
        T_CHUNK=min(32, triton.next_power_of_2(t)), num_warps=8,
    )  # fmt: skip
    return a, b


def scores(
    a: torch.Tensor, b: torch.Tensor, cfg: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    rep: torch.Tensor | None, kmin: torch.Tensor | None, kmax: torch.Tensor | None, block_size: int,
    block_w: int = 8,
) -> torch.Tensor:  # fmt: skip
    """Small column tiles (8 blocks x every KV head's summary): many programs even at batch 1."""
    rows, w = tables.shape
    x = rep if rep is not None else kmax
    assert x is not None
    hd = triton.next_power_of_2(x.shape[1] * x.shape[2])
    out = torch.empty(rows, w, dtype=torch.float32, device=a.device)
    _scores_kernel[(rows, triton.cdiv(w, block_w))](
        a, b, cfg, tables, lens, rep if rep is not None else x, kmin if kmin is not None else x,
        kmax if kmax is not None else x, out, w, a.stride(0), cfg.stride(0), tables.stride(0), x.stride(0),
        x.stride(1), out.stride(0),
        HK=x.shape[1], D=x.shape[2], HD_PAD=hd, BS=block_size, BLOCK_W=block_w, HAS_REP=rep is not None,
        HAS_MINMAX=kmin is not None and kmax is not None, num_warps=8 if block_w * hd >= 8192 else 4,
    )  # fmt: skip
    return out


class Lagged(NamedTuple):
    """What `assemble` returns: the lagged rows' tables and lengths (others' undefined until `select`
    phase 1 writes them), which rows are lagged [R] int32, the configuration of the others and of them."""

    out: torch.Tensor
    new_len: torch.Tensor
    flag: torch.Tensor
    cfg_now: torch.Tensor
    cfg_next: torch.Tensor
    copies: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # with a tier: (src, dst, count)


def assemble(
    cfg: torch.Tensor, bt: torch.Tensor, lens: torch.Tensor, lag_cols: torch.Tensor, lag_at: torch.Tensor,
    lag_n: torch.Tensor, lag_tag: torch.Tensor, tier: tuple[torch.Tensor, int, int] | None,
    counters: torch.Tensor, block_size: int, chunk: int = 2048, full: bool = False,
) -> Lagged:  # fmt: skip
    """`lagged_ref`, `assemble_ref` (with `stage_ref` for offloaded rows) and the two `only_rows`
    configurations in one launch; `tier` = (held [S, width], first reserved id, first host id) with a
    host tier: then `copies` lists the lagged rows' recalls, which `select` phase 1 completes with the
    other rows' (one `KVTier.recall` for both). `full` (a step that runs no phase 1; not with a tier,
    whose tables may hold host ids): the rows not flagged get their whole tables and lengths.

    Every layer at once (not with a tier): `lag_cols`, `lag_at` [L, S, width], `lag_n`, `lag_tag` [L, S]
    give each output a leading layer dimension (out [L, R, W], ...), one launch for a step whose choices
    were all made at the previous step, instead of one a layer."""
    if full and tier is not None:
        raise ValueError("assemble: full tables for rows not flagged would hand host ids to attention")
    layers = lag_cols.shape[0] if lag_cols.dim() == 3 else None
    if layers is not None and tier is not None:
        raise ValueError("assemble: every layer at once is not for a host tier (its staging is per layer)")
    rows, w = bt.shape
    width = lag_cols.shape[-1]
    lead = (layers,) if layers is not None else ()
    out = torch.empty(*lead, rows, w, dtype=bt.dtype, device=bt.device)
    new_len = torch.empty(*lead, rows, dtype=lens.dtype, device=lens.device)
    flag = torch.empty(*lead, rows, dtype=torch.int32, device=bt.device)
    cfg_now = torch.empty(*lead, rows, ref.COLUMNS, dtype=cfg.dtype, device=cfg.device)
    cfg_next = torch.empty_like(cfg_now)
    copies = None
    if tier is not None:
        held, res_base, host_base = tier
        assert held.shape[1] == width
        work = torch.empty(rows, 2 * width, dtype=torch.int32, device=bt.device)
        src = torch.empty(rows, width, dtype=torch.int32, device=bt.device)
        dst, count = torch.empty_like(src), torch.empty(rows, dtype=torch.int32, device=bt.device)
        copies = (src, dst, count)
    else:
        held, res_base, host_base = lag_at, 0, 2**31 - 1
        work = src = dst = count = lag_at
    if layers is not None:
        assert lag_at.stride() == lag_cols.stride() and lag_n.stride(0) == lag_tag.stride(0)
        per = (lag_cols.stride(0), lag_n.stride(0), out.stride(0))
    else:
        per = (0, 0, 0)
    _assemble_kernel[(rows, layers or 1)](
        cfg, bt, lens, out, new_len, flag, cfg_now, cfg_next, lag_cols, lag_at, lag_n, lag_tag, held,
        work, src, dst, count, counters, w, width, res_base, host_base, cfg.stride(0), bt.stride(0),
        out.stride(-2), lag_cols.stride(-2), held.stride(-2), work.stride(0), src.stride(0), *per,
        BS=block_size, BLOCK_W=min(chunk, max(16, triton.next_power_of_2(w))),
        K_PAD=triton.next_power_of_2(width), C_PAD=triton.next_power_of_2(ref.COLUMNS), H_CHUNK=32,
        TIER=tier is not None, FULL=full, num_warps=4,
    )  # fmt: skip
    return Lagged(out, new_len, flag, cfg_now, cfg_next, copies)


def select(
    sc: torch.Tensor, bt: torch.Tensor, lens: torch.Tensor, cfg: torch.Tensor, entropy: torch.Tensor,
    remaining: torch.Tensor, counters: torch.Tensor, layer: int, width: int, block_size: int, rate: float,
    tier: tuple[torch.Tensor, int, int] | None = None, chunk: int | None = None, num_warps: int | None = None,
    lag: tuple[Any, ...] | None = None, split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:  # fmt: skip
    """`budget_ref`, `choose_ref`, `tables_ref` and, with `tier` = (held [S, width], first reserved id,
    first host id), `stage_ref`, in one launch: (new tables, new lengths, the copies to make or None);
    state updated in place. A new table's entries past its new length are undefined. `chunk`: columns
    a pass over a row takes at once (a power of two; narrower tables: their width; default SELECT_CHUNK),
    `num_warps` default SELECT_WARPS. `lag` = (flag,
    lag_cols, lag_at, lag_n, lag_tag, phase, out, new_len): phase 1 (out and new_len from `assemble`,
    written for the rows not flagged) or 2 (the flagged rows' next choice; the tables returned are
    scratch), both keeping lag-1 rows' choices (`remember_ref`). `split` (default SELECT_SPLIT; 0: one
    program a row): columns a program takes in `_select_part_kernel` (a power of two), then
    `_select_merge_kernel` a row (two launches)."""
    rows, w = bt.shape
    phase = 0
    flag = lcols = lat = ln = tag = lens
    out = new_len = given = None
    if lag is not None:
        flag, lcols, lat, ln, tag, phase, out, new_len, given = lag
    out = torch.empty_like(bt) if out is None else out
    new_len = torch.empty_like(lens) if new_len is None else new_len
    block = min(chunk or SELECT_CHUNK, max(16, triton.next_power_of_2(w)))
    if tier is not None:
        held, res_base, host_base = tier
        assert held.shape[1] == width
        work = torch.empty(rows, 2 * width, dtype=torch.int32, device=bt.device)
        if given is not None:
            src, dst, count = given
        else:
            src = torch.empty(rows, width, dtype=torch.int32, device=bt.device)
            dst, count = torch.empty_like(src), torch.empty(rows, dtype=torch.int32, device=bt.device)
    else:
        held, res_base, host_base = bt, 0, 0
        work = src = dst = bt
        count = lens
    split = SELECT_SPLIT if split is None else split
    if split:
        _select_split(
            sc, bt, out, lens, new_len, cfg, entropy, remaining, counters, held, work, src, dst, count, flag,
            lcols, lat, ln, tag, layer, width, res_base, host_base, block_size, rate, block, phase,
            tier is not None, lcols.stride(0) if lag is not None else 0, split, num_warps or SELECT_WARPS,
        )  # fmt: skip
        return out, new_len, ((src, dst, count) if tier is not None else None)
    keys = torch.empty(rows, w, dtype=torch.int32, device=bt.device)  # scratch: each row's score keys
    _select_kernel[(rows,)](
        sc, keys, bt, out, lens, new_len, cfg, entropy, remaining, counters, held, work, src, dst, count,
        flag, lcols, lat, ln, tag,
        layer, entropy.shape[1], w, width, res_base, host_base, sc.stride(0), bt.stride(0), cfg.stride(0),
        entropy.stride(0), held.stride(0), work.stride(0), src.stride(0),
        lcols.stride(0) if lag is not None else 0,
        BS=block_size, BLOCK_W=block, L_PAD=triton.next_power_of_2(entropy.shape[1]), RATE=rate,
        K_PAD=triton.next_power_of_2(width), H_CHUNK=32, TIER=tier is not None, PHASE=phase,
        num_warps=num_warps or SELECT_WARPS,
    )  # fmt: skip
    return out, new_len, ((src, dst, count) if tier is not None else None)


def _select_split(
    sc: torch.Tensor, bt: torch.Tensor, out: torch.Tensor, lens: torch.Tensor, new_len: torch.Tensor,
    cfg: torch.Tensor, entropy: torch.Tensor, remaining: torch.Tensor, counters: torch.Tensor,
    held: torch.Tensor, work: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, count: torch.Tensor,
    flag: torch.Tensor, lcols: torch.Tensor, lat: torch.Tensor, ln: torch.Tensor, tag: torch.Tensor,
    layer: int, width: int, res_base: int, host_base: int, block_size: int, rate: float, block: int,
    phase: int, tier: bool, stride_lag: int, split: int, num_warps: int,
) -> None:  # fmt: skip
    """`select`'s two launches over parts of `split` columns (see `_select_part_kernel`)."""
    if split < 4 or split & (split - 1):
        raise ValueError(f"select: split must be a power of two >= 4, got {split}")
    rows, w = bt.shape
    parts = triton.cdiv(w, split)
    k_pad = triton.next_power_of_2(width)
    ckey = torch.empty(rows, parts, k_pad, dtype=torch.int32, device=bt.device)
    ccol = torch.empty_like(ckey)
    cn = torch.empty(rows, parts, dtype=torch.int32, device=bt.device)
    st = torch.empty(rows, parts, 4, dtype=torch.float32, device=bt.device)
    _select_part_kernel[(rows, parts)](
        sc, cfg, lens, flag, ckey, ccol, cn, st, w, width, sc.stride(0), cfg.stride(0), ckey.stride(0),
        ckey.stride(1), st.stride(0), BS=block_size, BLOCK_S=split, PHASE=phase,
        num_warps=4 if split <= 1024 else 8,
    )  # fmt: skip
    _select_merge_kernel[(rows,)](
        ckey, ccol, cn, st, bt, out, lens, new_len, cfg, entropy, remaining, counters, held, work, src, dst,
        count, flag, lcols, lat, ln, tag, layer, entropy.shape[1], w, width, res_base, host_base, parts,
        bt.stride(0), cfg.stride(0), entropy.stride(0), held.stride(0), work.stride(0), src.stride(0),
        stride_lag, ckey.stride(0), ckey.stride(1), st.stride(0),
        BS=block_size, BLOCK_W=block, L_PAD=triton.next_power_of_2(entropy.shape[1]), RATE=rate, K_PAD=k_pad,
        P_PAD=triton.next_power_of_2(parts), H_CHUNK=32, TIER=tier, PHASE=phase, num_warps=num_warps,
    )  # fmt: skip


def summaries(
    cfg: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor, k_cache: torch.Tensor, ring_q: torch.Tensor,
    rep: torch.Tensor | None, kmin: torch.Tensor | None, kmax: torch.Tensor | None, block_size: int,
    scale: float, count: int,
) -> None:  # fmt: skip
    """One program per (filled block, KV head); rows[i] < 0 or blocks[i] < 0: nothing filled."""
    if blocks.numel() == 0:
        return
    hq, d = ring_q.shape[2], ring_q.shape[3]
    hk = k_cache.shape[1]
    x = rep if rep is not None else kmax
    assert x is not None
    _summaries_kernel[(blocks.shape[0], hk)](
        cfg, blocks, rows, k_cache, ring_q, rep if rep is not None else x, kmin if kmin is not None else x,
        kmax if kmax is not None else x, ring_q.shape[1], scale, cfg.stride(0), k_cache.stride(0),
        k_cache.stride(1), ring_q.stride(0), ring_q.stride(1), x.stride(0), x.stride(1),
        G=hq // hk, D=d, BS=block_size, REPS=count, HAS_REP=rep is not None,
        HAS_MINMAX=kmin is not None and kmax is not None, USE_DOT=block_size >= 16 and d >= 16,
    )  # fmt: skip
