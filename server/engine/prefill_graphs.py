"""Fresh single-prompt prefills replayed from CUDA graphs, one graph per padded prompt-length bucket.

Why: an eager prefill of a short prompt is host-bound. On the Llama-3-8B shape a 128-token prompt costs
~10 ms of Python and ~300 kernel launches for ~5 ms of GPU work (bench/decode_profile.py, prefill
section), and at batch 1 that is most of the time to first token. Padding rows go after the prompt:
causal attention keeps them out of every real row, their K/V go to the scratch slot, and only the last
real row's logits are computed. Used for one fresh prompt per step with no interventions and no prompt
logprobs; everything else takes the eager path.

A second set of graphs takes the rest of one prompt after a computed context (a prefix-cache hit, or the
last chunk of a long prompt) through the paged-prefill kernel: the context length, block table and the
kernel's tiling live in static buffers, and the kernel's launch (tiles per bucket, context splits for the
longest context) is fixed per bucket, each split's share following the real context. A follow-up turn of
a chat whose history is cached is then one replay, not ~300 eager launches (host-bound at ~15-25 ms on
the Llama-3-8B shape for ~9 ms of GPU work).
"""

from __future__ import annotations

import logging

import torch

from actserve.server.engine.cuda_graphs import capture_graph, smallest_bucket
from actserve.server.layers.attention import AttentionBatch, SeqSlice

log = logging.getLogger(__name__)

PREFILL_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512)


class PrefillGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        dummy_slot: int,
        max_len: int,
        cached: tuple[int, int, int] | None = None,
    ) -> None:
        """`max_len`: the longest prompt a graph takes; `cached`: (block size, block-table width, query heads
        per KV head) to capture the cached-context graphs too (None: only fresh prompts)."""
        self.model, self.kv_caches, self.dummy_slot = model, kv_caches, dummy_slot
        self.buckets = [b for b in PREFILL_BUCKETS if b <= max_len]
        n = self.n = self.buckets[-1]
        dev = kv_caches[0].device
        # int64 layout: ids | positions | slots | last real row
        self.host = torch.zeros(3 * n + 1, dtype=torch.long, pin_memory=True)
        self.dev = torch.zeros(3 * n + 1, dtype=torch.long, device=dev)
        self.ctx = torch.zeros(n, dtype=torch.long)  # the fresh path reads only its length
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cached_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.copied = torch.cuda.Event()
        self.cached = cached
        if cached is not None:
            block_size, width, group = cached
            # int32 layout: context length | new rows | first row (0) | block table [width]
            self.meta_host = torch.zeros(3 + width, dtype=torch.int32, pin_memory=True)
            self.meta_dev = torch.zeros(3 + width, dtype=torch.int32, device=dev)
            from actserve.kernels.paged_prefill import tile_positions  # Triton: CUDA only, not at import

            self.block_m = tile_positions(group)
        self._capture()

    def _forward(self, t: int) -> torch.Tensor:
        n, d = self.n, self.dev
        attn = AttentionBatch(d[2 * n : 2 * n + t], [SeqSlice(0, t, self.ctx[:t])], fresh_prefill=True)
        hidden = self.model(d[:t], d[n : n + t], self.kv_caches, attn, None)
        return self.model.compute_logits(hidden.index_select(0, d[3 * n :]))

    def _forward_cached(self, t: int) -> torch.Tensor:
        """Bucket `t` after a computed context: the paged-prefill kernel reads it through the table."""
        from actserve.kernels.paged_prefill import PrefillMeta

        assert self.cached is not None
        n, d, m = self.n, self.dev, self.meta_dev
        block_size, width, _ = self.cached
        tiles = -(-t // self.block_m)
        meta = PrefillMeta(
            m[0:1], m[1:2], m[2:3], torch.zeros(tiles, dtype=torch.int32, device=m.device),
            torch.arange(0, t, self.block_m, dtype=torch.int32, device=m.device), self.block_m,
            width * block_size,  # the longest context: the context split count for every replay
        )  # fmt: skip
        attn = AttentionBatch(d[2 * n : 2 * n + t], [SeqSlice(0, t, self.ctx[:t])], block_size=block_size)
        attn.chunk_tables, attn.chunk_meta = m[3:].view(1, width), meta
        hidden = self.model(d[:t], d[n : n + t], self.kv_caches, attn, None)
        return self.model.compute_logits(hidden.index_select(0, d[3 * n :]))

    @torch.inference_mode()
    def _capture(self) -> None:
        n = self.n
        self.dev[2 * n : 3 * n].fill_(self.dummy_slot)
        pool = torch.cuda.graph_pool_handle()  # its own pool: a step may replay a decode graph after it
        for t in reversed(self.buckets):
            self.graphs[t] = capture_graph(lambda t=t: self._forward(t), pool)
        if self.cached is not None:
            for t in reversed(self.buckets):
                # lengths the warm-up and capture runs read: the bucket's own rows, no context before them
                # (more new rows than the bucket has would index past its buffers)
                self.meta_dev[:3] = torch.tensor([t, t, 0], dtype=torch.int32)
                self.cached_graphs[t] = capture_graph(lambda t=t: self._forward_cached(t), pool)
        torch.cuda.synchronize()
        log.info(
            "captured prefill CUDA graphs for prompt lengths up to %s%s",
            self.buckets,
            " (fresh, and after a cached context)" if self.cached is not None else "",
        )

    def bucket(self, length: int) -> int | None:
        return smallest_bucket(self.buckets, length)

    def run(self, ids: list[int], slots: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] of the last prompt token; ids/slots: the whole prompt and its KV slots."""
        t, n, h = len(ids), self.n, self.host
        b = self.bucket(t)
        assert b is not None
        self.copied.synchronize()  # the previous prefill's copy has read the pinned buffer
        h[:t] = torch.tensor(ids, dtype=torch.long)
        h[t:b] = 0
        h[n : n + b] = torch.arange(b)  # padding rows: any valid position
        h[2 * n : 2 * n + t] = slots
        h[2 * n + t : 2 * n + b] = self.dummy_slot
        h[3 * n] = t - 1
        self.dev.copy_(h, non_blocking=True)
        self.copied.record()
        graph, out = self.graphs[b]
        graph.replay()
        return out

    def run_cached(self, ids: list[int], start: int, slots: torch.Tensor, table: list[int]) -> torch.Tensor:
        """Logits [1, vocab] of the last of `ids`, the prompt's tokens from position `start` on (those before
        are in the KV cache); slots: their KV slots; table: the sequence's block table."""
        assert self.cached is not None
        t, n, h, mh = len(ids), self.n, self.host, self.meta_host
        b = self.bucket(t)
        assert b is not None
        self.copied.synchronize()  # the previous prefill's copies have read the pinned buffers
        h[:t] = torch.tensor(ids, dtype=torch.long)
        h[t:b] = 0
        h[n : n + t] = torch.arange(start, start + t)
        h[n + t : n + b] = 0  # padding rows: any valid position
        h[2 * n : 2 * n + t] = slots
        h[2 * n + t : 2 * n + b] = self.dummy_slot
        h[3 * n] = t - 1
        mh[:3] = torch.tensor([start + t, t, 0], dtype=torch.int32)
        mh[3 : 3 + len(table)] = torch.tensor(table, dtype=torch.int32)
        self.dev.copy_(h, non_blocking=True)
        self.meta_dev[: 3 + len(table)].copy_(mh[: 3 + len(table)], non_blocking=True)
        self.copied.record()
        graph, out = self.cached_graphs[b]
        graph.replay()
        return out
