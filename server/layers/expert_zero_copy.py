"""Zero-copy steps of the expert cache (docs/architecture.md §5, "Expert offloading", and §10): a step reads
no routing on the host. Each MoE layer's kernel maps expert ids to slots through the layer's device table
(`FusedExperts.slot_of`) and reads an expert whose entry is -1 straight from its pinned host copy over
PCIe, in the same launch (kernels/moe.py), so decode steps replay CUDA graphs. The cache is refilled
between steps, from statistics read one step late, and never blocks a step:

- **Statistics**: the kernels add every routed pair to `counts` [MoE layers, experts] on the device.
  After each step's forward `StepStats.snapshot` queues its copy into a pinned buffer (and zeroes it) with
  an event; before a later step, the snapshots whose events are done are read (`harvest`): hits and
  misses against the table that step ran with, the bytes read from host memory, distinct experts, each
  expert's last use (the LRU order), and each expert's *miss streak*: consecutive harvested steps in which
  it was routed while not in a slot.
- **Landing**: a slot whose fill copy is done (`Copier.done`, an event query) gets its table entry.
- **Admission**: an expert whose miss streak reached `admit_after` (0: never) is copied into a slot: a
  free one, else the least recently used whose expert the last harvested step did not use and whose own
  copy is not in flight. The victim's table entry becomes -1 first (its later reads go to host memory),
  that table is uploaded on the compute stream, and only then are the copies queued on the copier, which
  orders them after everything the compute stream has queued: no kernel reads a slot while it is being
  overwritten, and none reads a slot before its copy has landed (the entry appears only after `done`).

The kernels' arithmetic does not depend on where the weights are read from, so every step's logits are
the all-resident model's, bit for bit, whatever the table holds at the time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from actserve.server.layers.expert_metrics import DISTINCT, HITS, MISSES, ZERO_COPY_BYTES

if TYPE_CHECKING:
    from actserve.server.layers.expert_cache import ExpertOffload, LayerCache

# pinned snapshot buffers of the statistics: when all are waiting for the device, the counts keep adding
# up on the device and go into the next snapshot (several steps read as one)
STATS_RING = 8


@dataclass
class Snapshot:
    """One step's counts on their way to the host, with the table (masked, [layers, experts]) it ran with."""

    host: torch.Tensor
    event: torch.cuda.Event | None
    tables: np.ndarray
    steps: int


@dataclass
class Harvest:
    """What one read snapshot says, per MoE layer (in the cache's order): pairs per expert [layers,
    experts], and the table the step ran with."""

    counts: np.ndarray
    tables: np.ndarray
    steps: int


class StepStats:
    """`counts` [layers, experts] int32 on the device (the kernels add to it) and its snapshots."""

    def __init__(self, layers: int, experts: int, device: torch.device) -> None:
        self.device = device
        self.counts = torch.zeros(layers, experts, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self.free = [
            torch.zeros(layers, experts, dtype=torch.int32, pin_memory=pin) for _ in range(STATS_RING)
        ]
        self.queue: deque[Snapshot] = deque()
        self.steps = 0  # steps counted on the device since the last snapshot

    def snapshot(self, tables: np.ndarray) -> None:
        """After a step's forward ops are queued: its counts towards the host, the device's zeroed."""
        self.steps += 1
        if not self.free:
            return
        host = self.free.pop()
        event = None
        if self.device.type == "cuda":
            host.copy_(self.counts, non_blocking=True)
            self.counts.zero_()
            event = torch.cuda.Event()
            event.record()
        else:
            host.copy_(self.counts)
            self.counts.zero_()
        self.queue.append(Snapshot(host, event, tables, self.steps))
        self.steps = 0

    def ready(self, block: bool = False) -> list[Harvest]:
        """The snapshots that have reached the host, oldest first (all of them when `block`)."""
        out = []
        while self.queue:
            snap = self.queue[0]
            if snap.event is not None:
                if block:
                    snap.event.synchronize()
                elif not snap.event.query():
                    break
            self.queue.popleft()
            out.append(Harvest(snap.host.numpy().copy(), snap.tables, snap.steps))
            self.free.append(snap.host)
        return out


class ZeroCopySteps:
    """The between-steps work of an `ExpertOffload` whose decode steps read misses from host memory."""

    def __init__(self, manager: ExpertOffload, admit_after: int) -> None:
        self.manager = manager
        self.admit_after = admit_after
        caches = [manager.caches[i] for i in manager.order]
        self.caches: list[LayerCache] = caches
        e = caches[0].num_experts
        self.stats = StepStats(len(caches), e, manager.device)
        # every layer's host table and last uses as rows of one matrix (the caches keep views of their
        # rows), so that the work between steps is a few array operations however many layers there are
        self.slot_of = np.stack([c.slot_of for c in caches])
        self.last_use = np.stack([c.last_use for c in caches])
        for i, c in enumerate(caches):
            c.slot_of, c.last_use = self.slot_of[i], self.last_use[i]
        self.streak = np.zeros((len(caches), e), dtype=np.int64)
        self.last_counts = np.zeros((len(caches), e), dtype=np.int64)
        self.tick = 0  # the LRU tick of the newest harvested step
        self.dirty: set[int] = set(range(len(caches)))  # layers whose device table must be uploaded
        self.started = False  # the first step zeroes what start-up forwards (graph captures) counted

    def counts(self, cache: LayerCache) -> torch.Tensor:
        return self.stats.counts[self.caches.index(cache)]

    # -- between steps ---------------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Read what finished steps counted, publish landed copies, admit recent misses (no waiting)."""
        if not self.started:
            self.started = True
            self.stats.counts.zero_()
        for h in self.stats.ready():
            self.harvest(h)
        self.land()
        fills = self.admit()
        self.publish(extra=fills)
        self.queue_fills(fills)

    @torch.no_grad()
    def after_step(self) -> None:
        self.stats.snapshot(self.tables())

    def poll(self) -> None:
        """Count the snapshots that have reached the host, without waiting (before metrics are read)."""
        for h in self.stats.ready():
            self.harvest(h)

    @torch.no_grad()
    def flush(self) -> None:
        """Wait for every snapshot and read it (benchmarks and tests, after their last step)."""
        for h in self.stats.ready(block=True):
            self.harvest(h)
        self.land()
        self.publish()

    # -- pieces ----------------------------------------------------------------------------------------
    def tables(self, extra: dict[int, list[tuple[int, int]]] | None = None) -> np.ndarray:
        """Every layer's device table as the kernels must see it: an expert's slot once its copy has
        landed, else -1 (also for the `extra` fills about to be queued)."""
        out = self.slot_of.astype(np.int32)
        for i, c in enumerate(self.caches):
            for slot in c.pending:  # usually none: a dict per layer
                e = int(c.expert_at[slot])
                if e >= 0:
                    out[i, e] = -1
            for e, _ in (extra or {}).get(i, ()):
                out[i, e] = -1
        return out

    def harvest(self, h: Harvest) -> None:
        m, t = self.manager, self.manager.telemetry
        self.tick = m.tick = m.tick + 1
        used = h.counts > 0
        missed = used & (h.tables < 0)
        t.add(HITS, int((used & ~missed).sum()))
        t.add(MISSES, int(missed.sum()))
        t.add(ZERO_COPY_BYTES, int(missed.sum()) * self.caches[0].expert_bytes)
        per_layer = used.sum(1)
        if per_layer.any():
            t.observe(DISTINCT, float(per_layer.mean()))
        self.last_use[used] = self.tick
        m.running_experts = set(np.nonzero(used[0])[0].tolist())
        self.streak = np.where(missed, self.streak + 1, 0)
        self.last_counts = h.counts.astype(np.int64)

    def land(self) -> None:
        copier = self.manager.copier
        for i, c in enumerate(self.caches):
            if not c.pending:
                continue
            done = [s for s, handle in c.pending.items() if copier.done(handle)]
            for s in done:
                del c.pending[s]
            if done:
                self.dirty.add(i)

    def admit(self) -> dict[int, list[tuple[int, int]]]:
        """Per layer, the (expert, slot) fills to queue now; the host state already says so."""
        fills: dict[int, list[tuple[int, int]]] = {}
        if self.admit_after <= 0:
            return fills
        candidates = (self.streak >= self.admit_after) & (self.slot_of < 0)
        for i in np.nonzero(candidates.any(1))[0].tolist():
            c = self.caches[i]
            want = np.nonzero(candidates[i])[0]
            order = want[np.argsort(-self.last_counts[i][want], kind="stable")]
            for e in order.tolist():
                slot = self.victim(c)
                if slot is None:
                    break
                old = int(c.expert_at[slot])
                if old >= 0:
                    c.slot_of[old] = -1
                c.expert_at[slot], c.slot_of[e] = e, slot
                c.last_use[e] = self.tick
                self.streak[i, e] = 0
                fills.setdefault(i, []).append((e, slot))
            if i in fills:
                self.dirty.add(i)
        return fills

    def victim(self, c: LayerCache) -> int | None:
        """A free slot, else the least recently used one whose expert the last harvested step did not use
        and whose copy is not in flight; None when there is none."""
        free = [s for s in np.nonzero(c.expert_at < 0)[0].tolist() if s not in c.pending]
        if free:
            return free[0]
        held = c.expert_at
        ok = np.array([s not in c.pending for s in range(c.slots)]) & (c.last_use[held] < self.tick)
        if not ok.any():
            return None
        cand = np.nonzero(ok)[0]
        return int(cand[np.argmin(c.last_use[held[cand]])])

    def publish(self, extra: dict[int, list[tuple[int, int]]] | None = None) -> None:
        """Upload the tables of the layers that changed, on the compute stream (before any fill's copy)."""
        if not self.dirty:
            return
        tables = self.tables(extra)
        for i in sorted(self.dirty):
            self.caches[i].publish(tables[i])
        self.dirty.clear()

    def queue_fills(self, fills: dict[int, list[tuple[int, int]]]) -> None:
        if not fills:
            return
        copier = self.manager.copier
        copier.begin()  # after the table uploads just queued: the victims are read from host from here on
        for i, pairs in fills.items():
            c = self.caches[i]
            for e, slot in pairs:
                c.copy_in(e, slot)
            c.loaded(slot for _, slot in pairs)
