"""Paged prefill attention: chunks of prompts whose context is partly in the KV cache already (chunked
prefill), each new query row over its sequence's context read through its block table, causal (the query
rows are the last `num_queries` positions of the context), optional sliding window.

Grid (query tiles, KV heads): a tile is up to BLOCK_M consecutive query rows of one sequence, taken for
every query head of one KV head's GQA group at once (each K/V tile is loaded once per group); it walks
the context in BLOCK_N-token tiles up to its last row's position (flash-attention online softmax in
float32), so no [queries, context] score matrix and no gathered copy of the context is ever
materialized. The tiling (which sequence and first row each tile covers) is built once per step on the
host (`prefill_meta`) and shared by every layer. When the tiles alone cannot fill the GPU (a short chunk
after a long cached prefix: 7 tiles x 8 KV heads for 196 new rows), each tile's context is split over
several programs whose partial results the decode kernel's merge combines."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from actserve.kernels.paged_decode import _decode_merge_kernel

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_step(q, k, v, m_i, l_i, acc, qk_scale, allowed, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One K/V tile of the online softmax (base 2: the scale carries log2 e). Unmasked tiles skip the
    mask and the guard for rows that have nothing allowed yet (every row allows the whole tile)."""
    sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        sc = tl.where(allowed, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    if MASKED:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
    p = tl.exp2(sc - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


# one compiled variant for every split count and block-table width (chunks vary both step to step; a
# variant met mid-serving compiled for ~2 s while every decode waited)
@triton.jit(do_not_specialize=["splits", "stride_bt"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, ctx_ptr, nq_ptr, qstart_ptr, tile_seq_ptr, tile_m_ptr,
    m_ptr, l_ptr, acc_ptr,
    qk_scale, window, splits, stride_qt, stride_qh, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIALS: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query positions of one sequence x the GROUP query heads of one KV head (rows
    r = position * GROUP_PAD + head), so each K/V tile is loaded once for the whole group, over split
    `program_id(2)` of the tile's context. Context tiles wholly before the tile's first query position
    (and no sliding window) take the unmasked loop; the rest (the causal diagonal, the window's edge)
    the masked one. With PARTIALS (`splits` > 1, a runtime count: chunks vary it step to step, and a
    compiled variant per count cost seconds mid-serving) it writes a partial (max, sum, acc) in the layout
    of `_decode_merge_kernel`, which merges them (the max in natural-log units, as that kernel expects)."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    s = tl.load(tile_seq_ptr + tile).to(tl.int64)
    m0 = tl.load(tile_m_ptr + tile)
    ctx = tl.load(ctx_ptr + s)
    nq = tl.load(nq_ptr + s)
    row0 = tl.load(qstart_ptr + s).to(tl.int64)
    r = tl.arange(0, BLOCK_M * GROUP_PAD)
    i = m0 + r // GROUP_PAD  # query index within the sequence's new rows
    g = r % GROUP_PAD
    head = kvh * GROUP + g
    ok = (i < nq) & (g < GROUP)
    qpos = ctx - nq + i
    d = tl.arange(0, HEAD_DIM)
    rows = row0 + i
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, HEAD_DIM], tl.float32)
    first = ctx - nq + m0  # the tile's first query position
    hi = tl.minimum(ctx, first + BLOCK_M)  # one past its last
    lo = tl.where(window > 0, tl.maximum(first - window + 1, 0), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.where(m0 < nq, hi, lo)  # a tile of padding rows only (a CUDA graph's bucket): no work
    full_end = tl.where(window > 0, lo, ((first + 1) // BLOCK_N) * BLOCK_N)
    if PARTIALS:  # this program's share of the context tiles
        per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), splits) * BLOCK_N
        lo = lo + sp * per_split
        hi = tl.minimum(lo + per_split, hi)
        full_end = tl.maximum(tl.minimum(full_end, hi), lo)
    offs = tl.arange(0, BLOCK_N)
    kv_off = kvh * stride_kh + d[None, :]
    bt_row = bt_ptr + s * stride_bt
    for start in range(lo, full_end, BLOCK_N):
        tok = start + offs
        blk = tl.load(bt_row + tok // BLOCK_SIZE).to(tl.int64)
        slot = blk * BLOCK_SIZE + tok % BLOCK_SIZE
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_off)
        v = tl.load(v_ptr + slot[:, None] * stride_ks + kv_off)
        m_i, l_i, acc = _tile_step(q, k, v, m_i, l_i, acc, qk_scale, None, False, PREC)
    for start in range(full_end, hi, BLOCK_N):
        tok = start + offs
        tm = tok < hi
        blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=tm, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + tok % BLOCK_SIZE
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_off, mask=tm[:, None], other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_ks + kv_off, mask=tm[:, None], other=0.0)
        allowed = tm[None, :] & (tok[None, :] <= qpos[:, None])
        allowed = allowed & ((window <= 0) | (tok[None, :] > qpos[:, None] - window))
        m_i, l_i, acc = _tile_step(q, k, v, m_i, l_i, acc, qk_scale, allowed, True, PREC)
    if not PARTIALS:
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        o_ptrs = o_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=ok[:, None])
    else:  # rows with nothing allowed in this split weigh nothing in the merge
        part = ((rows * tl.num_programs(1) + kvh) * splits + sp) * GROUP_PAD + g
        tl.store(m_ptr + part, tl.where(l_i > 0, m_i * LN2, float("-inf")), mask=ok)
        tl.store(l_ptr + part, l_i, mask=ok)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=ok[:, None])


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and launch of the kernel. Swept on the H200 by bench/paged_prefill_kernel.py: this one is
    fastest on 3 of its 4 cases (32k context, 2048 rows: 2.90 ms, 394 TFLOP/s, SDPA flash 3.06 ms) and
    second by total; the total's winner (block_n 64, 4 warps: 2.71 ms on that case, slower on the other
    three) gave the engine a longer worst decode gap under a 32k prefill (100.9 ms vs 95.0 ms,
    bench/prefill_under_load.py at budget 2048), so this one stays."""

    rows: int = 128  # query rows (positions x heads of one KV head's group) per program
    block_n: int = 128  # context tokens per K/V tile
    num_warps: int = 8
    num_stages: int = 3


DEFAULT_LAUNCH = LaunchConfig()
MAX_SPLITS = 16  # context splits per tile (the merge loads them all at once)
LOG2E = 1.4426950408889634


def tile_positions(group: int, rows: int = DEFAULT_LAUNCH.rows) -> int:
    """Query positions per tile for a GQA group size: `rows` rows in all (at least one position)."""
    return max(1, rows // triton.next_power_of_2(group))


@dataclass
class PrefillMeta:
    """One step's tiling and per-sequence lengths on the device (built once, used by every layer)."""

    context_lens: torch.Tensor  # [S] int32
    num_queries: torch.Tensor  # [S] int32
    query_starts: torch.Tensor  # [S] int32, first packed row of each sequence
    tile_seq: torch.Tensor  # [tiles] int32
    tile_m: torch.Tensor  # [tiles] int32, first query row (within its sequence) of each tile
    block_m: int
    max_context: int


def prefill_meta(
    context_lens: list[int], num_queries: list[int], device: torch.device, block_m: int
) -> PrefillMeta:
    """`block_m`: query positions per tile (`tile_positions(group)` for the kernel's default shape)."""
    starts, tile_seq, tile_m, row = [], [], [], 0
    for i, nq in enumerate(num_queries):
        starts.append(row)
        for m in range(0, nq, block_m):
            tile_seq.append(i)
            tile_m.append(m)
        row += nq
    host = torch.tensor([context_lens, num_queries, starts], dtype=torch.int32)
    tiles = torch.tensor([tile_seq, tile_m], dtype=torch.int32)
    host, tiles = host.to(device), tiles.to(device)
    return PrefillMeta(host[0], host[1], host[2], tiles[0], tiles[1], block_m, max(context_lens, default=0))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def context_splits(programs: int, max_context: int, block_n: int, sms: int) -> int:
    """Splits of the context per tile: enough programs for two waves when the tiles alone are too few
    (a short chunk after a long cached prefix), at least 4 K/V tiles per split, at most MAX_SPLITS."""
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), max_context // (4 * block_n), MAX_SPLITS))


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    meta: PrefillMeta,
    scale: float,
    block_size: int,
    window: int | None = None,
    block_n: int | None = None,
    launch: LaunchConfig = DEFAULT_LAUNCH,
    splits: int | None = None,
) -> torch.Tensor:
    """Triton version of `paged_prefill_ref` (q packed in the order of `meta`'s sequences; `meta`'s
    tiles built for `launch.rows`). `block_n` overrides the launch's (tests use small tiles); `splits`
    the context split count (default `context_splits`)."""
    tokens, hq, dim = q.shape
    hk = k_cache.shape[1]
    group = hq // hk
    group_pad = triton.next_power_of_2(group)
    block_n = block_n or launch.block_n
    tiles = meta.tile_seq.shape[0]
    if splits is None:
        splits = context_splits(tiles * hk, meta.max_context, block_n, _sm_count(q.device))
    parts = tokens * hk * splits * group_pad if splits > 1 else 1
    m = torch.empty(parts, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty(parts, dim, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _prefill_kernel[(tiles, hk, splits)](
        q, k_cache, v_cache, out, block_tables, meta.context_lens, meta.num_queries, meta.query_starts,
        meta.tile_seq, meta.tile_m, m, lse, acc, scale * LOG2E, window or 0, splits, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim, BLOCK_SIZE=block_size, BLOCK_M=meta.block_m,
        BLOCK_N=block_n, PARTIALS=splits > 1, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    if splits > 1:
        _decode_merge_kernel[(tokens, hq)](
            m, lse, acc, out, m, out.stride(0), out.stride(1), hk, splits, 0,
            SPLITS_PAD=MAX_SPLITS, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim, TILE=16, SHORT_TILES=0,
            USE_PDL=False,
        )  # fmt: skip
    return out
