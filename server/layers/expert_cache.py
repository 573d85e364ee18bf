"""Expert offloading (docs/architecture.md §5, "Expert offloading"; §10): every expert's weights in host
memory (pinned on CUDA, one copy), a cache of fewer slots per MoE layer on the device, and per layer call:

1. **Resolve** the step's needed experts (the union over rows of the routed ids, read on the host) to
   slots. A hit is used where it is; a miss is either copied host -> device into a slot or computed on the
   CPU for the rows routed to it (Fiddler / KTransformers style), whichever the `CostModel` finds faster
   for that step's rows (copies and CPU work run at the same time, so each miss goes to the queue that
   finishes it first). Eviction is least-recently-used among the experts the rest of the step does not
   need: an expert still needed is never evicted. When the step needs more experts than there are slots
   (a prefill), it runs in rounds: each round's experts are made resident and computed, and only then
   may the next round evict them.
2. **Predict and prefetch** (ExpertFlow): the routers of the next `prefetch_depth` MoE layers are applied
   to this layer's input; their top-k experts are copied ahead of need on the copier's side stream, most
   probable first, at most a layer's slots. A wrong guess is a miss later, fetched then. Predicted
   experts are protected from eviction by other prefetches of the same step and count as recently used.
3. **Order** copies and kernels through a `Copier` (server/layers/expert_copier.py): each slot whose copy
   is pending keeps its handle, and a kernel waits for exactly the handles of the slots it reads.

Results: on the CPU every pair's float32 product is computed from the same weights over the same rows as
with every expert resident, and the columns are summed once, so the logits are bit-identical. On CUDA a
step with one round and no CPU expert launches the all-resident kernels on the same data (identical
bits); several rounds or CPU experts add float32 partial sums (rounding differs by the last bits).

The above is the *eager* path (host syncs every layer, no CUDA graphs). With zero copy on
(`OffloadConfig.zero_copy`, the default where the measured costs allow it) steps of up to
ZERO_COPY_PAIRS_PER_EXPERT pairs per expert (decode steps, short prompts, every CUDA-graph capture) take
none of it: the kernel reads a missing expert from its pinned host copy, and the cache is refilled
between steps (server/layers/expert_zero_copy.py); longer prompts still take the eager path, which copies
each expert once instead of reading it over PCIe once per block of rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from actserve.kernels.moe_ref import expert_pairs_ref, sum_columns
from actserve.server.layers.expert_copier import make_copier
from actserve.server.layers.expert_metrics import (
    COPY_BYTES,
    CORRECT,
    CPU_EXPERTS,
    DISTINCT,
    HITS,
    MISSES,
    PREDICTED,
    RESIDENT_BYTES,
    SERIES,
    USED,
)
from actserve.server.layers.expert_zero_copy import ZeroCopySteps
from actserve.server.layers.linear import linear
from actserve.server.layers.telemetry import Telemetry

if TYPE_CHECKING:
    from actserve.server.layers.moe import SparseMoeBlock

log = logging.getLogger(__name__)

CPU_MODES = ("auto", "never", "always")
ZERO_COPY_MODES = ("auto", "on", "off")

# zero-copy steps: at most this many routed pairs per expert on average (rows x k / experts); the grouped
# kernel reads an expert once per block of rows (up to 128), so beyond this an eager copy is cheaper
ZERO_COPY_PAIRS_PER_EXPERT = 64


@dataclass(frozen=True)
class OffloadConfig:
    """`slots`: device slots per MoE layer (1 .. experts - 1). `prefetch_depth`: MoE layers ahead whose
    routers predict, in eager steps (0: no prefetch). `cpu_compute`: misses of eager steps go to the CPU
    when the cost model says so ("auto"), never while a slot can take them ("never"), or always ("always":
    no copy after start). `zero_copy`: small steps read misses from host memory in the kernel and run in
    CUDA graphs ("on"), never ("off"), or when the measured costs say reading an expert over PCIe beats
    computing it on the CPU ("auto"). `admit_after`: zero-copy steps: an expert missed in this many
    consecutive steps is copied into a slot between steps (0: never)."""

    slots: int
    prefetch_depth: int = 0
    cpu_compute: str = "auto"
    zero_copy: str = "auto"
    admit_after: int = 1

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"expert cache: slots per layer must be >= 1, got {self.slots}")
        if self.prefetch_depth < 0:
            raise ValueError(f"expert prefetch depth must be >= 0, got {self.prefetch_depth}")
        if self.cpu_compute not in CPU_MODES:
            raise ValueError(
                f"expert CPU compute must be one of {', '.join(CPU_MODES)}, got {self.cpu_compute!r}"
            )
        if self.zero_copy not in ZERO_COPY_MODES:
            raise ValueError(
                f"expert zero copy must be one of {', '.join(ZERO_COPY_MODES)}, got {self.zero_copy!r}"
            )
        if self.zero_copy == "on" and self.cpu_compute == "always":
            raise ValueError(
                "expert zero copy on reads missing experts on the GPU: it cannot be combined with CPU "
                "compute always"
            )
        if self.admit_after < 0:
            raise ValueError(f"expert admit-after must be >= 0 (0: never copy), got {self.admit_after}")


@dataclass(frozen=True)
class CostModel:
    """Seconds one missing expert costs: copied, `bytes / bandwidth`; on the CPU for n rows,
    `cpu_fixed + n * cpu_per_row`. Measured at start on CUDA (`measure_costs`); the CPU-only default is a
    fixed guess (there the "copy" is a memory copy and costs less than computing)."""

    bandwidth: float = 10e9
    cpu_fixed: float = 1e-3
    cpu_per_row: float = 1e-4
    measured: bool = False

    def copy_s(self, nbytes: int) -> float:
        return nbytes / self.bandwidth

    def cpu_s(self, rows: int) -> float:
        return self.cpu_fixed + rows * self.cpu_per_row

    def assign(self, misses: list[tuple[int, int]], nbytes: int) -> tuple[list[int], list[int]]:
        """(experts to copy, experts to compute on the CPU) for misses given as (expert, rows). Copies and
        CPU work proceed at once: taking misses with the most rows first, each goes to whichever queue
        would finish it sooner."""
        copy: list[int] = []
        cpu: list[int] = []
        t_copy = t_cpu = 0.0
        for expert, rows in sorted(misses, key=lambda m: (-m[1], m[0])):
            by_copy, by_cpu = t_copy + self.copy_s(nbytes), t_cpu + self.cpu_s(rows)
            if by_cpu < by_copy:
                cpu.append(expert)
                t_cpu = by_cpu
            else:
                copy.append(expert)
                t_copy = by_copy
        return copy, cpu


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device's queued work: on CUDA through a pinned
    staging buffer (the pinned allocator keeps it until the copy has run), so a layer's later rounds
    do not wait for its earlier kernels on the host."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class LayerCache:
    """One MoE layer's device slots: which expert each holds, the expert -> slot table, the last use of
    each expert (a tick), the pending copy handle of each slot, and this step's prediction."""

    def __init__(self, layer: int, experts: Any, manager: ExpertOffload) -> None:
        self.layer, self.experts, self.manager = layer, experts, manager
        e = experts.num_experts
        self.num_experts = e
        self.slots = experts.w13.shape[0]
        self.expert_at = np.full(self.slots, -1, dtype=np.int64)
        self.slot_of = np.full(e, -1, dtype=np.int64)
        self.last_use = np.zeros(e, dtype=np.int64)
        self.pending: dict[int, Any] = {}
        self.predicted: np.ndarray | None = None  # summed router scores [experts] for this step, or None

    @property
    def expert_bytes(self) -> int:
        m = self.experts
        return (m.host_w13[0].numel() + m.host_w2[0].numel()) * m.host_w13.element_size()

    def reset(self, slots: int) -> None:
        """Empty `slots` slots (the device tensors already have that many)."""
        self.slots = slots
        self.expert_at = np.full(slots, -1, dtype=np.int64)
        self.slot_of[:] = -1
        self.last_use[:] = 0
        self.pending.clear()
        self.predicted = None

    def fill(self) -> None:
        """Experts 0 .. slots - 1 into the slots, synchronously (after loading)."""
        m = self.experts
        self.reset(self.slots)
        with torch.no_grad():
            for s in range(min(self.slots, self.num_experts)):
                m.w13[s].copy_(m.host_w13[s])
                m.w2[s].copy_(m.host_w2[s])
                self.expert_at[s], self.slot_of[s] = s, s
        self.upload()

    def upload(self) -> None:
        """The device table `slot_of` (-1: not resident, or its copy still in flight), which zero-copy
        kernels read."""
        table = self.slot_of.astype(np.int32)
        for slot in self.pending:
            if self.expert_at[slot] >= 0:
                table[self.expert_at[slot]] = -1
        self.publish(table)

    def publish(self, table: np.ndarray) -> None:
        """Copy `table` [experts] int32 into the device table, queued on the compute stream (after the
        kernels queued so far, before those queued next)."""
        dest = self.experts.slot_of
        src = torch.from_numpy(table)
        with torch.no_grad():
            if dest.is_cuda:  # from pinned memory, without waiting (the host allocator keeps it alive)
                dest.copy_(src.pin_memory(), non_blocking=True)
            else:
                dest.copy_(src)

    def victim(self, protect: np.ndarray) -> int | None:
        """A free slot, else the slot of the least recently used expert not in `protect` (a bool mask
        over experts); None when every slot holds a protected expert."""
        free = np.nonzero(self.expert_at < 0)[0]
        if free.size:
            return int(free[0])
        held = self.expert_at
        ok = ~protect[held]
        if not ok.any():
            return None
        cand = np.nonzero(ok)[0]
        return int(cand[np.argmin(self.last_use[held[cand]])])

    def load(self, expert: int, slot: int, tick: int) -> None:
        """Queue the copy of `expert` into `slot` (the caller marks the handle after a batch)."""
        old = int(self.expert_at[slot])
        if old >= 0:
            self.slot_of[old] = -1
        self.copy_in(expert, slot)
        self.expert_at[slot], self.slot_of[expert] = expert, slot
        self.last_use[expert] = tick

    def copy_in(self, expert: int, slot: int) -> None:
        """Queue the copy of `expert`'s weights into `slot` on the copier (the host state is the caller's)."""
        m, copier = self.experts, self.manager.copier
        copier.copy(m.w13[slot], m.host_w13[expert])
        copier.copy(m.w2[slot], m.host_w2[expert])
        self.manager.telemetry.add(COPY_BYTES, self.expert_bytes)

    def loaded(self, slots: Iterable[int]) -> None:
        """A handle for the copies just queued, kept for each of `slots`."""
        slots = list(slots)
        if slots:
            handle = self.manager.copier.mark()
            for s in slots:
                self.pending[s] = handle

    def wait_for(self, slots: Iterable[int]) -> None:
        """The compute stream waits for the pending copies of exactly these slots."""
        seen: set[int] = set()
        for s in slots:
            handle = self.pending.pop(int(s), None)
            if handle is not None and id(handle) not in seen:
                seen.add(id(handle))
                self.manager.copier.wait(handle)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, top_k: int) -> torch.Tensor:
        steps = self.manager.zero_copy_steps(x.shape[0] * ids.shape[1], self.num_experts)
        if steps is None:
            return self.manager.run(self, x, ids, weights, top_k)
        from actserve.server.layers.moe import run_experts

        m = self.experts
        assert m.host_w13 is not None and m.host_w2 is not None
        return run_experts(
            x, m.w13, m.w2, ids, weights, top_k, self.num_experts, table=m.slot_of,
            host=(m.host_w13, m.host_w2), counts=steps.counts(self),
        )  # fmt: skip


class ExpertOffload:
    """The expert cache of one model: a `LayerCache` per MoE layer, the copier, the cost model, the
    prefetcher and the counters (`telemetry`). Also the engine's admission preference (`scores`)."""

    def __init__(
        self,
        blocks: list[tuple[int, SparseMoeBlock]],
        config: OffloadConfig,
        device: torch.device,
        embed: nn.Module | None = None,
        router_norm: nn.Module | None = None,
    ) -> None:
        self.config, self.device = config, device
        self.order = [i for i, _ in blocks]
        self.blocks = dict(blocks)
        self.caches = {i: LayerCache(i, b.experts, self) for i, b in blocks}
        for i, b in blocks:
            b.experts.cache = self.caches[i]
        self.copier = make_copier(device)
        self.cost = CostModel()
        self.telemetry = Telemetry(SERIES)
        self.tick = 0
        self.embed, self.router_norm = embed, router_norm
        # sum every pair's float32 product once (exact; the CPU), or add each round's and the CPU experts'
        # results (CUDA, whose kernel sums its own columns); tests set False on the CPU to run the latter
        self.pairwise = device.type == "cpu"
        self._distinct: list[int] = []
        self.running_experts: set[int] = set()  # used at the first MoE layer by the last forward
        self._token_experts: dict[int, set[int]] = {}
        self.telemetry.set(RESIDENT_BYTES, self.resident_bytes())
        self.zero_copy: ZeroCopySteps | None = None  # `start` decides

    def start(self) -> None:
        """After loading: measure the costs (CUDA), then turn zero-copy steps on where the configuration
        asks or (auto) where reading an expert over PCIe beats computing it on the CPU for one row."""
        self.measure_costs()
        mode, cpu = self.config.zero_copy, self.config.cpu_compute
        cache = self.caches[self.order[0]]
        on = mode == "on" or (
            mode == "auto"
            and cpu != "always"
            and (cpu == "never" or self.cost.copy_s(cache.expert_bytes) <= self.cost.cpu_s(1))
        )
        host = cache.experts.host_w13
        if on and self.device.type == "cuda" and not host.is_pinned():
            if mode == "on":
                raise ValueError("expert zero copy needs the host copy of the experts in pinned memory")
            log.warning("expert cache: the host copy is not pinned; zero copy off (eager steps)")
            on = False
        self.zero_copy = ZeroCopySteps(self, self.config.admit_after) if on else None
        self.telemetry.on_read = self.zero_copy.poll if self.zero_copy is not None else None
        for c in self.caches.values():
            c.upload()

    def zero_copy_steps(self, pairs: int, experts: int) -> ZeroCopySteps | None:
        """The zero-copy state when a layer call of `pairs` routed pairs takes the zero-copy path: always
        while a CUDA graph is captured, else up to ZERO_COPY_PAIRS_PER_EXPERT pairs per expert."""
        if self.zero_copy is None:
            return None
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing or pairs <= ZERO_COPY_PAIRS_PER_EXPERT * experts:
            return self.zero_copy
        return None

    def before_step(self) -> None:
        """The engine, before a step's forward ops: the zero-copy refill (nothing when eager)."""
        if self.zero_copy is not None:
            self.zero_copy.before_step()

    def after_step(self) -> None:
        """The engine, after a step's forward ops are queued: their statistics towards the host."""
        if self.zero_copy is not None:
            self.zero_copy.after_step()

    def flush_stats(self) -> None:
        """Wait for the zero-copy statistics of every step run so far and count them (benchmarks, tests)."""
        if self.zero_copy is not None:
            self.zero_copy.flush()

    # -- set-up --------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.caches[self.order[0]].slots

    def host_bytes(self) -> int:
        """The host copy of every expert, all MoE layers."""
        return sum(c.num_experts * c.expert_bytes for c in self.caches.values())

    def resident_bytes(self) -> int:
        return sum(c.slots * c.expert_bytes for c in self.caches.values())

    def refill(self) -> None:
        """Fill every layer's slots afresh (the layers fill their own after loading) and publish the
        resident bytes."""
        for c in self.caches.values():
            c.fill()
        self.telemetry.set(RESIDENT_BYTES, self.resident_bytes())

    def configure(
        self,
        slots: int | None = None,
        prefetch_depth: int | None = None,
        cpu_compute: str | None = None,
        admit_after: int | None = None,
    ) -> None:
        """Change the cache at run time (benchmarks compare settings on one loaded model): a new slot count
        reallocates the device slots and refills them (not with zero copy on CUDA: graphs captured the
        slots' addresses). Whether steps are zero-copy is fixed at start."""
        new = OffloadConfig(
            slots if slots is not None else self.config.slots,
            prefetch_depth if prefetch_depth is not None else self.config.prefetch_depth,
            cpu_compute if cpu_compute is not None else self.config.cpu_compute,
            self.config.zero_copy,
            admit_after if admit_after is not None else self.config.admit_after,
        )
        if self.zero_copy is not None:
            if new.cpu_compute == "always":
                raise ValueError("CPU compute always needs the eager path; this cache runs zero-copy steps")
            self.zero_copy.admit_after = new.admit_after
        if new.slots != self.config.slots:
            if self.zero_copy is not None and self.device.type == "cuda":
                raise ValueError(
                    "zero-copy steps replay CUDA graphs that hold the slots' addresses: build the engine "
                    "with the new cache size instead"
                )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            for c in self.caches.values():
                m = c.experts
                with torch.no_grad():
                    m.w13.data = torch.empty(
                        (new.slots, *m.w13.shape[1:]), dtype=m.w13.dtype, device=m.w13.device
                    )
                    m.w2.data = torch.empty(
                        (new.slots, *m.w2.shape[1:]), dtype=m.w2.dtype, device=m.w2.device
                    )
                c.reset(new.slots)
            self.config = new
            self.refill()
        self.config = new

    def measure_costs(self) -> CostModel:
        """CUDA: the host -> device bandwidth (pinned, one expert copied several times, timed with events)
        and the CPU time of one expert at 1 and 8 rows on the real shapes; kept as the cost model."""
        if self.device.type != "cuda":
            return self.cost
        cache = self.caches[self.order[0]]
        m = cache.experts
        nbytes, reps = cache.expert_bytes, 4
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.no_grad():
            for _ in range(2):  # warm-up, then timed
                start.record(self.copier.stream)
                for _ in range(reps):
                    self.copier.copy(m.w13[0], m.host_w13[1 % cache.num_experts])
                    self.copier.copy(m.w2[0], m.host_w2[1 % cache.num_experts])
                end.record(self.copier.stream)
                end.synchronize()
        bandwidth = nbytes * reps / (start.elapsed_time(end) / 1e3)
        cache.fill()  # slot 0 back to expert 0
        x = torch.randn(8, m.hidden_size).to(m.host_w13.dtype)
        times = {}
        for rows in (1, 8):
            ids = torch.zeros(rows, 1, dtype=torch.int64)
            w = torch.ones(rows, 1)
            runs = []
            for _ in range(4):  # the first warms up
                t0 = time.perf_counter()
                expert_pairs_ref(x[:rows], m.host_w13, m.host_w2, ids, w)
                runs.append(time.perf_counter() - t0)
            times[rows] = min(runs[1:])
        per_row = max(0.0, (times[8] - times[1]) / 7)
        self.cost = CostModel(bandwidth, max(1e-6, times[1] - per_row), per_row, measured=True)
        log.info(
            "expert cache: host->device %.1f GB/s (%.2f ms per %.1f MB expert); CPU expert %.2f ms at 1 row, "
            "%.2f ms at 8", bandwidth / 1e9, 1e3 * nbytes / bandwidth, nbytes / 1e6, 1e3 * times[1],
            1e3 * times[8],
        )  # fmt: skip
        return self.cost

    # -- one layer call ------------------------------------------------------------------------------
    def _ahead(self, layer: int) -> list[int]:
        if self.config.prefetch_depth == 0 or self.config.cpu_compute == "always":
            return []
        at = self.order.index(layer)
        return self.order[at + 1 : at + 1 + self.config.prefetch_depth]

    def _scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s router on `x`: per expert, its softmax probability summed over the rows whose
        top-k (the model's k) it is in; 0 for experts no row would pick."""
        block = self.blocks[layer]
        probs = torch.softmax(linear(x, block.gate).float(), dim=-1)
        top, idx = torch.topk(probs, min(block.top_k, probs.shape[1]), dim=-1)
        return torch.zeros_like(probs).scatter_(1, idx, top).sum(0)

    @torch.no_grad()
    def run(
        self, cache: LayerCache, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        """The experts' output [rows, hidden] for routing (`ids` [rows, k], -1 none; `weights` float32)."""
        rows, k = ids.shape
        first = cache.layer == self.order[0]
        if first:
            for c in self.caches.values():
                c.predicted = None
            self._distinct = []
        ahead = self._ahead(cache.layer)
        # one read on the host: the routing and the predictions for the layers ahead
        parts = [ids.reshape(-1).float(), weights.reshape(-1).float(), *(self._scores(j, x) for j in ahead)]
        host = torch.cat(parts).cpu().numpy()
        n = rows * k
        ids_h = host[:n].astype(np.int64).reshape(rows, k)
        routed = ids_h[ids_h >= 0]
        counts = np.bincount(routed, minlength=cache.num_experts)
        needed = np.nonzero(counts)[0]
        self._count_prediction(cache, needed)
        self._distinct.append(len(needed))
        if first:
            self.running_experts = set(needed.tolist())
        scores = [
            host[2 * n + a * cache.num_experts : 2 * n + (a + 1) * cache.num_experts]
            for a in range(len(ahead))
        ]
        out = self._compute(
            cache, x, ids, weights, ids_h, counts, top_k, list(zip(ahead, scores, strict=True))
        )
        if cache.layer == self.order[-1] and self._distinct:
            self.telemetry.observe(DISTINCT, float(np.mean(self._distinct)))
        if self.zero_copy is not None:  # later zero-copy kernels read this layer's new residency
            cache.upload()
        return out

    def _count_prediction(self, cache: LayerCache, needed: np.ndarray) -> None:
        if cache.predicted is None:
            return
        predicted = np.nonzero(cache.predicted > 0)[0]
        t = self.telemetry
        t.add(PREDICTED, len(predicted))
        t.add(USED, len(needed))
        t.add(CORRECT, len(np.intersect1d(predicted, needed)))
        cache.predicted = None

    def _prefetch(self, layer: int, scores: np.ndarray) -> None:
        """Copy the predicted experts of `layer` ahead of need, most probable first, within its slots;
        never evicting another expert predicted for it in this step."""
        cache = self.caches[layer]
        cache.predicted = scores if cache.predicted is None else cache.predicted + scores
        pred = cache.predicted
        order = [int(e) for e in np.argsort(-pred, kind="stable") if pred[e] > 0][: cache.slots]
        protect = pred > 0
        self.tick += 1
        cache.last_use[[e for e in order if cache.slot_of[e] >= 0]] = self.tick
        queued = []
        for e in order:
            if cache.slot_of[e] >= 0:
                continue
            slot = cache.victim(protect)
            if slot is None:
                break
            cache.load(e, slot, self.tick)
            queued.append(slot)
        cache.loaded(queued)

    def _compute(
        self,
        cache: LayerCache,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        ids_h: np.ndarray,
        counts: np.ndarray,
        top_k: int,
        ahead: list[tuple[int, np.ndarray]],
    ) -> torch.Tensor:
        t, m = self.telemetry, cache.experts
        needed = np.nonzero(counts)[0]
        resident = cache.slot_of[needed] >= 0
        hits, misses = needed[resident], needed[~resident]
        t.add(HITS, len(hits))
        t.add(MISSES, len(misses))
        self.tick += 1
        cache.last_use[hits] = self.tick
        mode = self.config.cpu_compute
        if mode == "always":
            copy, cpu = [], [int(e) for e in misses]
        elif mode == "never":
            copy, cpu = sorted((int(e) for e in misses), key=lambda e: (-counts[e], e)), []
        else:
            copy, cpu = self.cost.assign([(int(e), int(counts[e])) for e in misses], cache.expert_bytes)
        pairwise = self.pairwise
        mine = np.isin(ids_h, cpu) if cpu else None
        # CUDA: the CPU experts' inputs on the host now, before this layer's kernels are queued (reading
        # them later would wait for those kernels, and the CPU work would no longer overlap them)
        host_in = None if pairwise or mine is None else self._cpu_inputs(x, weights, ids_h, mine)
        y = torch.zeros(ids.numel(), x.shape[1], dtype=torch.float32) if pairwise else None
        parts: list[torch.Tensor] = []
        todo = np.zeros(cache.num_experts, dtype=bool)
        todo[hits] = True
        todo[copy] = True
        pending_copy = list(copy)
        ids_t = ids.to(torch.int64)
        first = True
        while todo.any():  # rounds: one unless the step needs more experts than there are slots
            this = [int(e) for e in np.nonzero(todo & (cache.slot_of >= 0))[0]]
            self.copier.begin()
            queued = []
            while pending_copy:
                slot = cache.victim(todo & (cache.slot_of >= 0))  # never one the rest of the step needs
                if slot is None:
                    break
                e = pending_copy.pop(0)
                cache.load(e, slot, self.tick)
                queued.append(slot)
                this.append(e)
            cache.loaded(queued)
            if first:  # after this layer's own misses on the copy stream, before its kernels
                first = False
                for layer, scores in ahead:
                    self.copier.begin()
                    self._prefetch(layer, scores)
            if not this:  # impossible with >= 1 slot: some slot holds no expert the step still needs
                raise RuntimeError(f"expert cache of layer {cache.layer}: no slot for the step's experts")
            table = np.full(cache.num_experts, -1, dtype=np.int32)
            table[this] = cache.slot_of[this]
            tab = to_device(torch.from_numpy(table), x.device)
            slots = torch.where(ids_t >= 0, tab[ids_t.clamp(min=0)], -1)
            cache.wait_for(cache.slot_of[this])
            if pairwise:
                expert_pairs_ref(x, m.w13, m.w2, slots, weights, y)
            else:
                from actserve.server.layers.moe import run_experts

                parts.append(run_experts(x, m.w13, m.w2, slots, weights, top_k, cache.num_experts))
            todo[this] = False
        if first:
            for layer, scores in ahead:
                self.copier.begin()
                self._prefetch(layer, scores)
        if cpu:
            t.add(CPU_EXPERTS, len(cpu))
            if pairwise:
                assert mine is not None
                expert_pairs_ref(
                    x, m.host_w13, m.host_w2, torch.from_numpy(np.where(mine, ids_h, -1)), weights, y
                )
        if pairwise:
            assert y is not None
            return sum_columns(y, ids, x.dtype)
        if len(parts) == 1 and host_in is None:
            return parts[0]  # the all-resident kernels on the same inputs: the same bits
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for p in parts:
            acc += p.float()
        if host_in is not None:
            rows_t, x_h, w_h, sub = host_in
            part = sum_columns(expert_pairs_ref(x_h, m.host_w13, m.host_w2, sub, w_h), sub, torch.float32)
            acc.index_add_(0, rows_t, to_device(part, x.device))
        return acc.to(x.dtype)

    @staticmethod
    def _cpu_inputs(
        x: torch.Tensor, weights: torch.Tensor, ids_h: np.ndarray, mine: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """CUDA: for the rows routed to a CPU expert (`mine` [rows, k]), their device row indices, their
        inputs and routing weights on the host, and their columns (the CPU expert's id, else -1)."""
        rows = np.nonzero(mine.any(1))[0]
        rows_t = torch.from_numpy(rows).to(x.device)
        sub = torch.from_numpy(np.where(mine[rows], ids_h[rows], -1))
        return rows_t, x[rows_t].cpu(), weights[rows_t].float().cpu(), sub

    # -- admission preference (engine Scheduler) ------------------------------------------------------
    def scores(self, token_ids: list[list[int]]) -> list[float]:
        """Per waiting sequence, the share of its predicted experts at the first MoE layer (that layer's
        router on the normed embedding of its last token, a proxy that needs no forward) among the experts
        the running batch used there in the last step: prefer admitting those that overlap."""
        if not self.running_experts or self.embed is None or self.router_norm is None:
            return [0.0] * len(token_ids)
        last = [t[-1] for t in token_ids]
        new = sorted({t for t in last if t not in self._token_experts})
        if new:
            block = self.blocks[self.order[0]]
            with torch.inference_mode():
                h = self.router_norm(self.embed.weight[torch.tensor(new, device=self.embed.weight.device)])
                probs = torch.softmax(linear(h, block.gate).float(), dim=-1)
                top = torch.topk(probs, block.top_k, dim=-1).indices.cpu().tolist()
            for tok, experts in zip(new, top, strict=True):
                self._token_experts[tok] = set(experts)
        k = self.blocks[self.order[0]].top_k
        return [len(self._token_experts[t] & self.running_experts) / k for t in last]
