"""The attention hook of `kv_retrieval` (docs/architecture.md §6 attention hook point, §10 "KV
retrieval"): it watches every row's queries, selects each decode row's blocks per layer, and writes a
block's summaries when it fills.

Per row everything comes from the row input `kv_retrieval` (`COLUMNS`; slot -1 = not a retrieving row,
whose table and length come back unchanged), and all work is device ops of fixed shapes, so decode
steps replay it from CUDA graphs. Order within a layer: `queries` (running statistics; the step's
queries kept for `filled`), `select` (decode rows), attention, `filled` (summaries of the blocks the
step completed, then the step's queries into the slot's ring).
"""

from __future__ import annotations

import torch

from actserve.interventions.base import RowInputs
from actserve.interventions.kv_retrieval import methods as M
from actserve.interventions.kv_retrieval.state import RetrievalState

INPUT = "kv_retrieval"
# the row input's columns: slot, method id, retrieved blocks per layer, sink blocks, window blocks,
# the row's position, whether the row's cold blocks live on the host (1) or not (0)
SLOT, METHOD, RETRIEVE, SINK, WINDOW, POS, OFFLOAD = range(7)
COLUMNS = 7
STAT_CAP = 1024.0  # the running statistics weigh the last ~1024 queries (count capped: an EMA after)
ENTROPY_RATE = 0.1  # ActQKV's running entropy per layer: an EMA with this weight on the newest step


class RetrievalHook:
    def __init__(
        self,
        state: RetrievalState,
        num_layers: int,
        kv_heads: int,
        block_size: int,
        scale: float,
        representatives: int,
        methods: frozenset[int],
        offload: bool,
    ) -> None:
        self.st, self.num_layers, self.kv_heads, self.bs = state, num_layers, kv_heads, block_size
        self.scale, self.reps, self.methods, self.offload = scale, representatives, methods, offload
        self._layers = set(range(num_layers))
        # per layer: this step's (queries, positions, slots, owned) from `queries`, read by `filled`
        self._stash: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def layers(self) -> set[int]:
        return self._layers

    def _slots(self, cfg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot per row, the dump slot for rows without a plan; owned [rows] bool)."""
        slot = cfg[:, SLOT].long()
        mine = slot >= 0
        return torch.where(mine, slot, torch.full_like(slot, self.st.slots)), mine

    # -- every row ---------------------------------------------------------------------------------
    def queries(self, layer: int, q: torch.Tensor, positions: torch.Tensor, inputs: RowInputs) -> None:
        """Merge the rows' queries into their slots' running mean and variance (a sequence restarting at
        position 0 starts them afresh), and keep the step's queries for `filled`."""
        st = self.st
        s, mine = self._slots(inputs[INPUT])
        pos = positions.long()
        self._stash[layer] = (q, pos, s, mine)
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

    # -- decode rows -------------------------------------------------------------------------------
    def select(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        st, bs = self.st, self.bs
        cfg = inputs[INPUT]
        s, mine = self._slots(cfg)
        method = cfg[:, METHOD].long()
        k = cfg[:, RETRIEVE].long()
        sink, window = cfg[:, SINK].long().clamp(min=0), cfg[:, WINDOW].long().clamp(min=0)
        off = mine & (cfg[:, OFFLOAD] > 0)
        w = tables.shape[1]
        n = (lens.long() + bs - 1) // bs
        win_start = torch.maximum(n - window, sink)
        n_cand = (win_start - sink).clamp(min=0)
        col = torch.arange(w, device=tables.device).unsqueeze(0)
        cand = (col >= sink.unsqueeze(1)) & (col < win_start.unsqueeze(1))
        scores = self._scores(layer, q, tables, n, s, cfg, method)
        scores = torch.where(cand, scores, float("-inf"))
        k_sel = k
        if M.ACTQKV in self.methods:
            k_sel = torch.where(method == M.ACTQKV, self._actqkv_blocks(layer, scores, n_cand, s, mine, k), k)
        cols, m = M.choose(scores, torch.minimum(k_sel, n_cand), st.width)
        retrieve = mine & ((n_cand > k) | off)
        kk = cols.shape[1]
        st.sel_cols[s, layer, :kk] = cols.to(torch.int32)
        st.sel_n[s, layer] = m.to(torch.int32)
        st.counters += torch.stack([(m * retrieve).sum(), retrieve.sum()]).double()
        out_t, out_l = M.build_tables(tables, lens, sink, win_start, cols, m, bs, mid_are_ids=False)
        pick = (retrieve & ~off).unsqueeze(1)
        new_t, new_l = torch.where(pick, out_t, tables), torch.where(pick.squeeze(1), out_l, lens)
        if self.offload:  # the blocks recalled for the previous step's choice (the host staged them)
            ids, cnt = st.att_ids[s, layer], st.att_n[s, layer].long()
            off_t, off_l = M.build_tables(tables, lens, sink, win_start, ids, cnt, bs, mid_are_ids=True)
            new_t = torch.where(off.unsqueeze(1), off_t, new_t)
            new_l = torch.where(off, off_l, new_l)
        return new_t, new_l

    def _scores(
        self,
        layer: int,
        q: torch.Tensor,
        tables: torch.Tensor,
        n: torch.Tensor,
        s: torch.Tensor,
        cfg: torch.Tensor,
        method: torch.Tensor,
    ) -> torch.Tensor:
        """Each row's score of each of its blocks by its method (only the methods this hook serves)."""
        st, hk = self.st, self.kv_heads
        out: torch.Tensor | None = None
        for m in sorted(self.methods):
            if m == M.QUEST:
                assert st.kmin is not None and st.kmax is not None
                pos_part, neg_part = M.quest_terms(q, hk)
                sc = M.block_scores(pos_part, st.kmax[layer], tables, n, neg_part, st.kmin[layer])
            else:
                assert st.rep is not None
                probe = self._probe(layer, q, s, cfg) if m == M.ACTQKV else q
                sc = M.block_scores(M.fold_heads(probe, hk), st.rep[layer], tables, n)
            out = sc if out is None else torch.where((method == m).unsqueeze(1), sc, out)
        assert out is not None
        return out

    def _probe(self, layer: int, q: torch.Tensor, s: torch.Tensor, cfg: torch.Tensor) -> torch.Tensor:
        """ActQKV's probe from the slot's ring (positions in the last `ring` before this one) and the
        current query."""
        st = self.st
        pos = cfg[:, POS].long()
        ring = st.ring_q[layer, s]  # [R, T, Hq, D]
        rp = st.ring_pos[layer, s]
        valid = (rp >= 0) & (rp < pos[:, None]) & (rp > pos[:, None] - st.ring)
        ring = torch.cat([ring, q.unsqueeze(1).to(ring.dtype)], 1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
        return M.activation_probe(ring, valid, st.mean[layer, s], st.var[layer, s])

    def _actqkv_blocks(
        self,
        layer: int,
        scores: torch.Tensor,
        n_cand: torch.Tensor,
        s: torch.Tensor,
        mine: torch.Tensor,
        k: torch.Tensor,
    ) -> torch.Tensor:
        """This layer's block count: its running entropy (updated with this step's scores) against the
        layers after it, from what the step's earlier layers left (layer 0 starts with layers x k)."""
        st = self.st
        h = M.normalized_entropy(scores, n_cand)
        upd = mine & (n_cand >= 2)
        old = st.entropy[s, layer]
        st.entropy[s, layer] = torch.where(upd, (1 - ENTROPY_RATE) * old + ENTROPY_RATE * h, old)
        remaining = st.remaining[s]
        if layer == 0:
            remaining = (k * self.num_layers).float()
        kmin, kmax = (k // 2).clamp(min=1), torch.clamp(2 * k, max=st.width)
        k_l = M.layer_blocks(st.entropy[s], layer, remaining, kmin, kmax)
        st.remaining[s] = remaining - k_l.float()
        return k_l

    # -- blocks that fill --------------------------------------------------------------------------
    def filled(
        self,
        layer: int,
        kv_cache: torch.Tensor,
        blocks: torch.Tensor,
        rows: torch.Tensor,
        inputs: RowInputs,
    ) -> None:
        """Summaries of the filled blocks of retrieving rows (others write the dump id), then the step's
        queries into their slots' rings (the last `ring` positions of each slot)."""
        st = self.st
        cfg = inputs[INPUT]
        q, qpos, qslot, qmine = self._stash.pop(layer)
        if blocks.numel():
            self._summaries(layer, kv_cache, blocks, rows, cfg, q, qpos, qslot)
        nslots = st.ring_pos.shape[1]
        top = torch.full((nslots,), -1, dtype=torch.long, device=q.device)
        top = top.scatter_reduce(0, qslot, torch.where(qmine, qpos, -1), "amax")
        keep = qmine & (qpos > top[qslot] - st.ring)
        where_slot = torch.where(keep, qslot, torch.full_like(qslot, st.slots))
        at = qpos % st.ring
        st.ring_q[layer, where_slot, at] = q.to(st.ring_q.dtype)
        st.ring_pos[layer, where_slot, at] = torch.where(keep, qpos, -1)

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
    ) -> None:
        st, bs = self.st, self.bs
        ok = (rows >= 0) & (blocks >= 0)
        r = rows.clamp(min=0)
        slot = cfg[r, SLOT].long()
        mine = ok & (slot >= 0)
        s = torch.where(mine, slot, torch.full_like(slot, st.slots))
        b = torch.where(mine, blocks.long(), torch.full_like(slot, st.dump_id))
        last = cfg[r, POS].long()
        offs = torch.arange(bs, device=q.device)
        t = last.unsqueeze(1) - (bs - 1) + offs  # [k, bs] the block's positions
        src = (r.unsqueeze(1) - (last.unsqueeze(1) - t)).clamp(0, q.shape[0] - 1)
        in_step = (qpos[src] == t) & (qslot[src] == s.unsqueeze(1))
        from_ring = st.ring_q[layer, s.unsqueeze(1), t.clamp(min=0) % st.ring]
        qb = torch.where(in_step[..., None, None], q[src].to(from_ring.dtype), from_ring)
        kb = kv_cache[0, blocks.long().clamp(min=0).unsqueeze(1) * bs + offs]  # [k, bs, Hk, D]
        if st.rep is not None:
            rep = M.representatives(qb, kb, self.scale, self.reps)
            st.rep[layer].index_copy_(0, b, rep.to(st.rep.dtype))
        if st.kmin is not None and st.kmax is not None:
            lo, hi = M.quest_bounds(kb)
            st.kmin[layer].index_copy_(0, b, lo)
            st.kmax[layer].index_copy_(0, b, hi)
