"""Fresh single-prompt prefills replayed from CUDA graphs, one graph per padded prompt-length bucket.

Why: an eager prefill of a short prompt is host-bound. On the Llama-3-8B shape a 128-token prompt costs
~10 ms of Python and ~300 kernel launches for ~5 ms of GPU work (bench/decode_profile.py, prefill
section), and at batch 1 that is most of the time to first token. Padding rows go after the prompt:
causal attention keeps them out of every real row, their K/V go to the scratch slot, and only the last
real row's logits are computed. Used for one fresh prompt per step with no interventions and no prompt
logprobs; everything else takes the eager path.
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
        self, model: torch.nn.Module, kv_caches: list[torch.Tensor], dummy_slot: int, max_len: int
    ) -> None:
        self.model, self.kv_caches, self.dummy_slot = model, kv_caches, dummy_slot
        self.buckets = [b for b in PREFILL_BUCKETS if b <= max_len]
        n = self.n = self.buckets[-1]
        dev = kv_caches[0].device
        # int64 layout: ids | positions | slots | last real row
        self.host = torch.zeros(3 * n + 1, dtype=torch.long, pin_memory=True)
        self.dev = torch.zeros(3 * n + 1, dtype=torch.long, device=dev)
        self.ctx = torch.zeros(n, dtype=torch.long)  # the fresh path reads only its length
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.copied = torch.cuda.Event()
        self._capture()

    def _forward(self, t: int) -> torch.Tensor:
        n, d = self.n, self.dev
        attn = AttentionBatch(d[2 * n : 2 * n + t], [SeqSlice(0, t, self.ctx[:t])], fresh_prefill=True)
        hidden = self.model(d[:t], d[n : n + t], self.kv_caches, attn, None)
        return self.model.compute_logits(hidden.index_select(0, d[3 * n :]))

    @torch.inference_mode()
    def _capture(self) -> None:
        n = self.n
        self.dev[2 * n : 3 * n].fill_(self.dummy_slot)
        pool = torch.cuda.graph_pool_handle()  # its own pool: a step may replay a decode graph after it
        for t in reversed(self.buckets):
            self.graphs[t] = capture_graph(lambda t=t: self._forward(t), pool)
        torch.cuda.synchronize()
        log.info("captured prefill CUDA graphs for prompt lengths up to %s", self.buckets)

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
