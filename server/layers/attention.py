"""Paged attention over packed (ragged) batches: KV lives in fixed-size blocks addressed by block tables.

On the CPU each sequence attends on its own (a loop over sequences, reading its blocks back), which
keeps results independent of what else is in the batch and is the reference for the GPU paths: decode
steps use the Triton paged-decode kernel (also inside CUDA graphs), fresh prefills use SDPA on the new
K/V directly, batched by prompt length, and prefill chunks whose context is partly cached (chunked
prefill) use the Triton paged-prefill kernel, which reads the context through block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from actserve.server.contract.hooks import AttentionHook, RowInputs

# one layer's attention hooks with their plugins' per-row inputs (StepHooks.attention_at)
AttentionHooks = list[tuple[AttentionHook, RowInputs]]


@dataclass
class SeqSlice:
    """One sequence's part of a packed step: its query rows and the KV slots it may read."""

    start: int  # first row of this sequence in the packed batch
    num_queries: int  # new tokens this step (prompt length at prefill, 1 at decode)
    context_slots: torch.Tensor  # [context_len] flat KV slot of every token so far, in order

    @property
    def context_len(self) -> int:
        return int(self.context_slots.shape[0])


@dataclass
class PrefillGroup:
    """Fresh prompts of one length, attended in one SDPA call: rows None = the single prompt at start."""

    length: int
    start: int
    count: int
    rows: torch.Tensor | None


@dataclass
class AttentionBatch:
    """Per-step attention metadata shared by all layers."""

    slot_mapping: torch.Tensor  # [T] flat slot where each new token's K/V is written
    seqs: list[SeqSlice]
    # GPU decode steps (one row per sequence): block tables [B, max_blocks] int32, lengths [B] int32.
    # CPU steps with attention hooks: the same for the step's decode rows only (`decode_seqs`)
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_size: int = 16
    fresh_prefill: bool = False  # every sequence starts at position 0: its new K/V are its whole context
    prefill_groups: list[PrefillGroup] | None = None  # built by the first layer that needs them
    # CPU steps with attention hooks: which `seqs` are decode rows (one new token after a computed
    # context), in the order of the rows of `block_tables` (their slots are rebuilt after selection);
    # `decode_rows`: their packed rows, None when every packed row is a decode row, in table order
    decode_seqs: list[int] | None = None
    decode_rows: torch.Tensor | None = None
    # packed steps with attention hooks: (physical blocks [k], packed rows [k]) int64 that this step fills,
    # computed on the host by the runner; decode-only steps compute it on the device (`filled_blocks`)
    filled: tuple[torch.Tensor, torch.Tensor] | None = None
    # CUDA prefill steps with a chunk whose context is partly cached: every sequence's block table
    # [S, max_blocks] int32 (rows in `seqs` order) for the paged-prefill kernel, and its tiling (built by
    # the first layer)
    chunk_tables: torch.Tensor | None = None
    chunk_meta: Any = None


def paged_prefill_fits(head_dim: int) -> bool:
    """The paged-prefill kernel takes power-of-two head sizes of at least 16 (others: per sequence)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def make_kv_cache(
    num_layers: int,
    num_slots: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """One [2, num_slots, kv_heads, head_dim] tensor per layer; slot = block * block_size + offset."""
    return [
        torch.zeros(2, num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        for _ in range(num_layers)
    ]


def filled_blocks(
    positions: torch.Tensor, tables: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode rows (one new token each at `positions` [B]): the physical block each row's token completes
    and the row, both [B] int64, -1 where the token does not complete its block. Device ops only, fixed
    shapes, so a decode CUDA graph can run it (a graph's padding rows may report a block: their row inputs
    hold `none`, so no plugin acts on them)."""
    pos = positions.long()
    full = (pos + 1) % block_size == 0
    col = (pos // block_size).clamp(max=tables.shape[1] - 1).unsqueeze(1)
    blocks = tables.gather(1, col).squeeze(1).long()
    rows = torch.arange(pos.shape[0], device=pos.device)
    none = torch.full_like(rows, -1)
    return torch.where(full, blocks, none), torch.where(full, rows, none)


def step_filled(positions: torch.Tensor, batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The blocks this step fills: the runner's host list (packed steps), or computed on the device for a
    decode-only step (every row one token, `block_tables` row r = packed row r); None otherwise."""
    if batch.filled is not None:
        return batch.filled
    if batch.block_tables is not None and batch.decode_rows is None:
        return filled_blocks(positions, batch.block_tables, batch.block_size)
    return None


def select_blocks(
    hooks: AttentionHooks, layer: int, q: torch.Tensor, batch: AttentionBatch
) -> AttentionBatch:
    """The batch after the hooks' block selection for the step's decode rows (prefill rows keep their
    whole context). CUDA decode: new tables and lengths, device ops only (graph-capturable); CPU: the
    decode rows' context slots are rebuilt from their selected tables and lengths."""
    tables, lens = batch.block_tables, batch.context_lens
    if tables is None or lens is None:  # no decode rows in this step
        return batch
    rows = batch.decode_rows
    qd = q if rows is None else q[rows]
    for hook, inputs in hooks:
        cut = inputs if rows is None else {k: v[rows] for k, v in inputs.items()}
        tables, lens = hook.select(layer, qd, tables, lens, cut)
    if batch.decode_seqs is None:
        return replace(batch, block_tables=tables, context_lens=lens)
    seqs = list(batch.seqs)
    bs = batch.block_size
    offsets = torch.arange(bs, device=tables.device)
    for j, i in enumerate(batch.decode_seqs):
        slots = (tables[j].long().unsqueeze(1) * bs + offsets).flatten()[: int(lens[j])]
        seqs[i] = SeqSlice(seqs[i].start, seqs[i].num_queries, slots.to(seqs[i].context_slots.device))
    return replace(batch, seqs=seqs)


def observe_queries(hooks: AttentionHooks, layer: int, q: torch.Tensor, positions: torch.Tensor) -> None:
    """Hand every row's queries to the hooks that watch them (`QueryHook.queries`), before selection."""
    for hook, inputs in hooks:
        watch = getattr(hook, "queries", None)
        if watch is not None:
            watch(layer, q, positions, inputs)


def notify_filled(
    hooks: AttentionHooks, layer: int, kv_cache: torch.Tensor, filled: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Tell each hook which blocks this step filled, after the layer wrote its K/V."""
    blocks, rows = filled
    for hook, inputs in hooks:
        hook.filled(layer, kv_cache, blocks, rows, inputs)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
    write_kv: bool = True,
    static_inputs: bool = False,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then causal attention per sequence; q: [T, Hq, D].
    `static_inputs`: the batch's tables and lengths are the step's own (no hook rebuilt them on the
    device), which the decode kernel may read early (`paged_decode`)."""
    if write_kv:
        kv_cache[0, batch.slot_mapping] = k
        kv_cache[1, batch.slot_mapping] = v
    if q.is_cuda and batch.block_tables is not None:
        from actserve.kernels.paged_decode import paged_decode

        assert batch.context_lens is not None
        return paged_decode(
            q,
            kv_cache[0],
            kv_cache[1],
            batch.block_tables,
            batch.context_lens,
            scale,
            batch.block_size,
            sliding_window,
            static_inputs=static_inputs,
        )
    if q.is_cuda and batch.fresh_prefill:
        return _prefill_sdpa(q, k, v, batch, scale, sliding_window)
    if batch.chunk_tables is not None:  # set by the runner on CUDA (see ModelRunner.chunk_kernel)
        from actserve.kernels.paged_prefill import paged_prefill, prefill_meta, tile_positions

        if batch.chunk_meta is None:
            lens, nqs = [s.context_len for s in batch.seqs], [s.num_queries for s in batch.seqs]
            block_m = tile_positions(q.shape[1] // kv_cache.shape[2])
            batch.chunk_meta = prefill_meta(lens, nqs, q.device, block_m)
        return paged_prefill(
            q, kv_cache[0], kv_cache[1], batch.chunk_tables, batch.chunk_meta, scale, batch.block_size,
            sliding_window,
        )  # fmt: skip
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for s in batch.seqs:
        qs = q[s.start : s.start + s.num_queries].transpose(0, 1)  # [H, Tq, D]
        ks = kv_cache[0, s.context_slots].transpose(0, 1)  # [Hk, Tk, D]
        vs = kv_cache[1, s.context_slots].transpose(0, 1)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=0)
            vs = vs.repeat_interleave(group, dim=0)
        mask = _causal_mask(s.num_queries, s.context_len, sliding_window, q.device)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[s.start : s.start + s.num_queries] = o.transpose(0, 1)
    return out


def _causal_mask(num_q: int, num_k: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for queries that are the last num_q of num_k positions."""
    if num_q == 1 and (window is None or num_k <= window):
        return None
    q_pos = torch.arange(num_k - num_q, num_k, device=device).unsqueeze(1)
    k_pos = torch.arange(num_k, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _prefill_groups(batch: AttentionBatch, device: torch.device) -> list[PrefillGroup]:
    """Prompts grouped by length, built once per step and shared by every layer (it was rebuilt per
    layer: 64 prompts meant 2048 small host-side ops per prefill)."""
    if batch.prefill_groups is None:
        by_len: dict[int, list[int]] = {}
        for s in batch.seqs:
            by_len.setdefault(s.num_queries, []).append(s.start)
        groups: list[PrefillGroup] = []
        for n, starts in by_len.items():
            rows = None
            if len(starts) > 1:
                rows = (torch.tensor(starts).unsqueeze(1) + torch.arange(n).unsqueeze(0)).flatten().to(device)
            groups.append(PrefillGroup(n, starts[0], len(starts), rows))
        batch.prefill_groups = groups
    return batch.prefill_groups


def _prefill_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch, scale: float, window: int | None
) -> torch.Tensor:
    """Causal attention of fresh prompts over their own K/V; prompts of equal length share one call, and
    grouped-query heads are handled by SDPA itself (no repeated K/V copies)."""
    out = torch.empty_like(q)
    for grp in _prefill_groups(batch, q.device):
        n, count, rows = grp.length, grp.count, grp.rows
        if rows is None:
            qs, ks, vs = (t[grp.start : grp.start + n] for t in (q, k, v))
        else:
            qs, ks, vs = q[rows], k[rows], v[rows]
        qs = qs.view(count, n, *q.shape[1:]).transpose(1, 2)
        ks = ks.view(count, n, *k.shape[1:]).transpose(1, 2)
        vs = vs.view(count, n, *v.shape[1:]).transpose(1, 2)
        mask = _causal_mask(n, n, window, q.device) if window is not None and n > window else None
        o = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        o = o.transpose(1, 2).reshape(-1, *q.shape[1:])
        if rows is not None:
            out[rows] = o
        else:
            out[grp.start : grp.start + n] = o
    return out
