"""The attention hook of `kv_retrieval` (docs/architecture.md §6 attention hook point, §10 "KV
retrieval"): it watches every row's queries, selects each decode row's blocks per layer, and writes a
block's summaries when it fills.

Per row everything comes from the row input `kv_retrieval` (the columns of kernels/kv_retrieval_ref.py;
slot -1 = not a retrieving row, whose table and length come back unchanged), and all work is device ops
of fixed shapes, so decode steps replay it from CUDA graphs. Two paths:

- decode steps (one row per sequence; `decode=True`): the KV-retrieval kernels (kernels/kv_retrieval.py,
  five launches per layer, a sixth with a host tier) on CUDA, their plain-torch references on the CPU:
  `queries` appends the query to its slot (ring, statistics, activation bias), `select` scores, budgets,
  chooses and builds the tables (with a host tier: maps the chosen host blocks to the slot's reserved GPU
  blocks and recalls the missing ones, `KVTier.recall`), `filled` writes the completed blocks' summaries;
- packed steps (prompt chunks, and on the CPU decode rows beside them): torch ops over the chunk:
  `queries` merges the chunk into its slots' statistics and keeps the step's queries, `select` (the
  decode rows) scores as the decode path does, `filled` writes the summaries of the blocks the step
  completed (their queries from this step or from the ring) and then the step's queries into the rings.
"""

from __future__ import annotations

import torch

from actserve.interventions.base import KVSpace, RowInputs
from actserve.interventions.kv_retrieval.state import RetrievalState
from actserve.kernels import kv_retrieval_ref as ref

INPUT = "kv_retrieval"
COLUMNS = 7  # slot, method, retrieve, sink, window, pos, offload (kernels/kv_retrieval_ref.py)
STAT_CAP = 1024.0  # the running statistics weigh the last ~1024 queries (count capped: an EMA after)


class RetrievalHook:
    def __init__(
        self,
        state: RetrievalState,
        num_layers: int,
        kv_heads: int,
        block_size: int,
        scale: float,
        representatives: int,
        decode: bool,
        kv: KVSpace | None = None,
    ) -> None:
        self.st, self.num_layers, self.kv_heads, self.bs = state, num_layers, kv_heads, block_size
        self.scale, self.reps, self.decode = scale, representatives, decode
        self.kv = kv if kv is not None and kv.tier is not None else None  # the host tier's, if any
        self._layers = set(range(num_layers))
        # packed steps, per layer: this step's (queries, positions, slots, owned, biases) for `filled`
        self._stash: dict[int, tuple[torch.Tensor, ...]] = {}

    def layers(self) -> set[int]:
        return self._layers

    @staticmethod
    def _kernels(t: torch.Tensor) -> bool:
        """The Triton kernels on CUDA; their references elsewhere (the CPU, and tests)."""
        return t.is_cuda

    # -- every row ---------------------------------------------------------------------------------
    def queries(self, layer: int, q: torch.Tensor, positions: torch.Tensor, inputs: RowInputs) -> None:
        st = self.st
        cfg = inputs[INPUT]
        views = (st.ring_q[layer], st.ring_pos[layer], st.ring_bias[layer], st.mean[layer], st.var[layer])
        if self.decode:
            if self._kernels(q):
                from actserve.kernels import kv_retrieval as kern

                kern.append(q, cfg, *views, st.count[layer], STAT_CAP)
            else:
                ref.append_ref(q, cfg, *views, st.count[layer], STAT_CAP)
            return
        self._merge(layer, q, positions.long(), cfg)

    def _merge(self, layer: int, q: torch.Tensor, pos: torch.Tensor, cfg: torch.Tensor) -> None:
        """A packed step's queries into their slots' running statistics (a batch merge: with one query,
        `append`'s update), then each query's activation bias against them; kept for `filled`."""
        st = self.st
        slot = cfg[:, ref.SLOT].long()
        mine = slot >= 0
        s = torch.where(mine, slot, torch.full_like(slot, st.slots))
        x = q.float().flatten(1)
        w = mine.float()
        nslots = st.count.shape[1]
        cnt = torch.zeros(nslots, device=q.device).index_add_(0, s, w)
        sm = torch.zeros(nslots, x.shape[1], device=q.device).index_add_(0, s, x * w[:, None])
        sq = torch.zeros_like(sm).index_add_(0, s, x * x * w[:, None])
        start = torch.zeros(nslots, device=q.device).index_add_(0, s, (mine & (pos == 0)).float()) > 0
        n0 = torch.where(start, torch.zeros_like(cnt), st.count[layer])
        mu0 = torch.where(start[:, None], torch.zeros_like(sm), st.mean[layer])
        var0 = torch.where(start[:, None], torch.ones_like(sm), st.var[layer])
        c = cnt.clamp(min=1)[:, None]
        bm = sm / c
        bvar = (sq / c - bm * bm).clamp(min=0)
        n = n0 + cnt
        nn = n.clamp(min=1)[:, None]
        delta = bm - mu0
        mu = mu0 + delta * (cnt[:, None] / nn)
        var = (var0 * n0[:, None] + bvar * cnt[:, None] + delta * delta * (n0 * cnt)[:, None] / nn) / nn
        seen = cnt > 0
        st.mean[layer] = torch.where(seen[:, None], mu, st.mean[layer])
        st.var[layer] = torch.where(seen[:, None], var, st.var[layer])
        st.count[layer] = torch.where(seen, n.clamp(max=STAT_CAP), st.count[layer])
        m, v = st.mean[layer, s], st.var[layer, s]
        bias = ((x - m) ** 2 / (v + v.mean(1, keepdim=True) / 100).clamp_min(1e-20)).mean(1)
        self._stash[layer] = (q, pos, s, mine, bias)

    # -- decode rows -------------------------------------------------------------------------------
    def select(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        st, bs = self.st, self.bs
        cfg = inputs[INPUT]
        views = (st.ring_q[layer], st.ring_pos[layer], st.ring_bias[layer])
        rep = st.rep[layer] if st.rep is not None else None
        lo = st.kmin[layer] if st.kmin is not None else None
        hi = st.kmax[layer] if st.kmax is not None else None
        tier = self.kv
        if self.decode and self._kernels(q):
            from actserve.kernels import kv_retrieval as kern

            a, b = kern.query_vectors(q, cfg, *views, self.kv_heads)
            sc = kern.scores(a, b, cfg, tables, lens, rep, lo, hi, bs)
            staging = None
            if tier is not None:
                assert st.held is not None
                staging = (st.held[layer], tier.reserved.start, tier.host_base)
            out, new_len, copies = kern.select(
                sc, tables, lens, cfg, st.entropy, st.remaining, st.counters, layer, st.width, bs,
                ref.ENTROPY_RATE, staging,
            )  # fmt: skip
        else:
            if self.decode:
                a, b = ref.query_vectors_ref(q, cfg, *views, self.kv_heads)
            else:
                a, b = self._packed_vectors(layer, q, cfg)
            sc = ref.scores_ref(a, b, cfg, tables, lens, rep, lo, hi, bs)
            k_sel = ref.budget_ref(sc, cfg, lens, st.entropy, st.remaining, layer, st.width, bs)
            chosen = ref.choose_ref(sc, k_sel)
            out, new_len = ref.tables_ref(tables, lens, cfg, chosen, st.counters, bs)
            copies = None
            if tier is not None:
                assert st.held is not None
                copies = ref.stage_ref(
                    out, lens, cfg, chosen.sum(1), st.held[layer], tier.reserved.start, tier.host_base,
                    st.counters, bs,
                )  # fmt: skip
        if tier is not None and tier.tier is not None and copies is not None:
            tier.tier.recall(layer, *copies)  # the chosen host blocks this slot does not hold yet
        return out, new_len

    def _packed_vectors(
        self, layer: int, q: torch.Tensor, cfg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows of a packed step: their rings do not hold this step's queries yet (`filled`
        writes them), so each row's query goes into a copy of its ring first, as `append` would."""
        st = self.st
        _, qpos, qslot, qmine, qbias = self._stash[layer]
        slot = cfg[:, ref.SLOT].long()
        s = slot.clamp(min=0)
        pos = cfg[:, ref.POS].long()
        # this row's bias: the stashed row of the same slot and position
        match = (qslot.unsqueeze(0) == s.unsqueeze(1)) & (qpos.unsqueeze(0) == pos.unsqueeze(1))
        match &= qmine.unsqueeze(0)
        bias = (match.float() * qbias.unsqueeze(0)).sum(1)
        rows = torch.arange(cfg.shape[0], device=cfg.device)
        at = pos % st.ring
        ring_q, ring_pos = st.ring_q[layer, s].clone(), st.ring_pos[layer, s].clone()
        ring_bias = st.ring_bias[layer, s].clone()
        ring_q[rows, at] = q.to(ring_q.dtype)
        ring_pos[rows, at] = pos
        ring_bias[rows, at] = bias
        local = cfg.clone()
        local[:, ref.SLOT] = torch.where(slot >= 0, rows.to(cfg.dtype), slot.to(cfg.dtype))
        return ref.query_vectors_ref(q, local, ring_q, ring_pos, ring_bias, self.kv_heads)

    # -- blocks that fill --------------------------------------------------------------------------
    def filled(
        self,
        layer: int,
        kv_cache: torch.Tensor,
        blocks: torch.Tensor,
        rows: torch.Tensor,
        inputs: RowInputs,
    ) -> None:
        st = self.st
        cfg = inputs[INPUT]
        rep = st.rep[layer] if st.rep is not None else None
        lo = st.kmin[layer] if st.kmin is not None else None
        hi = st.kmax[layer] if st.kmax is not None else None
        if self.decode:  # the blocks rows completed (-1 none), each with its row
            summaries = (cfg, blocks, rows, kv_cache[0], st.ring_q[layer], rep, lo, hi)
            args = (*summaries, self.bs, self.scale, self.reps)
            if self._kernels(blocks):
                from actserve.kernels import kv_retrieval as kern

                kern.summaries(*args)
            else:
                ref.summaries_ref(*args)
            return
        q, qpos, qslot, qmine, qbias = self._stash.pop(layer)
        if blocks.numel():
            self._summaries(layer, kv_cache, blocks, rows, cfg, q, qpos, qslot, rep, lo, hi)
        nslots = st.ring_pos.shape[1]
        top = torch.full((nslots,), -1, dtype=torch.long, device=q.device)
        top = top.scatter_reduce(0, qslot, torch.where(qmine, qpos, -1), "amax")
        keep = qmine & (qpos > top[qslot] - st.ring)
        where_slot = torch.where(keep, qslot, torch.full_like(qslot, st.slots))
        at = qpos % st.ring
        st.ring_q[layer, where_slot, at] = q.to(st.ring_q.dtype)
        st.ring_pos[layer, where_slot, at] = torch.where(keep, qpos, -1)
        st.ring_bias[layer, where_slot, at] = qbias

    def _summaries(
        self,
        layer: int,
        kv_cache: torch.Tensor,
        blocks: torch.Tensor,
        rows: torch.Tensor,
        cfg: torch.Tensor,
        q: torch.Tensor,
        qpos: torch.Tensor,
        qslot: torch.Tensor,
        rep: torch.Tensor | None,
        lo: torch.Tensor | None,
        hi: torch.Tensor | None,
    ) -> None:
        """Summaries of the blocks a packed step completed; a block's queries come from this step's rows
        where it holds them, from the slot's ring for tokens of earlier steps."""
        st, bs = self.st, self.bs
        ok = (rows >= 0) & (blocks >= 0)
        r = rows.clamp(min=0)
        slot = cfg[r, ref.SLOT].long()
        mine = ok & (slot >= 0)
        s = torch.where(mine, slot, torch.full_like(slot, st.slots))
        b = torch.where(mine, blocks.long(), torch.full_like(slot, st.dump_id))
        last = cfg[r, ref.POS].long()
        offs = torch.arange(bs, device=q.device)
        t = last.unsqueeze(1) - (bs - 1) + offs  # [k, bs] the block's positions
        src = (r.unsqueeze(1) - (last.unsqueeze(1) - t)).clamp(0, q.shape[0] - 1)
        in_step = (qpos[src] == t) & (qslot[src] == s.unsqueeze(1))
        from_ring = st.ring_q[layer, s.unsqueeze(1), t.clamp(min=0) % st.ring]
        qb = torch.where(in_step[..., None, None], q[src].to(from_ring.dtype), from_ring)
        kb = kv_cache[0, blocks.long().clamp(min=0).unsqueeze(1) * bs + offs]  # [k, bs, Hk, D]
        if rep is not None:
            rep.index_copy_(0, b, ref.representatives_ref(qb, kb, self.scale, self.reps).to(rep.dtype))
        if lo is not None and hi is not None:
            lo.index_copy_(0, b, kb.amin(1))
            hi.index_copy_(0, b, kb.amax(1))
