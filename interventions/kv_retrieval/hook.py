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

Lag (`lag=True`: a step with lag-1 rows; docs/architecture.md §10): `select` first assembles the tables
of the lag-1 rows whose previous choice is still valid (`assemble`) and runs the fresh choice above for
the others only (lag-0 rows, and lag-1 rows without one: the first step after the prompt), which also
keeps its choice for the next step; then it chooses for the next step the lagged rows' blocks from this
query, on CUDA on a side stream forked here, so it overlaps the layer's attention and the layers after
it. With a host tier its recalls run on a recall stream of their own, after this layer's attention
(`filled`: a reserved block the step still reads is never overwritten), and land before the next step;
the last layer's `filled` joins both streams back (inside the decode graph). On the CPU the same choice
runs in program order, its staging and recalls in `filled`, after the layer's attention.

All lagged (`all_lagged=True`, CUDA graphs of decode steps whose every retrieving row reads a choice its
previous step made, no host tier): no fresh choice runs on the main stream. `assemble` builds the
lagged rows' tables and gives any other row its whole table (full attention: correct, if slower; the
host only asks for this mode when the device should flag every row), and the query's append, the next
choice (of every lag-1 row) and the filled blocks' summaries all run on the side stream.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from actserve.interventions.base import KVSpace, RowInputs
from actserve.interventions.kv_retrieval.state import RetrievalState
from actserve.kernels import kv_retrieval_ref as ref

INPUT = "kv_retrieval"
COLUMNS = ref.COLUMNS  # slot, method, retrieve, sink, window, pos, offload, lag (kv_retrieval_ref.py)
STAT_CAP = 1024.0  # the running statistics weigh the last ~1024 queries (count capped: an EMA after)
SIDE_PRIORITY = -100  # the side stream's: below the range, so the device's highest (`_fork`)


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
        lag: bool = False,
        all_lagged: bool = False,
    ) -> None:
        self.st, self.num_layers, self.kv_heads, self.bs = state, num_layers, kv_heads, block_size
        self.scale, self.reps, self.decode, self.lag = scale, representatives, decode, lag
        self.kv = kv if kv is not None and kv.tier is not None else None  # the host tier's, if any
        if all_lagged and not (lag and decode and self.kv is None):
            raise ValueError("all_lagged: a decode hook with lag, without a host tier")
        self.all_lagged = all_lagged
        self._ones: dict[int, torch.Tensor] = {}  # all_lagged: a flag of every row, per row count
        self._assembled: Any = None  # all_lagged: this step's tables of every layer (`kern.Lagged`)
        self._layers = set(range(num_layers))
        # packed steps, per layer: this step's (queries, positions, slots, owned, biases) for `filled`
        self._stash: dict[int, tuple[torch.Tensor, ...]] = {}
        # lag: per layer, the next step's choice still to finish in `filled` (CPU: staging, remembering
        # and recalls; CUDA: the recalls the side stream listed, None without a tier)
        self._next: dict[int, tuple[Any, ...]] = {}
        self._side: torch.cuda.Stream | None = None
        self._recalls: torch.cuda.Stream | None = None  # CUDA, host tier: the lagged rows' recalls
        self._forked: list[torch.cuda.Stream] = []  # CUDA: streams with work not yet joined back

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
        if self._forked and layer == 0:  # a step whose last layer's `filled` never came (eager only)
            self._join(q.device)
        views = (st.ring_q[layer], st.ring_pos[layer], st.ring_bias[layer], st.mean[layer], st.var[layer])
        if self.decode:
            if self._kernels(q):
                if self.all_lagged:  # on the side stream, before the next choice (`select`)
                    return
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
    def _staging(self, layer: int) -> tuple[torch.Tensor, int, int] | None:
        """With a host tier: (this layer's held ids, first reserved id, first host id)."""
        if self.kv is None:
            return None
        assert self.st.held is not None
        return self.st.held[layer], self.kv.reserved.start, self.kv.host_base

    def _budget(self, layer: int) -> tuple[Any, ...]:
        """`select`'s budget arguments at this layer (ActQKV's entropy state, counters, sizes)."""
        st = self.st
        return (st.entropy, st.remaining, st.counters, layer, st.width, self.bs, ref.ENTROPY_RATE)

    def _lag_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        st = self.st
        return st.lag_cols[layer], st.lag_at[layer], st.lag_n[layer], st.lag_tag[layer]

    def select(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = inputs[INPUT]
        if self.decode and self._kernels(q):
            if self.all_lagged:
                return self._select_all_lagged(layer, q, tables, lens, cfg)
            return self._select_kernels(layer, q, tables, lens, cfg)
        return self._select_ref(layer, q, tables, lens, cfg)

    def _summaries_of(self, layer: int) -> tuple[torch.Tensor | None, ...]:
        st = self.st
        rep = st.rep[layer] if st.rep is not None else None
        lo = st.kmin[layer] if st.kmin is not None else None
        hi = st.kmax[layer] if st.kmax is not None else None
        return rep, lo, hi

    def _select_kernels(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, cfg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from actserve.kernels import kv_retrieval as kern

        st, bs = self.st, self.bs
        views = (st.ring_q[layer], st.ring_pos[layer], st.ring_bias[layer])
        summ = self._summaries_of(layer)
        staging = self._staging(layer)
        budget = self._budget(layer)
        lagged = None
        cfg_now = cfg
        if self.lag:
            lag = self._lag_views(layer)
            lagged = kern.assemble(cfg, tables, lens, *lag, staging, st.counters, bs)
            cfg_now = lagged.cfg_now
        a, b = kern.query_vectors(q, cfg_now, *views, self.kv_heads)
        sc = kern.scores(a, b, cfg_now, tables, lens, *summ, bs)
        out, new_len, copies = kern.select(
            sc, tables, lens, cfg, *budget, staging,
            lag=(lagged.flag, *self._lag_views(layer), 1, lagged.out, lagged.new_len, lagged.copies)
            if lagged
            else None,
        )  # fmt: skip
        if lagged is not None:  # the next step's choice of the lagged rows, on the side stream
            with self._fork(q.device):
                a2, b2 = kern.query_vectors(q, lagged.cfg_next, *views, self.kv_heads)
                sc2 = kern.scores(a2, b2, lagged.cfg_next, tables, lens, *summ, bs)
                _, _, later = kern.select(
                    sc2, tables, lens, cfg, *budget, staging,
                    lag=(lagged.flag, *self._lag_views(layer), 2, None, None, None),
                )  # fmt: skip
            if self._side is not None:
                for t in (q, tables, lens, cfg, lagged.cfg_next, lagged.flag):
                    t.record_stream(self._side)  # main-stream memory the side stream still reads
            self._next[layer] = ("kernels", later)
        if self.kv is not None and self.kv.tier is not None and copies is not None:
            self.kv.tier.recall(layer, *copies)  # the chosen host blocks this slot does not hold yet
        return out, new_len

    def _select_all_lagged(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, cfg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables from the previous step's choice (`assemble`, whole tables for any row it does not
        flag); then, on the side stream, the query's append and every lag-1 row's next choice.

        Every layer's choice was made at the previous step, so the first layer assembles them all in one
        launch (its layer's side-stream work, which overwrites its choice, is forked after it)."""
        from actserve.kernels import kv_retrieval as kern

        st, bs = self.st, self.bs
        if layer == 0 or self._assembled is None:
            views = (st.lag_cols, st.lag_at, st.lag_n, st.lag_tag)
            self._assembled = kern.assemble(cfg, tables, lens, *views, None, st.counters, bs, full=True)
        lagged = self._assembled
        rows = cfg.shape[0]
        if rows not in self._ones:
            self._ones[rows] = torch.ones(rows, dtype=torch.int32, device=cfg.device)
        every = self._ones[rows]
        views = (st.ring_q[layer], st.ring_pos[layer], st.ring_bias[layer])
        budget = self._budget(layer)
        with self._fork(q.device):
            kern.append(q, cfg, *views, st.mean[layer], st.var[layer], st.count[layer], STAT_CAP)
            a, b = kern.query_vectors(q, cfg, *views, self.kv_heads)
            sc = kern.scores(a, b, cfg, tables, lens, *self._summaries_of(layer), bs)
            kern.select(
                sc, tables, lens, cfg, *budget, None,
                lag=(every, *self._lag_views(layer), 2, None, None, None),
            )  # fmt: skip
        if self._side is not None:
            for t in (q, tables, lens, cfg):
                t.record_stream(self._side)  # main-stream memory the side stream still reads
        return lagged.out[layer], lagged.new_len[layer]

    def _fork(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """CUDA: the side stream, after the work queued so far on the current one (this layer's queries
        and tables); elsewhere (Triton's interpreter in tests) program order.

        The side stream has the device's highest priority (captured into the graph's kernel nodes,
        which PyTorch instantiates with per-node priorities): its kernels are few and small, but at
        normal priority their programs queued behind the main stream's, whose next kernel is already
        launched under PDL, so the choice of layer l finished layers later and the step waited for it
        at the end (bench/results/kv_retrieval_speed_side_stream_ab.json)."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        self._side = self._open(self._side, device)
        return torch.cuda.stream(self._side)

    def _fork_recalls(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """CUDA: the recall stream, after this layer's attention (the current stream: a reserved block
        the step still reads is never overwritten) and the side stream's staging of the layer's next
        choice (which listed the copies); elsewhere program order.

        Recalls get a stream of their own so that the next layer's choice does not queue behind them on
        the side stream (PCIe-bound: ~140 us a layer at batch 4 with a quarter of the blocks recalled)."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        self._recalls = self._open(self._recalls, device)
        if self._side in self._forked:
            self._recalls.wait_stream(self._side)
        return torch.cuda.stream(self._recalls)

    def _open(self, stream: torch.cuda.Stream | None, device: torch.device) -> torch.cuda.Stream:
        """`stream` (made at SIDE_PRIORITY the first time) after the work queued so far on the current
        stream, and joined back at the step's end (`_join`)."""
        if stream is None:
            stream = torch.cuda.Stream(device=device, priority=SIDE_PRIORITY)
        stream.wait_stream(torch.cuda.current_stream(device))
        if stream not in self._forked:
            self._forked.append(stream)
        return stream

    def _join(self, device: torch.device) -> None:
        """The main stream waits for the streams forked in this step (before the step ends); only those:
        waiting during a graph capture on a stream with uncaptured work is an error."""
        for s in self._forked:
            torch.cuda.current_stream(device).wait_stream(s)
        self._forked = []

    def _vectors(self, layer: int, q: torch.Tensor, cfg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.st
        if self.decode:
            views = (st.ring_q[layer], st.ring_pos[layer], st.ring_bias[layer])
            return ref.query_vectors_ref(q, cfg, *views, self.kv_heads)
        return self._packed_vectors(layer, q, cfg)

    def _choose_ref(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, cfg: torch.Tensor
    ) -> torch.Tensor:
        """[R, W] bool: the rows of `cfg` choose from this query (ActQKV's layer budget updated)."""
        st, bs = self.st, self.bs
        a, b = self._vectors(layer, q, cfg)
        sc = ref.scores_ref(a, b, cfg, tables, lens, *self._summaries_of(layer), bs)
        k_sel = ref.budget_ref(sc, cfg, lens, st.entropy, st.remaining, layer, st.width, bs)
        return ref.choose_ref(sc, k_sel)

    def _select_ref(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, cfg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernels' semantics in plain torch (the CPU): with lag, the lagged rows' tables from their
        previous choice, the others' from a fresh one (kept for the next step when lag 1), and the
        lagged rows' next choice from this query (finished in `filled`)."""
        st, bs = self.st, self.bs
        staging = self._staging(layer)
        held = staging[0] if staging is not None else None
        flag = torch.zeros(cfg.shape[0], dtype=torch.bool, device=cfg.device)
        if self.lag:
            flag = ref.lagged_ref(
                cfg, tables, lens, st.lag_cols[layer], st.lag_n[layer], st.lag_tag[layer], bs
            )
        cfg_now = ref.only_rows(cfg, ~flag)
        chosen = self._choose_ref(layer, q, tables, lens, cfg_now)
        out, new_len = ref.tables_ref(tables, lens, cfg_now, chosen, st.counters, bs)
        at = torch.full((cfg.shape[0], st.width), -1, dtype=torch.int32, device=cfg.device)
        copies = None
        if staging is not None:
            copies = ref.stage_ref(
                out,
                lens,
                cfg_now,
                chosen.sum(1),
                held,
                staging[1],
                staging[2],
                st.counters,
                bs,
                at,  # type: ignore[arg-type]
            )
        if self.lag:
            ref.remember_ref(cfg_now, chosen, at, *self._lag_views(layer))
            cfg_next = ref.only_rows(cfg, flag)
            lo, ln = ref.assemble_ref(
                tables, lens, cfg_next, st.lag_cols[layer], st.lag_n[layer], st.counters, bs
            )
            if staging is not None:  # the choice's host blocks: where they are held, or recalled
                s = cfg_next[:, ref.SLOT].long().clamp(min=0)
                m = torch.where(flag, st.lag_n[layer][s].long(), 0)
                more = ref.stage_ref(lo, lens, cfg_next, m, held, staging[1], staging[2], st.counters, bs)  # type: ignore[arg-type]
                copies = more if copies is None else tuple(x + y for x, y in zip(copies, more, strict=True))  # type: ignore[assignment]
            out = torch.where(flag.unsqueeze(1), lo, out)
            new_len = torch.where(flag, ln, new_len)
            later = self._choose_ref(layer, q, tables, lens, cfg_next)
            self._next[layer] = ("ref", later, tables, lens, cfg_next)
        if self.kv is not None and self.kv.tier is not None and copies is not None:
            self.kv.tier.recall(layer, *copies)  # the chosen host blocks this slot does not hold yet
        return out, new_len

    def _finish_next(self, layer: int, device: torch.device) -> None:
        """After the layer's attention: the next step's choice of the lagged rows staged (their host
        blocks recalled into reserved blocks the step no longer reads) and remembered. CUDA: only the
        recalls (on the side stream); the last layer joins the side stream back."""
        if layer not in self._next:
            if layer == self.num_layers - 1:
                self._join(device)
            return
        kind, *later = self._next.pop(layer)
        tier = self.kv.tier if self.kv is not None else None
        if kind == "kernels":  # staged by the kernel: the recalls, after this layer's attention
            copies = later[0]
            if copies is not None and tier is not None:
                with self._fork_recalls(device):
                    tier.recall(layer, *copies)
                if self._recalls is not None:
                    for t in copies:
                        t.record_stream(self._recalls)  # listed on the side stream, read here
            if layer == self.num_layers - 1:
                self._join(device)
            return
        chosen, tables, lens, cfg = later
        st, bs = self.st, self.bs
        staging = self._staging(layer)
        at = torch.full((cfg.shape[0], st.width), -1, dtype=torch.int32, device=cfg.device)
        if staging is not None:
            scratch = torch.zeros(3, dtype=st.counters.dtype, device=cfg.device)  # read at assembly
            out, _ = ref.tables_ref(tables, lens, cfg, chosen, scratch, bs)
            copies = ref.stage_ref(
                out, lens, cfg, chosen.sum(1), staging[0], staging[1], staging[2], st.counters, bs, at
            )
            if tier is not None:
                tier.recall(layer, *copies)
        ref.remember_ref(cfg, chosen, at, *self._lag_views(layer))

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

                if self.all_lagged:  # after the side stream's append (the block's queries), off the path
                    with self._fork(kv_cache.device):
                        kern.summaries(*args)
                    if self._side is not None:
                        for t in (cfg, blocks, rows):
                            t.record_stream(self._side)
                else:
                    kern.summaries(*args)
            else:
                ref.summaries_ref(*args)
            self._finish_next(layer, kv_cache.device)
            return
        self._finish_next(layer, kv_cache.device)  # before the rings take this step's queries
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
