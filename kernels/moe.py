"""Fused mixture-of-experts layer on the GPU: each row's chosen experts' gated MLPs and the weighted sum
back per row, reading only the chosen experts' weights (reference: kernels/moe_ref.py, same layout,
same rounding points).

A step's (row, column) *pairs* (pair = row * k + column; each column holds one chosen expert, or -1)
go through one of two paths, picked by the row count alone (a CUDA-graph bucket always takes the same):
- **decode** (few rows): one program per (row, group of columns, output tile) streams the chosen
  slots' weight tiles (a broadcast-multiply-sum, fp32 accumulation); no sorting. A -1 column runs no
  loop iteration at all, so a step padded to a wider k (per-request top_k) launches as many programs as
  a plain one and reads no more weights;
- **grouped** (prefill, larger batches): `moe_align` sorts the pairs by slot into blocks of `block_m`
  (each block one slot, padded with a pad index), then a grouped GEMM (`tl.dot`) per (block, tile)
  reads each chosen slot's weights once per block of its rows.

Both run gate/up -> silu·mul -> down as two kernels (the activation fused into the first kernel's
epilogue), the routing weight applied to the down product in float32, and the columns summed per row in
column order (a -1 column adds +0.0: bit-identical to a narrower step). Shapes are fixed by the row count
and the width k (the grouped path sizes its buffers for the worst case), nothing reads back to the host:
capturable in CUDA graphs.

*Expert ids, slots and host memory*: a column holds an expert id. Without a `table` the id is the slot
(every expert resident, slot = id). With a table [experts] int32 (an expert cache,
server/layers/expert_cache.py) each pair reads its expert's slot from the table inside the kernel; a
slot of -1 (not resident) makes the kernel read that expert's weights from `host`, the pinned host copy
[experts, ...], through its unified-virtual-address pointer (zero-copy over PCIe), in the same launch. The
arithmetic does not depend on where the weights come from, so a step's bits are the all-resident ones
whatever the table says, and no host sync is needed to make an expert resident first. `counts`
[experts] int32 (optional) adds each routed pair to its expert: the cache's statistics, read between steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from actserve.kernels.moe_ref import PendingSum
from actserve.kernels.pdl import pdl_args, pdl_sync

# the decode path runs up to DECODE_MAX_ROWS rows, and beyond while the pairs (rows x top_k) are at most
# half the slots (few rows share an expert, so reading each pair's expert is not much more than each
# chosen expert once); the grouped path otherwise. From bench/moe_kernel.py on the H200: Mixtral at 8 rows
# grouped 569 us, decode 1090; Qwen3-30B-A3B at 8 rows (64 pairs, 128 experts) decode 163, grouped 193
DECODE_MAX_ROWS = 4
DECODE_LIMIT_ROWS = 16
# programs a decode kernel aims for; columns are split over programs until the grid reaches it
DECODE_TARGET_PROGRAMS = 1024
# A/B switch for the down kernel's first tile read before the PDL wait (`_decode_down_kernel` EARLY)
DOWN_EARLY = os.environ.get("ACTSERVE_MOE_DOWN_EARLY", "1") == "1"


@dataclass(frozen=True)
class DecodeConfig:
    """One decode kernel's launch (gate/up or down). H200 sweep (bench/results/moe_kernel.json): 8 warps
    beat 4 (Mixtral b1 256 -> 181 us). `target_programs`: the grid the columns are split to fill (None:
    DECODE_TARGET_PROGRAMS); 1 keeps every column of a row in one program (the down kernel then adds the
    columns itself, no sum kernel)."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 8
    num_stages: int = 3
    target_programs: int | None = None


def pick_decode(hidden: int, inter: int, rows: int) -> tuple[DecodeConfig, DecodeConfig]:
    """(gate/up, down) launch configs of the decode path for an expert shape and row count. From the H200
    sweep (bench/results/moe_decode_sweep.json, Qwen3-30B-A3B's 2048 x 768 experts): at 4 rows gate/up
    16 x 512 with 4 warps and down 32 x 128 with 4 warps take 81.7 us against the default's 96.4; at 1
    row no config beats the default by more than 2 %, so it stays (as for Mixtral's large experts)."""
    if inter <= 1024 and 2 <= rows <= 4:
        return DecodeConfig(16, 512, 4, 4), DecodeConfig(32, 128, 4, 3)
    return DecodeConfig(), DecodeConfig()


@dataclass(frozen=True)
class GroupedConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def pick_grouped(pairs: int, num_slots: int) -> GroupedConfig:
    """Small row blocks when few pairs share a slot (less padding), large when many do; the H200 sweep's
    winners (bench/results/moe_kernel.json: Mixtral 64 rows 810 -> 721 us, 2048 rows 3935 -> 3141)."""
    per_slot = pairs / max(1, min(num_slots, pairs))
    if per_slot < 8:
        return GroupedConfig(16, 128, 64, 4, 4)
    if per_slot <= 64:
        return GroupedConfig(64, 64, 64, 4, 3)
    return GroupedConfig(128, 128, 64, 8, 3)


def takes_decode(rows: int, active_k: int, num_slots: int) -> bool:
    """The path for `rows` rows of `active_k` experts each (fixed per row count: a graph bucket always
    takes the same, and a row's bits do not depend on the step's width)."""
    if rows <= DECODE_MAX_ROWS:
        return True
    return rows <= DECODE_LIMIT_ROWS and rows * active_k <= num_slots // 2


def moe_align(slots: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by slot (or by expert id, when a table maps ids to slots in the kernel), each group
    padded to a multiple of `block_m`.

    slots [rows, k] int (-1: none) -> (sorted pair indices [blocks * block_m] int32, pad value rows * k;
    the slot of each block [blocks] int32, -1 for blocks past the last group). `blocks` is the worst case
    for these shapes (every pair valid, each nonempty slot padded by block_m - 1), so shapes depend only
    on (rows, k, num_slots, block_m); device ops only, no host sync. Same result as `align_ref`."""
    pairs = slots.numel()
    dev = slots.device
    flat = slots.reshape(-1).long()
    key = torch.where(flat >= 0, flat, num_slots)  # dropped pairs sort last, into a trash entry
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_slots] + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pairs, device=dev) - start[sorted_key]
    blocks = triton.cdiv(pairs + min(num_slots, pairs) * (block_m - 1), block_m)
    size = blocks * block_m
    first = (pad_end - padded)[sorted_key.clamp(max=num_slots - 1)]
    dest = torch.where(sorted_key < num_slots, first + rank, size)
    sorted_pairs = torch.full((size + 1,), pairs, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(blocks, device=dev) * block_m
    owner = torch.searchsorted(pad_end, block_start, right=True)
    block_slot = torch.where(owner < num_slots, owner, -1).to(torch.int32)
    return sorted_pairs[:size], block_slot


@triton.jit
def _silu_mul(acc_g, acc_u, dtype: tl.constexpr):
    """silu(gate) * up from fp32 accumulators, rounded where transformers rounds (each op's output)."""
    g = acc_g.to(dtype).to(tl.float32)
    u = acc_u.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (act * u).to(dtype)


@triton.jit
def _expert_ptr(w_ptr, host_ptr, table_ptr, e, stride_ws, TABLE: tl.constexpr, HOST: tl.constexpr):
    """Where expert `e`'s matrix starts: slot e (no table), its slot through the table, or (slot -1, with
    HOST) its pinned host copy, read over PCIe. `e` < 0 gives slot 0's address (the caller reads nothing)."""
    safe = tl.maximum(e, 0).to(tl.int64)
    base = w_ptr + safe * stride_ws
    if TABLE:
        slot = tl.load(table_ptr + safe).to(tl.int64)
        base = w_ptr + tl.maximum(slot, 0) * stride_ws
        if HOST:
            base = tl.where(slot >= 0, base, host_ptr + safe * stride_ws)
    return base


@triton.jit
def _decode_up_kernel(
    x_ptr, w13_ptr, host_ptr, table_ptr, cnt_ptr, ids_ptr, inter_ptr, K, H, NI, COLS, stride_ws, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TABLE: tl.constexpr, HOST: tl.constexpr,
    COUNT: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < NI
    dtype = inter_ptr.dtype.element_ty
    pdl_sync(USE_PDL)
    for c in range(0, COLS):
        col = grp * COLS + c
        pair = row * K + col
        e = tl.load(ids_ptr + pair, mask=col < K, other=-1)
        on = (e >= 0).to(tl.int32)  # 0 for a -1 column: its loops run no iteration, its stores none
        if COUNT:
            if tl.program_id(2) == 0:  # one count per pair
                tl.atomic_add(cnt_ptr + tl.maximum(e, 0), on)
        w_base = _expert_ptr(w13_ptr, host_ptr, table_ptr, e, stride_ws, TABLE, HOST)
        g_rows = w_base + rn.to(tl.int64)[:, None] * stride_wn
        u_rows = w_base + (rn + NI).to(tl.int64)[:, None] * stride_wn
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, H * on, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < H
            xv = tl.load(x_ptr + row * H + rk, mask=k_ok, other=0.0).to(tl.float32)
            m = n_ok[:, None] & k_ok[None, :]
            wg = tl.load(g_rows + rk[None, :], mask=m, other=0.0).to(tl.float32)
            wu = tl.load(u_rows + rk[None, :], mask=m, other=0.0).to(tl.float32)
            acc_g += tl.sum(wg * xv[None, :], axis=1)
            acc_u += tl.sum(wu * xv[None, :], axis=1)
        h = _silu_mul(acc_g, acc_u, dtype)
        tl.store(inter_ptr + pair * NI + rn, h, mask=rn < NI * on)


@triton.jit
def _decode_down_kernel(
    inter_ptr, w2_ptr, host_ptr, table_ptr, ids_ptr, wt_ptr, y_ptr, out_ptr, K, H, NI, COLS, stride_ws,
    stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUM: tl.constexpr, TABLE: tl.constexpr,
    HOST: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr = False,
):  # fmt: skip
    """SUM (all K columns in this program): add the columns here and store the row's output; else store
    each pair's weighted product in y for `_sum_kernel`. EARLY (every expert resident, no table): the ids
    were written before the up launch, which waited for them before this launch could start, so the
    first column's first weight tile is read before the PDL wait, streamed while the up kernel drains."""
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < H
    dtype = inter_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rk0 = tl.arange(0, BLOCK_K)
    if EARLY:
        e0 = tl.load(ids_ptr + row * K + grp * COLS, mask=grp * COLS < K, other=-1)
        w0_rows = _expert_ptr(w2_ptr, host_ptr, table_ptr, e0, stride_ws, TABLE, HOST)
        w0_rows += rn.to(tl.int64)[:, None] * stride_wn
        m0 = n_ok[:, None] & (rk0 < NI * (e0 >= 0).to(tl.int32))[None, :]
        w_first = tl.load(w0_rows + rk0[None, :], mask=m0, other=0.0)
    pdl_sync(USE_PDL)
    for c in range(0, COLS):
        col = grp * COLS + c
        pair = row * K + col
        e = tl.load(ids_ptr + pair, mask=col < K, other=-1)
        on = (e >= 0).to(tl.int32)
        w_base = _expert_ptr(w2_ptr, host_ptr, table_ptr, e, stride_ws, TABLE, HOST)
        w_rows = w_base + rn.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_start = c * 0
        if EARLY:
            if c == 0:  # the tile read before the wait: the loop's first iteration
                hv = tl.load(inter_ptr + pair * NI + rk0, mask=rk0 < NI * on, other=0.0).to(tl.float32)
                acc += tl.sum(w_first.to(tl.float32) * hv[None, :], axis=1)
                k_start = c * 0 + BLOCK_K
        for k0 in range(k_start, NI * on, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < NI
            hv = tl.load(inter_ptr + pair * NI + rk, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * hv[None, :], axis=1)
        wt = tl.load(wt_ptr + pair, mask=col < K, other=0.0)
        d = acc.to(dtype).to(tl.float32) * wt
        if SUM:
            total += d  # +0.0 for a -1 column (no iteration, weight 0)
        else:
            tl.store(y_ptr + pair * H + rn, d, mask=rn < H * on)
    if SUM:
        tl.store(out_ptr + row * H + rn, total.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sum_kernel(y_ptr, ids_ptr, out_ptr, K, H, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    """out[row] = sum over columns in order of y[row * K + c] (-1 columns: +0.0), rounded once."""
    row = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < H
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pdl_sync(USE_PDL)
    for c in range(0, K):
        pair = row * K + c
        on = (tl.load(ids_ptr + pair) >= 0).to(tl.int32)
        total += tl.load(y_ptr + pair * H + rn, mask=rn < H * on, other=0.0)
    tl.store(out_ptr + row * H + rn, total.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _grouped_up_kernel(
    x_ptr, w13_ptr, host_ptr, table_ptr, cnt_ptr, sorted_ptr, bslot_ptr, inter_ptr, P, K, H, NI, stride_ws,
    stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    TABLE: tl.constexpr, HOST: tl.constexpr, COUNT: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    e = tl.load(bslot_ptr + pid_b)  # the block's slot, or its expert id when a table maps ids to slots
    on = (e >= 0).to(tl.int32)  # 0 for blocks past the last group: no iteration, no store
    pairs = tl.load(sorted_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
    p_ok = pairs < P
    if COUNT:
        if tl.program_id(1) == 0:
            tl.atomic_add(cnt_ptr + tl.maximum(e, 0), tl.sum(p_ok.to(tl.int32), axis=0) * on)
    rows = (pairs // K).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < NI
    dtype = inter_ptr.dtype.element_ty
    w_base = _expert_ptr(w13_ptr, host_ptr, table_ptr, e, stride_ws, TABLE, HOST)
    g_cols = w_base + rn.to(tl.int64)[None, :] * stride_wn
    u_cols = w_base + (rn + NI).to(tl.int64)[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H * on, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < H
        a = tl.load(x_ptr + rows[:, None] * H + rk[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        wm = k_ok[:, None] & n_ok[None, :]
        bg = tl.load(g_cols + rk[:, None], mask=wm, other=0.0)
        bu = tl.load(u_cols + rk[:, None], mask=wm, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
    h = _silu_mul(acc_g, acc_u, dtype)
    out = inter_ptr + pairs.to(tl.int64)[:, None] * NI + rn[None, :]
    tl.store(out, h, mask=p_ok[:, None] & (rn < NI * on)[None, :])


@triton.jit
def _grouped_down_kernel(
    inter_ptr, w2_ptr, host_ptr, table_ptr, sorted_ptr, bslot_ptr, wt_ptr, y_ptr, P, H, NI, stride_ws,
    stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    TABLE: tl.constexpr, HOST: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    e = tl.load(bslot_ptr + pid_b)
    on = (e >= 0).to(tl.int32)
    pairs = tl.load(sorted_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    p_ok = pairs < P
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < H
    dtype = inter_ptr.dtype.element_ty
    w_base = _expert_ptr(w2_ptr, host_ptr, table_ptr, e, stride_ws, TABLE, HOST)
    w_cols = w_base + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, NI * on, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < NI
        a_ptr = inter_ptr + pairs[:, None] * NI + rk[None, :]
        a = tl.load(a_ptr, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    wt = tl.load(wt_ptr + pairs, mask=p_ok, other=0.0)
    d = acc.to(dtype).to(tl.float32) * wt[:, None]
    tl.store(y_ptr + pairs[:, None] * H + rn[None, :], d, mask=p_ok[:, None] & (rn < H * on)[None, :])


def _groups(rows: int, tiles: int, k: int, active: int, target: int | None) -> int:
    """Programs per (row, tile) for the decode path: enough to fill `target` programs (None:
    DECODE_TARGET_PROGRAMS), at most `active` (the columns expected to hold an expert), so a wider k
    padded with -1 columns keeps the plain grid's size."""
    want = triton.cdiv(target or DECODE_TARGET_PROGRAMS, max(1, rows * tiles))
    return max(1, min(want, active, k))


def _launch(cfg: DecodeConfig) -> dict[str, int]:
    """A decode config's Triton launch arguments."""
    return {
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    path: str = "auto",
    active_k: int | None = None,
    decode_cfg: DecodeConfig | None = None,
    down_cfg: DecodeConfig | None = None,
    grouped_cfg: GroupedConfig | None = None,
    table: torch.Tensor | None = None,
    host: tuple[torch.Tensor, torch.Tensor] | None = None,
    counts: torch.Tensor | None = None,
    defer_sum: bool = False,
) -> torch.Tensor | PendingSum:
    """x [rows, hidden], w13 [slots, 2 * inter, hidden], w2 [slots, hidden, inter] (hidden-/inter-
    contiguous), slots [rows, k] int (-1: none), weights [rows, k] float32 -> [rows, hidden] in x's dtype;
    what `fused_moe_ref` computes. `path`: "auto" (`takes_decode`), "decode" or "grouped". `active_k`:
    how many columns are expected to hold an expert (the model's top_k; default k), which picks the path
    and sizes the decode grid. `decode_cfg` / `down_cfg`: the decode path's gate/up and down launches
    (default `pick_decode`).

    `table` [experts] int32: `slots` holds expert ids, mapped to slots in the kernel; a -1 entry reads
    that expert from `host` = (host_w13 [experts, 2 * inter, hidden], host_w2 [experts, hidden, inter]),
    pinned host memory laid out as the slots (required when the table may hold -1). `counts` [experts]
    int32: each routed pair adds 1 at its expert (with a table: the expert id, else the slot).
    `defer_sum`: where the decode path would add the columns in a launch of its own, return them unadded
    (`PendingSum`) for the caller's next residual add to add."""
    rows, hidden = x.shape
    num_slots, two_inter, h2 = w13.shape
    inter = two_inter // 2
    k = slots.shape[1]
    if h2 != hidden or tuple(w2.shape) != (num_slots, hidden, inter) or slots.shape != weights.shape:
        raise ValueError(
            f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, slots "
            f"{tuple(slots.shape)}, weights {tuple(weights.shape)} do not fit"
        )
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe: x, w13 and w2 must be contiguous along their last dimension")
    buckets = num_slots if table is None else table.shape[0]
    host13, host2 = _check_host(w13, w2, table, host, counts, buckets)
    x = x.contiguous()
    if slots.dtype not in (torch.int32, torch.int64):
        slots = slots.to(torch.int32)
    slots = slots.contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    if rows == 0 or k == 0:
        return out.zero_()
    active = active_k or k
    if path == "auto":
        path = "decode" if takes_decode(rows, active, num_slots) else "grouped"
    pairs = rows * k
    inter_buf = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    flags = {"TABLE": table is not None, "HOST": host is not None}
    tab = table if table is not None else slots  # a placeholder pointer where TABLE is off
    cnt = counts if counts is not None else slots
    pdl = pdl_args(x)
    if path == "decode":
        picked = pick_decode(hidden, inter, rows)
        up, dn = decode_cfg or picked[0], down_cfg or picked[1]
        tiles_i, tiles_h = triton.cdiv(inter, up.block_n), triton.cdiv(hidden, dn.block_n)
        g_up = _groups(rows, tiles_i, k, active, up.target_programs)
        _decode_up_kernel[(rows, g_up, tiles_i)](
            x, w13, host13, tab, cnt, slots, inter_buf, k, hidden, inter, triton.cdiv(k, g_up),
            w13.stride(0), w13.stride(1), **_launch(up), **flags, **pdl, COUNT=counts is not None,
        )  # fmt: skip
        g_down = _groups(rows, tiles_h, k, active, dn.target_programs)
        fused_sum = g_down == 1
        y = out if fused_sum else torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
        _decode_down_kernel[(rows, g_down, tiles_h)](
            inter_buf, w2, host2, tab, slots, weights, y, out, k, hidden, inter, triton.cdiv(k, g_down),
            w2.stride(0), w2.stride(1), **_launch(dn), **flags, **pdl, SUM=fused_sum,
            EARLY=DOWN_EARLY and table is None,
        )  # fmt: skip
        if fused_sum:
            return out
        if defer_sum:
            return PendingSum(y, slots)
    elif path == "grouped":
        pdl = {"USE_PDL": False, "launch_pdl": False}  # moe_align's torch ops come before these kernels
        gcfg = grouped_cfg or pick_grouped(pairs, num_slots)
        sorted_pairs, block_slot = moe_align(slots, buckets, gcfg.block_m)
        blocks = block_slot.shape[0]
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        launch = {
            "BLOCK_M": gcfg.block_m, "BLOCK_N": gcfg.block_n, "BLOCK_K": gcfg.block_k, "PREC": prec,
            "num_warps": gcfg.num_warps, "num_stages": gcfg.num_stages, **flags,
        }  # fmt: skip
        _grouped_up_kernel[(blocks, triton.cdiv(inter, gcfg.block_n))](
            x, w13, host13, tab, cnt, sorted_pairs, block_slot, inter_buf, pairs, k, hidden, inter,
            w13.stride(0), w13.stride(1), **launch, COUNT=counts is not None,
        )  # fmt: skip
        y = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
        _grouped_down_kernel[(blocks, triton.cdiv(hidden, gcfg.block_n))](
            inter_buf, w2, host2, tab, sorted_pairs, block_slot, weights, y, pairs, hidden, inter,
            w2.stride(0), w2.stride(1), **launch,
        )  # fmt: skip
    else:
        raise ValueError(f"fused_moe: path must be auto, decode or grouped, got {path!r}")
    block = 256
    _sum_kernel[(rows, triton.cdiv(hidden, block))](y, slots, out, k, hidden, BLOCK_N=block, **pdl)
    return out


def _check_host(
    w13: torch.Tensor,
    w2: torch.Tensor,
    table: torch.Tensor | None,
    host: tuple[torch.Tensor, torch.Tensor] | None,
    counts: torch.Tensor | None,
    buckets: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The host copies to pass (the slots themselves as placeholders when there are none), after checking
    that the table, host copies and counts fit the slots: same layout, so one stride serves both."""
    if host is not None and table is None:
        raise ValueError("fused_moe: host weights need a table (which experts are not in a slot)")
    if table is not None and (table.dim() != 1 or table.dtype != torch.int32):
        raise ValueError(f"fused_moe: table must be [experts] int32, got {tuple(table.shape)} {table.dtype}")
    if counts is not None and (tuple(counts.shape) != (buckets,) or counts.dtype != torch.int32):
        raise ValueError(
            f"fused_moe: counts must be [{buckets}] int32, got {tuple(counts.shape)} {counts.dtype}"
        )
    if host is None:
        return w13, w2
    h13, h2 = host
    for h, w in ((h13, w13), (h2, w2)):
        if (
            h.shape[0] != buckets
            or h.shape[1:] != w.shape[1:]
            or h.dtype != w.dtype
            or h.stride() != (w.stride(0), w.stride(1), 1)
        ):
            raise ValueError(
                f"fused_moe: host copy {tuple(h.shape)} {h.dtype} strides {h.stride()} must be [experts] x "
                f"the slots' {tuple(w.shape[1:])} {w.dtype} with their strides {w.stride()}"
            )
    return h13, h2
