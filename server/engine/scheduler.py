"""Continuous batching at token granularity: every step decodes all running sequences and admits
waiting ones within the token and sequence budgets; when KV blocks run out, the newest running
sequence is preempted (its blocks freed, recomputed later). Nothing is dropped silently.

After a step fails, the engine may `isolate` its sequences: each then runs alone in a step of its own
(recomputed from scratch, like a preempted one), so a failure is pinned on the sequence that causes it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from actserve.server.engine.block_manager import BlockManager
from actserve.server.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    prefills: list[Sequence] = field(default_factory=list)  # compute every token from 0
    decodes: list[Sequence] = field(default_factory=list)  # compute the last token
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return self.prefills + self.decodes

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.isolated: deque[Sequence] = deque()  # to run one per step, alone (see `isolate`)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.isolated)

    @property
    def num_queued(self) -> int:
        """Sequences not running now (waiting, or queued to run alone after a failed step)."""
        return len(self.waiting) + len(self.isolated)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is and give its blocks back (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.isolated:
            self.isolated.remove(seq)
        self.blocks.release(seq)

    def isolate(self, seq: Sequence) -> None:
        """Queue `seq` to run alone in a later step, from scratch: its KV from the failed step is not
        trusted (the step may have stopped half-way)."""
        self.remove(seq)
        seq.status = SeqStatus.WAITING
        self.isolated.append(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.blocks.release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def schedule(self) -> ScheduledBatch:
        if self.isolated:
            return self._schedule_isolated()
        batch = ScheduledBatch()
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while self.blocks.needs_block(seq, seq.num_tokens) and self.blocks.num_free == 0:
                if queue:
                    self._preempt(queue.pop(), batch)
                else:
                    self._preempt(seq, batch)
                    seq = None
                    break
            if seq is None:
                break
            self.blocks.allocate(seq, seq.num_tokens)
            batch.decodes.append(seq)
        self.running = list(batch.decodes)
        budget = self.max_num_batched_tokens - len(batch.decodes)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            if n > budget or not self.blocks.can_allocate(n):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            batch.prefills.append(seq)
            self.running.append(seq)
            budget -= n
        return batch

    def _schedule_isolated(self) -> ScheduledBatch:
        """The next isolated sequence, alone. Running sequences sit this step out (keeping their blocks)
        unless it needs their blocks; one that cannot fit even then goes back to the normal queue."""
        batch = ScheduledBatch()
        seq = self.isolated.popleft()
        while not self.blocks.can_allocate(seq.num_tokens) and self.running:
            self._preempt(self.running.pop(), batch)
        if not self.blocks.can_allocate(seq.num_tokens):
            self.waiting.appendleft(seq)
            return batch
        self.blocks.allocate(seq, seq.num_tokens)
        seq.status = SeqStatus.RUNNING
        batch.prefills.append(seq)
        self.running.append(seq)
        return batch
