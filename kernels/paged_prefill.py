"""Paged prefill attention: chunks of prompts whose context is partly in the KV cache already (chunked
prefill), each new query row over its sequence's context read through its block table, causal (the query
rows are the last `num_queries` positions of the context), optional sliding window.

Grid (query tiles, KV heads): a tile is up to BLOCK_M consecutive query rows of one sequence, taken for
every query head of one KV head's GQA group at once (each K/V tile is loaded once per group); it walks
the context in BLOCK_N-token tiles up to its last row's position (flash-attention online softmax in
float32), so no [queries, context] score matrix and no gathered copy of the context is ever
materialized. The tiling (which sequence and first row each tile covers) is built once per step on the
host (`prefill_meta`) and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, ctx_ptr, nq_ptr, qstart_ptr, tile_seq_ptr, tile_m_ptr,
    scale, window, stride_qt, stride_qh, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query positions of one sequence x the GROUP query heads of one KV head (rows
    r = position * GROUP_PAD + head), so each K/V tile is loaded once for the whole group."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
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
    hi = tl.minimum(ctx, ctx - nq + m0 + BLOCK_M)  # one past the tile's last query position
    first = ctx - nq + m0
    lo = tl.where(window > 0, tl.maximum(first - window + 1, 0), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    offs = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs
        tm = tok < hi
        blk = tl.load(bt_ptr + s * stride_bt + tok // BLOCK_SIZE, mask=tm, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + tok % BLOCK_SIZE
        k = tl.load(
            k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=tm[:, None], other=0.0
        )
        v = tl.load(
            v_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=tm[:, None], other=0.0
        )
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        allowed = tm[None, :] & (tok[None, :] <= qpos[:, None])
        allowed = allowed & ((window <= 0) | (tok[None, :] > qpos[:, None] - window))
        sc = tl.where(allowed, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    o_ptrs = o_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=ok[:, None])


PROGRAM_ROWS = 64  # query rows (positions x heads of one KV head's group) per program


def tile_positions(group: int) -> int:
    """Query positions per tile for a GQA group size: PROGRAM_ROWS rows in all (at least one position)."""
    return max(1, PROGRAM_ROWS // triton.next_power_of_2(group))


@dataclass
class PrefillMeta:
    """One step's tiling and per-sequence lengths on the device (built once, used by every layer)."""

    context_lens: torch.Tensor  # [S] int32
    num_queries: torch.Tensor  # [S] int32
    query_starts: torch.Tensor  # [S] int32, first packed row of each sequence
    tile_seq: torch.Tensor  # [tiles] int32
    tile_m: torch.Tensor  # [tiles] int32, first query row (within its sequence) of each tile
    block_m: int


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
    return PrefillMeta(host[0], host[1], host[2], tiles[0], tiles[1], block_m)


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    meta: PrefillMeta,
    scale: float,
    block_size: int,
    window: int | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Triton version of `paged_prefill_ref` (q packed in the order of `meta`'s sequences)."""
    _, hq, dim = q.shape
    hk = k_cache.shape[1]
    group = hq // hk
    out = torch.empty_like(q)
    grid = (meta.tile_seq.shape[0], hk)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, meta.context_lens, meta.num_queries, meta.query_starts,
        meta.tile_seq, meta.tile_m, scale, window or 0, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=dim, BLOCK_SIZE=block_size,
        BLOCK_M=meta.block_m, BLOCK_N=block_n,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out
