"""Paged-attention decode: one query token per sequence against its KV blocks, split over the context.

Grid (batch, kv_head, splits): each program takes a tile-aligned share of one sequence's context, all query
heads of its GQA group at once (padded to 16 rows for tensor-core dots), and writes a partial (max, sum,
acc); a second kernel merges the splits. With one split (batches that fill the GPU by themselves) the
program writes the output and there is no merge launch. A merge fused into the split kernel (the last
program per sequence and kv head merging, counted by an atomic) was measured and dropped: at batch 1 its
serial tail made the step 90 us slower than the separate launch. The split count is fixed per launch shape
(so the launch can live in a CUDA graph) while each split's share follows the sequence's real length.

Short contexts: a sequence whose context spans at most SHORT_TILES tiles is attended by split 0 alone,
which writes the output; its other splits return at once and the merge skips it. Decided per sequence on
the device, so a CUDA graph captured with many splits (a batch-1 graph's tables are max_model_len wide)
serves short and long contexts alike; eager steps size their tables, hence their splits, by the batch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from actserve.kernels.pdl import pdl_args, pdl_sync


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    scale, window, stride_qb, stride_qh, stride_ks, stride_kh, stride_bt, stride_ob, stride_oh,
    SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PREC: tl.constexpr, SHORT_TILES: tl.constexpr,
    EARLY: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """EARLY: the context lengths and block tables are the step's inputs (copied from the host before
    its first kernel, written by no kernel of the step): read before the PDL wait, so that only q and
    the K/V (this step's token, written by the launch before) wait for the previous kernel."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    if not EARLY:
        pdl_sync(USE_PDL)
    ctx = tl.load(ctx_ptr + b, cache_modifier=".cg")
    lo_ctx = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    n_tiles = tl.cdiv(ctx - lo_ctx, TILE)
    # this sequence's whole context in split 0 (`_is_short`, as the merge decides it)
    short = ((SHORT_TILES > 0) & (n_tiles <= SHORT_TILES)) | (SPLITS == 1)
    if short & (sp > 0):
        return  # nothing to write: the merge skips this sequence (`_is_short`)
    per_split = tl.where(short, n_tiles, tl.cdiv(n_tiles, SPLITS))
    t0 = sp * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)
    offs = tl.arange(0, TILE)
    # each tile's block ids are loaded one tile ahead (the first before the wait, with EARLY)
    tok = lo_ctx + t0 * TILE + offs
    bt_row = bt_ptr + b * stride_bt
    end = tl.minimum(lo_ctx + t1 * TILE, ctx)  # past this program's last tile, or the context
    blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=tok < end, other=0, cache_modifier=".cg")
    if EARLY:
        pdl_sync(USE_PDL)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    gm = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gm[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for t in range(t0, t1):
        tok = lo_ctx + t * TILE + offs
        tm = tok < ctx
        slot = blk.to(tl.int64) * BLOCK_SIZE + tok % BLOCK_SIZE
        nxt = tok + TILE
        blk = tl.load(bt_row + nxt // BLOCK_SIZE, mask=nxt < end, other=0, cache_modifier=".cg")
        k = tl.load(
            k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=tm[:, None], other=0.0
        )
        v = tl.load(
            v_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=tm[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(tm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    if short:  # the whole context in this program: no partials (one split: no merge launch at all)
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=gm[:, None])
        return
    row = (b * tl.num_programs(1) + kvh) * SPLITS + sp
    tl.store(m_ptr + row * GROUP_PAD + g, m_i)
    tl.store(l_ptr + row * GROUP_PAD + g, l_i)
    tl.store(acc_ptr + (row * GROUP_PAD + g[:, None]) * HEAD_DIM + d[None, :], acc)


@triton.jit
def _is_short(ctx_ptr, b, window, TILE: tl.constexpr, SHORT_TILES: tl.constexpr):
    """Whether sequence b's context (within the window) spans at most SHORT_TILES tiles: then split 0
    of `_decode_split_kernel` attends over all of it and writes the output itself."""
    ctx = tl.load(ctx_ptr + b)
    lo_ctx = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    return tl.cdiv(ctx - lo_ctx, TILE) <= SHORT_TILES


@triton.jit(do_not_specialize=["splits"])  # one compiled variant for every split count
def _decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, ctx_ptr, stride_ob, stride_oh, kv_heads, splits, window,
    SPLITS_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr, SHORT_TILES: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, query head); all its splits are loaded at once (no serial loop, which
    made this kernel cost 10 us per layer at batch 1 with 33 splits). The split count is a runtime value
    (`splits` <= SPLITS_PAD): paged prefill varies it with every chunk and must not compile a variant
    per count. SHORT_TILES > 0 (decode): a sequence the split kernel finished in one program (`_is_short`)
    is skipped (after the wait, so that the next launch still waits for the split kernel's output)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kvh, g = h // GROUP, h % GROUP
    pdl_sync(USE_PDL)
    if SHORT_TILES > 0:
        if _is_short(ctx_ptr, b, window, TILE, SHORT_TILES):
            return
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    s_ok = s < splits
    rows = ((b * kv_heads + kvh) * splits + s) * GROUP_PAD + g
    m = tl.load(m_ptr + rows, mask=s_ok, other=float("-inf"))
    m_all = tl.max(m, axis=0)
    w = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    l_tot = tl.sum(w * tl.load(l_ptr + rows, mask=s_ok, other=0.0), axis=0)
    acc = tl.load(acc_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.maximum(l_tot, 1e-30)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out)


# contexts of at most this many tiles (of `tile` tokens, 64 by default) are attended by one program per
# (sequence, kv head), whatever the launch's split count, and skip the merge: at batch 1 with a short
# context the split launch had 63 of 64 programs write empty partials (2 MB per layer at Qwen3-30B-A3B)
# for the merge to read back. Longer contexts split as before. 0: off (ACTSERVE_DECODE_SHORT_TILES sets
# it, for A/B timing).
SHORT_TILES = int(os.environ.get("ACTSERVE_DECODE_SHORT_TILES", "2"))


def decode_splits(batch: int, kv_heads: int, max_tiles: int, sms: int = 132) -> int:
    """Enough programs to fill the GPU at small batch; one split when the batch already does."""
    want = max(1, (2 * sms) // max(1, batch * kv_heads))
    return max(1, min(want, max_tiles, 64))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    window: int | None = None,
    splits: int | None = None,
    tile: int = 64,
    static_inputs: bool = False,
) -> torch.Tensor:
    """Triton version of `paged_decode_ref`. Rows with context_len 0 get zeros. `static_inputs`: the
    block tables and context lengths were written by no kernel of this step (no attention hook rebuilt
    them): the kernel may read them before waiting for the previous launch."""
    batch, hq, dim = q.shape
    hk = k_cache.shape[1]
    group = hq // hk
    group_pad = max(16, triton.next_power_of_2(group))
    tile = max(16, min(tile, triton.next_power_of_2(block_tables.shape[1] * block_size)))
    if splits is None:
        splits = decode_splits(batch, hk, triton.cdiv(block_tables.shape[1] * block_size, tile))
    rows = batch * hk * splits if splits > 1 else 1
    m = torch.empty(rows, group_pad, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty(rows, group_pad, dim, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _decode_split_kernel[(batch, hk, splits)](
        q, k_cache, v_cache, block_tables, context_lens, m, lse, acc, out,
        scale, window or 0, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        SPLITS=splits, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim, BLOCK_SIZE=block_size, TILE=tile,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", SHORT_TILES=SHORT_TILES, EARLY=static_inputs,
        **pdl_args(q),
    )  # fmt: skip
    if splits == 1:
        return out
    _decode_merge_kernel[(batch, hq)](
        m, lse, acc, out, context_lens, out.stride(0), out.stride(1), hk, splits, window or 0,
        SPLITS_PAD=triton.next_power_of_2(splits), GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim,
        TILE=tile, SHORT_TILES=SHORT_TILES, **pdl_args(q),
    )  # fmt: skip
    return out
