"""Continuous batching at token granularity with chunked prefill. Each step has a token budget
(`--max-num-batched-tokens`): running decodes take it first (one token each), then prompts are
prefilled in chunks within what is left: a prompt may take several steps, tokens
[num_computed, num_computed + chunk) in each, beside the decodes; only the step that completes it samples
a token. Beside decodes, a chunk also pays for its attention over the context before it
(`chunk_within`), so a step stays about as long as a step of `budget` tokens with no context: the
decodes' inter-token gap does not grow with the position a long prompt has reached. A waiting prompt
whose leading full blocks are in the prefix cache starts past them
(`BlockManager.match_prefix`). When KV blocks run out, the newest running sequence is preempted (its
blocks freed, recomputed later, from its cached prefix where that survived). Nothing is dropped silently.

After a step fails, the engine may `isolate` its sequences: each then runs alone (recomputed from
scratch, like a preempted one, every chunk of its prefill alone), so a failure is pinned on the sequence
that causes it.

Admission order is FIFO unless the model gives an `AdmissionPreference`: then, among the first
ADMISSION_WINDOW waiting sequences, the one it scores highest is admitted first (ties: the older), and a
sequence passed over MAX_PASSED times is admitted next whatever the scores, so none starves. (A MoE model
whose experts are offloaded prefers prompts whose predicted experts the running batch already uses.)"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from actserve.server.engine.block_manager import BlockManager
from actserve.server.engine.sequence import SeqStatus, Sequence

ADMISSION_WINDOW = 8  # waiting sequences an admission preference chooses among
MAX_PASSED = 4  # times a waiting sequence may be passed over for a preferred one


class AdmissionPreference(Protocol):
    """The model's preference among waiting sequences (their token ids, oldest first): one score each,
    higher admitted first. A generic hook: the scheduler knows nothing of what the scores mean."""

    def scores(self, token_ids: list[list[int]]) -> list[float]: ...


@dataclass
class ScheduledBatch:
    prefills: list[Sequence] = field(default_factory=list)  # compute tokens [num_computed, + chunk)
    chunks: list[int] = field(default_factory=list)  # tokens each prefill computes this step
    decodes: list[Sequence] = field(default_factory=list)  # compute the last token
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return self.prefills + self.decodes

    @property
    def completes(self) -> list[bool]:
        """Per prefill: does this step's chunk reach its last token (then it samples a token)?"""
        return [s.num_computed + n == s.num_tokens for s, n in zip(self.prefills, self.chunks, strict=True)]

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token from this step: completed prefills, then decodes."""
        done = [s for s, c in zip(self.prefills, self.completes, strict=True) if c]
        return done + self.decodes

    @property
    def partial(self) -> list[Sequence]:
        """Prefills still short of their last token after this step (no token, no output)."""
        return [s for s, c in zip(self.prefills, self.completes, strict=True) if not c]

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes (what the budget bounds)."""
        return sum(self.chunks) + len(self.decodes)

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


def chunk_cost(chunk: int, start: int, break_even: int) -> int:
    """Budget tokens a chunk of `chunk` prompt tokens from position `start` costs: its linear layers (one
    per token) plus its attention over [0, start + chunk), a context of `break_even` tokens weighing as
    much as the linear layers (`ModelSpec.attention_break_even`)."""
    return math.ceil(chunk * (1 + (start + chunk / 2) / break_even))


def chunk_within(budget: int, start: int, break_even: int) -> int:
    """The largest chunk from position `start` whose `chunk_cost` fits `budget` (at least one token)."""
    a = 1 + start / break_even
    c = int(break_even * (math.sqrt(a * a + 2 * budget / break_even) - a))
    while c > 1 and chunk_cost(c, start, break_even) > budget:  # float rounding
        c -= 1
    return max(1, min(c, budget))


def is_decode(seq: Sequence) -> bool:
    """A running sequence past its prompt with only its last token left to compute. (A prompt's last
    one-token chunk stays a prefill row: attention hooks restrict decode rows only, docs §6.)"""
    return seq.num_tokens - seq.num_computed == 1 and seq.num_computed >= seq.prompt_len


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        attention_break_even: int | None = None,
        admission: AdmissionPreference | None = None,
    ) -> None:
        """`attention_break_even`: price chunks beside decodes by `chunk_cost` (None: by tokens only).
        `admission`: the model's preference among waiting sequences (None: FIFO)."""
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"--max-num-batched-tokens ({max_num_batched_tokens}) must be >= --max-num-seqs "
                f"({max_num_seqs}): every running sequence's decode token must fit in one step"
            )
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.attention_break_even = attention_break_even
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.isolated: deque[Sequence] = deque()  # to run one per step, alone (see `isolate`)
        self.solo: Sequence | None = None  # an isolated sequence still prefilling, alone
        self.num_preemptions = 0
        self.admission = admission
        self._passed: dict[str, int] = {}  # waiting sequence -> times a preferred one went first

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
            self._passed.pop(seq.seq_id, None)
        elif seq in self.isolated:
            self.isolated.remove(seq)
        if self.solo is seq:
            self.solo = None
        self.blocks.release(seq)

    def isolate(self, seq: Sequence) -> None:
        """Queue `seq` to run alone in later steps, from scratch: its KV from the failed step is not
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
        if self.solo is seq:
            self.solo = None
        batch.preempted.append(seq)

    def _capacity(self, seq: Sequence) -> int:
        """Tokens `seq` could compute next with its own blocks and every free one."""
        return (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed

    def schedule(self) -> ScheduledBatch:
        if self.solo is not None or self.isolated:
            return self._schedule_isolated()
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        pending = list(self.running)  # not scheduled yet, oldest first: preemption takes the last
        # decodes first, one token each (max_num_batched_tokens >= max_num_seqs: they always fit)
        for seq in [s for s in self.running if is_decode(s)]:
            if seq not in pending:
                continue  # preempted for an older sequence
            pending.remove(seq)
            while self.blocks.needs_block(seq, seq.num_tokens) and self.blocks.num_free == 0:
                self._preempt(pending.pop() if pending else seq, batch)
            if seq.status is SeqStatus.WAITING:
                break  # preempted itself: nothing newer was left to free
            self.blocks.allocate(seq, seq.num_tokens)
            batch.decodes.append(seq)
            budget -= 1
        # then the running prefills' next chunks, oldest first
        while pending and budget > 0:
            seq = pending.pop(0)
            while self._capacity(seq) <= 0 and pending and not batch:
                self._preempt(pending.pop(), batch)  # nothing else runs: free a newer prefill's blocks
            chunk = min(
                seq.num_tokens - seq.num_computed, self._affordable(batch, seq, budget), self._capacity(seq)
            )
            if chunk <= 0:
                continue  # no block free now: it keeps its blocks and waits for the decodes to free some
            self._add_prefill(batch, seq, chunk)
            budget -= self._cost(batch, seq, chunk)
        self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]
        # then waiting prompts (FIFO), each admitted when its first chunk's blocks are free
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            self._prefer()
            seq = self.waiting[0]
            self.blocks.match_prefix(seq, seq.prefix_extra)  # a cached prefix: those tokens are done
            chunk = min(seq.num_tokens - seq.num_computed, self._affordable(batch, seq, budget))
            if self._capacity(seq) < chunk:
                self.blocks.release(seq)  # it keeps waiting; the cached blocks stay cached
                break
            self.waiting.popleft()
            self._passed.pop(seq.seq_id, None)
            self.blocks.record_lookup(seq)
            seq.status = SeqStatus.RUNNING
            self._add_prefill(batch, seq, chunk)
            self.running.append(seq)
            budget -= self._cost(batch, seq, chunk)
        return batch

    def _prefer(self) -> None:
        """Move the preferred waiting sequence to the front (module doc); FIFO without a preference, with
        nothing running to prefer against, or when the oldest has been passed over MAX_PASSED times."""
        if self.admission is None or len(self.waiting) < 2 or not self.running:
            return
        window = list(itertools.islice(self.waiting, ADMISSION_WINDOW))
        if self._passed.get(window[0].seq_id, 0) >= MAX_PASSED:
            return
        scores = self.admission.scores([s.all_token_ids for s in window])
        best = max(range(len(window)), key=lambda i: (scores[i], -i))
        if best == 0:
            return
        for s in window[:best]:
            self._passed[s.seq_id] = self._passed.get(s.seq_id, 0) + 1
        self.waiting.remove(window[best])
        self.waiting.appendleft(window[best])

    def _priced(self, batch: ScheduledBatch) -> bool:
        """Chunks pay for their attention only beside decodes: alone, nobody waits on the step's length."""
        return self.attention_break_even is not None and bool(batch.decodes)

    def _affordable(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        """The most tokens `seq`'s next chunk may have within `budget`."""
        if not self._priced(batch):
            return budget
        assert self.attention_break_even is not None
        return chunk_within(budget, seq.num_computed, self.attention_break_even)

    def _cost(self, batch: ScheduledBatch, seq: Sequence, chunk: int) -> int:
        """What `seq`'s chunk (already added: `num_computed` is its start) takes from the budget."""
        if not self._priced(batch):
            return chunk
        assert self.attention_break_even is not None
        return chunk_cost(chunk, seq.num_computed, self.attention_break_even)

    def _add_prefill(self, batch: ScheduledBatch, seq: Sequence, chunk: int) -> None:
        self.blocks.allocate(seq, seq.num_computed + chunk)
        batch.prefills.append(seq)
        batch.chunks.append(chunk)

    def _schedule_isolated(self) -> ScheduledBatch:
        """The next isolated sequence, alone, every chunk of its prefill (`solo` while it prefills).
        Running sequences sit these steps out (keeping their blocks) unless it needs their blocks; one
        that cannot fit even then goes back to the normal queue."""
        batch = ScheduledBatch()
        seq = self.solo
        if seq is None:
            seq = self.isolated.popleft()
            chunk = min(seq.num_tokens, self.max_num_batched_tokens)
            while not self.blocks.can_allocate(chunk) and self.running:
                self._preempt(self.running.pop(), batch)
            if not self.blocks.can_allocate(chunk):
                self.waiting.appendleft(seq)
                return batch
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        else:
            chunk = min(seq.num_tokens - seq.num_computed, self.max_num_batched_tokens)
            others = [s for s in self.running if s is not seq]
            while self._capacity(seq) < chunk and others:
                victim = others.pop()
                self.running.remove(victim)
                self._preempt(victim, batch)
            chunk = min(chunk, self._capacity(seq))
        self._add_prefill(batch, seq, chunk)
        self.solo = seq if seq.num_computed + chunk < seq.num_tokens else None
        return batch
