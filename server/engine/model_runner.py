"""Turns a scheduled step into one packed forward, then samples one token per sequence."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from actserve.interventions.registry import InterventionRegistry
from actserve.server.contract import RowSpan
from actserve.server.contract.hooks import BoundHooks, LinearInputHook, PluginHooks, ResidualHook, StepHooks
from actserve.server.engine.block_manager import BlockManager, blocks_for
from actserve.server.engine.cuda_graphs import DecodeGraphs, DecodeInputs, HostRows
from actserve.server.engine.prefill_graphs import PREFILL_BUCKETS, PrefillGraphs
from actserve.server.engine.sampler import PendingSample, SamplingRow, log_probs, sample_launch
from actserve.server.engine.scheduler import ScheduledBatch
from actserve.server.engine.sequence import Sequence, TokenLogprob
from actserve.server.engine.tp_ops import (
    ForwardOp,
    GraphDecodeOp,
    Op,
    PrefillGraphOp,
    TensorParallelError,
    on_device,
)
from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache, paged_prefill_fits
from actserve.server.layers.parallel import SINGLE


class StepObserver(Protocol):
    """A part of the model told around each step's forward ops (the expert cache's refill)."""

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...


@dataclass
class StepResult:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None


class PendingStep:
    """A launched step: `collect()` waits for its sampled tokens. `partial`: the step's prefills that did
    not reach their last token (they sample nothing, but a failure of the step concerns them too)."""

    def __init__(
        self, seqs: list[Sequence], pending: PendingSample, partial: list[Sequence] | None = None
    ) -> None:
        self.seqs, self.pending, self.partial = seqs, pending, partial or []

    def collect(self) -> list[StepResult]:
        out = self.pending.result()
        results = []
        for i, s in enumerate(self.seqs):
            lp = None
            if s.params.logprobs is not None and out.logprobs is not None:
                top = out.top_logprobs[i] if out.top_logprobs is not None else []
                lp = TokenLogprob(out.token_ids[i], out.logprobs[i], top)
            results.append(StepResult(s, out.token_ids[i], lp))
        return results


class LateLogitsStep:
    """A chained decode step launched before the previous step's tokens reached the host, whose plugins in
    `late` read those tokens (a grammar matcher): its forward is running; `finish()`, called once the
    tokens are appended, binds their logits hooks (filling their row inputs on the host while the GPU
    still runs the forward) and launches sampling. Rows of sequences that ended meanwhile get no hooks
    (their token is dropped)."""

    def __init__(self, runner: ModelRunner, logits: torch.Tensor, seqs: list[Sequence], late: frozenset[str]):
        self.runner, self.logits, self.seqs, self.late = runner, logits, seqs, late

    def finish(self) -> PendingStep:
        spans: dict[str, list[RowSpan]] = defaultdict(list)
        for i, seq in enumerate(self.seqs):
            if seq.is_finished:
                continue
            for key in self.late & seq.interventions.keys():
                pos = seq.num_computed - 1  # this step's row: `_decode` moved num_computed past it
                spans[key].append(
                    RowSpan(seq.interventions[key], i, 1, pos, seq.prompt_len, seq.output_token_ids)
                )
        logits = self.logits
        hooks = self.runner.registry.step_hooks(spans, len(self.seqs)) if spans else None
        if hooks is not None and hooks.logits:
            logits = hooks.apply_logits(logits)
        return launch_sampling(logits, self.seqs)


def _only(out: list[torch.Tensor | None]) -> torch.Tensor:
    """A graph op's logits (rank 0)."""
    logits = out[0]
    assert logits is not None
    return logits


class NotEnoughBlocks(RuntimeError):
    """Collect mode found too few free KV blocks for one of its sequences (running requests hold them)."""


@dataclass
class CollectRows:
    """Where sequence `index` of a collect call sits in one packed forward: rows [row0, row0 + num_rows),
    positions 0 .. num_rows - 1 (hook factories turn these into `RowSpan`s)."""

    index: int
    row0: int
    num_rows: int


# (the sequences of one packed forward, its row count) -> residual hooks for that forward
CollectHooks = Callable[[list[CollectRows], int], list[ResidualHook]]


@dataclass
class Collected:
    """What `ModelRunner.collect` read: residuals [sequences, layers, hidden] float32 on the CPU (None
    without layers) and logits [rows asked for, vocab] on the model's device (None without positions)."""

    residuals: torch.Tensor | None
    logits: torch.Tensor | None


class _Capture:
    """A residual hook that reduces each sequence's rows at chosen layers (last row or mean) and changes
    nothing; it runs after every other hook, so it sees what steering at that layer produced. With tensor
    parallelism it runs on rank 0 alone (`rank_local`): the residual is the same on every rank."""

    rank_local = True

    def __init__(self, layers: list[int], rows: list[CollectRows], position: str, out: torch.Tensor) -> None:
        self._layers, self.rows, self.position, self.out = set(layers), rows, position, out
        self.column = {layer: k for k, layer in enumerate(layers)}

    def layers(self) -> set[int]:
        return self._layers

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.detach().float()
        parts = [
            h[r.row0 + r.num_rows - 1] if self.position == "last" else h[r.row0 : r.row0 + r.num_rows].mean(0)
            for r in self.rows
        ]
        self.out[[r.index for r in self.rows], self.column[layer]] = torch.stack(parts).cpu()
        return hidden


def launch_sampling(logits: torch.Tensor, seqs: list[Sequence]) -> PendingStep:
    """Queue the sampler over one logits row per sequence (shared by every runner)."""
    rows = [
        SamplingRow(
            params=s.params,
            prompt_token_ids=s.prompt_token_ids,
            output_token_ids=s.output_token_ids,
            generator=s.generator,
            eos_token_ids=s.eos_token_ids,
        )
        for s in seqs
    ]
    return PendingStep(seqs, sample_launch(logits, rows))


def token_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """logits[i]'s logprob of targets[i], with its top k."""
    if not targets:
        return []
    logp = log_probs(logits)
    chosen = logp.gather(1, torch.tensor(targets, device=logp.device).unsqueeze(1)).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k > 0:
        vals, ids = logp.topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    return [TokenLogprob(t, c, top) for t, c, top in zip(targets, chosen, tops, strict=True)]


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """logits[i] predicts token i+1; the first prompt token has no logprob (OpenAI returns null)."""
    return [None, *token_logprobs(logits[:-1], token_ids[1:], k)]


class ModelRunner:
    """Owns the native model and its paged KV cache.

    CPU: one packed forward per step (prefill chunks and decodes together). CUDA: the step's prefill
    chunks in one eager forward (SDPA over the new K/V when every chunk starts its prompt, else the
    paged-prefill kernel over each chunk's context in the paged cache), decode rows through the
    paged-decode kernel, replayed from CUDA graphs when every intervention in the step is fused (steering
    and its contributors) or graph-safe."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        registry: InterventionRegistry,
        max_model_len: int,
        cuda_graph_max_bs: int = 0,
        cuda_graph_prefill_len: int = 0,
        extra_blocks: int = 0,
        step_observers: list[StepObserver] | None = None,
    ) -> None:
        """`extra_blocks`: GPU blocks after the pool and its scratch block, set aside for plugins (a host
        tier's reserved blocks, docs/architecture.md §3). `step_observers`: parts of the model told before
        and after each step's forward ops (`before_step()`, `after_step()`; `LoadedModel.step_observers`)."""
        spec = model.spec
        self.model, self.block_size, self.device, self.registry = model, block_size, device, registry
        self.step_observers = list(step_observers or ())
        # one extra block after the pool: the scratch slot that padded graph rows write to
        slots = (num_blocks + 1 + extra_blocks) * block_size
        # tensor parallelism: this rank's KV heads (all of them otherwise); `comm` its group
        self.comm = getattr(model, "tp", SINGLE)
        kv_heads = getattr(model, "local_kv_heads", spec.num_kv_heads)
        self.kv_caches = make_kv_cache(spec.num_layers, slots, kv_heads, spec.head_dim, dtype, device)
        # tensor parallelism on rank 0: sends a step's ops to the other ranks before they run (tp_group.py)
        self.mirror: Callable[[list[Op]], None] | None = None
        self.kv_bytes = sum(t.numel() * t.element_size() for t in self.kv_caches)
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if device.type == "cuda":
            # cuDNN's SDPA builds an execution plan for every new prompt shape (~70 ms each, paid by the
            # first request of each length); the flash / memory-efficient kernels need none
            torch.backends.cuda.enable_cudnn_sdp(False)
        if device.type == "cuda" and cuda_graph_max_bs > 0:
            # the fused plugin's table, and per row the columns it and the plugins contributing to it
            # declare, so requests carrying several of them still replay from graphs
            table = registry.fused.fused_table() if registry.fused is not None else None
            self.graphs = DecodeGraphs(
                model, self.kv_caches, block_size, self.max_blocks, cuda_graph_max_bs,
                num_blocks * block_size, table, max(1, registry.graph_width()), registry.graph_safe(),
            )  # fmt: skip
        # chunks whose context is partly cached: the paged-prefill kernel (CUDA; tests may turn it on for
        # the CPU, where it runs in Triton's interpreter), else SDPA per sequence over its gathered slots
        self.chunk_kernel = device.type == "cuda" and paged_prefill_fits(spec.head_dim)
        if device.type == "cuda" and cuda_graph_prefill_len >= PREFILL_BUCKETS[0]:
            dummy = num_blocks * block_size
            group = spec.num_heads // spec.num_kv_heads
            cached = (block_size, self.max_blocks, group) if self.chunk_kernel else None
            self.prefill_graphs = PrefillGraphs(model, self.kv_caches, dummy, cuda_graph_prefill_len, cached)
        self.graph_steps = 0
        self.eager_decode_steps = 0
        self.graph_prefills = 0
        self.block_manager: BlockManager | None = None  # the engine's (LLMEngine binds it); collect borrows
        self.collect_forwards = 0

    def release(self, seq: Sequence) -> None:
        """Paged KV needs no per-sequence cleanup beyond the block manager's."""

    def _slots(self, seq: Sequence, upto: int) -> torch.Tensor:
        table = torch.tensor(seq.block_table, dtype=torch.long)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        return (table.unsqueeze(1) * self.block_size + offsets).flatten()[:upto]

    def execute(self, batch: ScheduledBatch) -> list[StepResult]:
        return self.launch(batch).collect()

    # -- running ops: every forward goes through `run_ops` (tensor parallelism: one message per call) --
    def run_ops(self, ops: list[Op]) -> list[list[torch.Tensor | None]]:
        """Run a step's ops in order; each gives the logits it reads (None on tensor-parallel ranks other
        than 0). The step observers are told before and after, here where every forward passes (a
        launched step, a chained decode step, a collect forward): a chained step they missed would leave
        the expert cache's counts on the device, uncounted, and the cache unrefilled (issue 15). Tensor
        parallelism on rank 0: the ops go to the other ranks first, in one message, and a failure after
        that is fatal (the ranks may have run different collectives)."""
        for obs in self.step_observers:
            obs.before_step()
        if self.mirror is None:
            out = [self.run_op(op) for op in ops]
        else:
            self.mirror(ops)
            try:
                out = [self.run_op(op) for op in ops]
            except Exception as e:
                raise TensorParallelError(
                    f"a tensor-parallel step failed after the other ranks started it: {e}"
                ) from e
        for obs in self.step_observers:
            obs.after_step()
        return out

    def run_op(self, op: Op) -> list[torch.Tensor | None]:
        if isinstance(op, ForwardOp):
            dev = self.device
            ids = op.ids.to(dev) if op.ids is not None else self._device_ids(op.device_ids, len(op.positions))
            attn = on_device(op.attn, dev)
            hidden = self.model(ids, op.positions.to(dev), self.kv_caches, attn, op.hooks)
            return [
                self.model.compute_logits(hidden if rows is None else hidden[rows.to(dev)])
                for rows in op.logit_rows
            ]
        if isinstance(op, GraphDecodeOp):
            assert self.graphs is not None
            ids = self._device_ids(op.device_ids, len(op.inputs.ids))
            return [self.graphs.run(op.inputs, op.fused, ids, op.plugin_rows, op.modes)]
        assert self.prefill_graphs is not None
        if op.start:
            assert op.table is not None
            return [self.prefill_graphs.run_cached(op.ids, op.start, op.slots, op.table)]
        return [self.prefill_graphs.run(op.ids, op.slots)]

    def _device_ids(self, device_ids: torch.Tensor | str | None, n: int) -> torch.Tensor | None:
        """A decode step's input tokens still on the device (chained steps): rank 0's tensor, broadcast to
        the other ranks with tensor parallelism (they receive it here)."""
        if device_ids is None:
            return None
        if isinstance(device_ids, torch.Tensor):
            if self.comm.parallel:
                device_ids = self.comm.broadcast(device_ids.contiguous())
            return device_ids
        return self.comm.broadcast(torch.empty(n, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> PendingStep:
        """One step: each prefill computes its chunk, each decode its last token; only the rows that end
        on a sequence's last token (`batch.sampled`) get logits and a token."""
        sampled, partial = batch.sampled, batch.partial  # before the forward moves num_computed
        planned: list[tuple[Op, Callable[[list[torch.Tensor | None]], torch.Tensor]]] = []
        if self.device.type != "cuda":
            chunks = batch.chunks + [1] * len(batch.decodes)
            planned.append(self._pack(batch.seqs, chunks, fresh=False, num_prefills=len(batch.prefills)))
        else:
            if batch.prefills:
                graph = self._prefill_graph(batch.prefills, batch.chunks)
                planned.append(graph or self._pack(batch.prefills, batch.chunks, fresh=True))
            if batch.decodes:
                planned.append(self._plan_decode(batch.decodes))
        results = self.run_ops([op for op, _ in planned])  # the step observers around it
        parts = [finish(out) for (_, finish), out in zip(planned, results, strict=True)]
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        step = launch_sampling(logits, sampled)
        step.partial = partial
        return step

    def _prefill_graph(
        self, seqs: list[Sequence], chunks: list[int]
    ) -> tuple[Op, Callable[[list[torch.Tensor | None]], torch.Tensor]] | None:
        """The rest of one prompt (all of it, or what follows its computed context) with no interventions
        and no prompt logprobs, from a prefill CUDA graph; None when the step does not qualify (the eager
        path takes it)."""
        graphs = self.prefill_graphs
        if graphs is None or len(seqs) != 1:
            return None
        seq = seqs[0]
        n, start = seq.num_tokens, seq.num_computed
        if start + chunks[0] != n or seq.interventions or seq.params.prompt_logprobs is not None:
            return None
        if graphs.bucket(n - start) is None or (start and graphs.cached is None):
            return None
        if start:  # after a cached prefix or earlier chunks
            op = PrefillGraphOp(
                seq.all_token_ids[start:], self._slots(seq, n)[start:], start, seq.block_table
            )
        else:
            op = PrefillGraphOp(seq.all_token_ids, self._slots(seq, n))
        seq.num_computed = n
        self.graph_prefills += 1
        return op, _only

    def _packed(
        self, seqs: list[Sequence], chunks: list[int], fresh: bool, num_prefills: int | None = None
    ) -> torch.Tensor:
        """One forward over the packed new tokens of `seqs` (`_pack`), run now; its logits."""
        op, finish = self._pack(seqs, chunks, fresh, num_prefills)
        return finish(self.run_ops([op])[0])

    def _pack(
        self, seqs: list[Sequence], chunks: list[int], fresh: bool, num_prefills: int | None = None
    ) -> tuple[ForwardOp, Callable[[list[torch.Tensor | None]], torch.Tensor]]:
        """One forward over the packed new tokens of `seqs` (sequence i: tokens [num_computed, +chunks[i]),
        its cached context before them), and what turns its logits into the logits of the last row of
        each sequence this completes (logits hooks, prompt logprobs). Sequences from `num_prefills` on
        (default: none) are decode rows."""
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        slices: list[SeqSlice] = []
        spans: dict[str, list[RowSpan]] = defaultdict(list)
        want_prompt_lp: list[tuple[Sequence, int, int, int]] = []
        last: list[int] = []
        # CUDA: SDPA over the new K/V when every sequence starts at 0; else each reads its context slots
        fresh = fresh and all(s.num_computed == 0 for s in seqs)
        for seq, n in zip(seqs, chunks, strict=True):
            start = seq.num_computed
            end = start + n
            row0 = len(ids)
            ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            ctx = self._slots(seq, end)
            slot_parts.append(ctx[start:])
            slices.append(SeqSlice(row0, n, ctx))
            for key, plan in seq.interventions.items():
                spans[key].append(
                    RowSpan(plan, row0, n, start, seq.prompt_len, seq.output_token_ids, seq.block_table)
                )
            if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None:
                if start == 0:
                    seq.prompt_lp_parts = [None]  # the first prompt token has none
                want_prompt_lp.append((seq, row0, start, min(end, seq.prompt_len - 1)))
            if end == seq.num_tokens:
                last.append(row0 + n - 1)
        attn = AttentionBatch(torch.cat(slot_parts), slices, fresh_prefill=fresh)
        hooks: StepHooks | None = self.registry.step_hooks(spans, len(ids)) if spans else None
        if hooks is not None and hooks.attention:
            self._attention_meta(attn, seqs, len(seqs) if num_prefills is None else num_prefills)
        # (not when attention hooks restrict decode rows here, on the CPU: their slots are rebuilt per row)
        if self.chunk_kernel and not fresh and attn.decode_seqs is None:
            attn.chunk_tables = self._tables(seqs)
            attn.block_size = self.block_size
        last_rows = torch.tensor(last, dtype=torch.long)
        lp_rows = [
            torch.arange(r0, r0 + stop - start) for _, r0, start, stop in want_prompt_lp if stop > start
        ]
        reads = ([last_rows] if last else []) + lp_rows
        op = ForwardOp(torch.tensor(ids), torch.tensor(positions), attn, hooks, reads)

        def finish(out: list[torch.Tensor | None]) -> torch.Tensor:
            for seq, n in zip(seqs, chunks, strict=True):
                seq.num_computed += n
            dev = self.device
            logits = out[0] if last else torch.empty(0, self.model.spec.vocab_size, device=dev)
            assert logits is not None
            logit_hooks = hooks is not None and bool(hooks.logits)
            if logit_hooks and last:  # plugins' logits hooks, before sampling (rows without one untouched)
                logits = hooks.apply_logits(logits, last_rows.to(dev))  # type: ignore[union-attr]
            k = 1 if last else 0
            for seq, row0, start, stop in want_prompt_lp:
                # rows at positions [start, stop) predict prompt tokens start+1 .. stop
                if stop > start:
                    plog = out[k]
                    k += 1
                    assert plog is not None
                    if logit_hooks:  # prompt logprobs see the same logits hooks
                        rows = torch.arange(row0, row0 + stop - start, device=dev)
                        plog = hooks.apply_logits(plog, rows)  # type: ignore[union-attr]
                    lp_k = seq.params.prompt_logprobs or 0
                    seq.prompt_lp_parts += token_logprobs(
                        plog, seq.prompt_token_ids[start + 1 : stop + 1], lp_k
                    )
                if len(seq.prompt_lp_parts) == seq.prompt_len:
                    seq.prompt_logprobs, seq.prompt_lp_parts = seq.prompt_lp_parts, []
            return logits

        return op, finish

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """The sequences' block tables, [len(seqs), longest] int32 on the host (zero-padded)."""
        tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = s.block_table
        return torch.from_numpy(tables)

    def _attention_meta(self, attn: AttentionBatch, seqs: list[Sequence], num_prefills: int) -> None:
        """What attention hooks need of a packed step (docs/architecture.md §6): the blocks it fills, each
        with the row that writes its last token (host), and, on the CPU, the decode rows' block tables and
        context lengths (decode rows: the sequences from `num_prefills` on, one new token after a computed
        context; prefill rows, a prompt's one-token chunk included, are not restricted). Each slice's new
        tokens are the last `num_queries` of its context."""
        bs = self.block_size
        blocks: list[int] = []
        rows: list[int] = []
        decode: list[int] = []
        for i, (seq, sl) in enumerate(zip(seqs, attn.seqs, strict=True)):
            end = sl.context_len
            start = end - sl.num_queries
            for j in range(start // bs, end // bs):  # blocks whose last slot is written this step
                blocks.append(seq.block_table[j])
                rows.append(sl.start + (j + 1) * bs - 1 - start)
            if i >= num_prefills:
                decode.append(i)
        attn.filled = (torch.tensor(blocks, dtype=torch.long), torch.tensor(rows, dtype=torch.long))
        if self.device.type == "cuda" or not decode:  # CUDA decode rows go through `_decode`
            return
        width = max(len(seqs[i].block_table) for i in decode)
        tables = torch.zeros(len(decode), width, dtype=torch.int32)
        for r, i in enumerate(decode):
            tables[r, : len(seqs[i].block_table)] = torch.tensor(seqs[i].block_table, dtype=torch.int32)
        attn.block_tables = tables
        attn.context_lens = torch.tensor([attn.seqs[i].context_len for i in decode], dtype=torch.int32)
        attn.block_size = bs
        attn.decode_seqs = decode
        attn.decode_rows = torch.tensor([attn.seqs[i].start for i in decode])

    @torch.inference_mode()
    def launch_chained(
        self, prev: PendingStep, late: frozenset[str] = frozenset()
    ) -> PendingStep | LateLogitsStep:
        """Decode the next token of every sequence of `prev` before `prev`'s tokens reach the host: the
        input ids are `prev`'s sampled tokens on the device. The engine checks eligibility (no waiting
        requests, no penalties, blocks available) and allocates nothing else. With `late` plugins (they
        read the tokens on the host, logits hooks only) the forward runs without their hooks and the
        step samples once `finish()` has bound them, after `prev`'s tokens are appended."""
        assert prev.pending.tokens is not None
        logits = self._decode(prev.seqs, prev.pending.tokens, skip=late)
        if late:
            return LateLogitsStep(self, logits, prev.seqs, late)
        return launch_sampling(logits, prev.seqs)

    def _decode(
        self, seqs: list[Sequence], device_ids: torch.Tensor | None = None, skip: frozenset[str] = frozenset()
    ) -> torch.Tensor:
        """Decode rows (`_plan_decode`), run now; their logits."""
        op, finish = self._plan_decode(seqs, device_ids, skip)
        return finish(self.run_ops([op])[0])

    def _plan_decode(
        self, seqs: list[Sequence], device_ids: torch.Tensor | None = None, skip: frozenset[str] = frozenset()
    ) -> tuple[Op, Callable[[list[torch.Tensor | None]], torch.Tensor]]:
        """Decode rows: the paged-decode kernel (from a CUDA graph when the step allows it). With
        `device_ids`, each row's input token is still on the device (not yet appended on the host).
        Plugins in `skip` get no hooks here (their logits hooks come later, `LateLogitsStep`)."""
        n, bs = len(seqs), self.block_size
        ahead = 0 if device_ids is None else 1
        width = max(len(s.block_table) for s in seqs)
        tables = np.zeros((n, width), dtype=np.int32)
        ids = np.zeros(n, dtype=np.int64)
        pos = np.empty(n, dtype=np.int64)
        slots = np.empty(n, dtype=np.int64)
        spans: dict[str, list[RowSpan]] = defaultdict(list)
        for i, seq in enumerate(seqs):
            p = seq.num_tokens - 1 + ahead
            tables[i, : len(seq.block_table)] = seq.table_array()
            if device_ids is None:
                ids[i] = seq.output_token_ids[-1] if seq.output_token_ids else seq.prompt_token_ids[-1]
            pos[i] = p
            slots[i] = seq.block_table[p // bs] * bs + p % bs
            for key, plan in seq.interventions.items():
                if key not in skip:
                    spans[key].append(
                        RowSpan(plan, i, 1, p, seq.prompt_len, seq.output_token_ids, seq.block_table)
                    )
            seq.num_computed = p + 1
        groups = self.registry.group_spans(spans)
        fused = self.registry.fused
        others = [k for k in groups if fused is None or k != fused.name]
        graphs = self.graphs
        reg = self.registry
        asked = {k: reg.plugins[k].graph_mode(groups[k], n) for k in others} if graphs is not None else {}
        modes = {k: m for k, m in asked.items() if m is not None}  # None: no captured variant fits
        fits = len(modes) == len(asked)
        if graphs is not None and fits and graphs.bucket(n) is not None and graphs.takes(modes):
            mine = groups.get(fused.name) if fused is not None else None
            cols = fused.fused_columns(mine, n) if fused is not None and mine else None
            if cols is None or cols[0].shape[1] <= graphs.width:
                rows: dict[str, HostRows | None] = {
                    k: (reg.host_row_inputs(reg.plugins[k], groups[k], n), reg.host_row_mask(groups[k], n))
                    for k in others
                }
                self.graph_steps += 1
                inputs = DecodeInputs(ids, pos, slots, tables, pos + 1)
                return GraphDecodeOp(inputs, cols, rows, modes, device_ids), _only
        self.eager_decode_steps += 1
        hooks = self.registry.step_hooks(spans, n) if spans else None
        ids_t = torch.from_numpy(ids) if device_ids is None else None
        if self.device.type == "cuda":
            lens = torch.from_numpy((pos + 1).astype(np.int32))
            attn = AttentionBatch(torch.from_numpy(slots), [], torch.from_numpy(tables), lens, bs)
        else:  # the CPU attention reads each sequence's slots back from its block table
            ctx = [self._slots(seq, int(p) + 1) for seq, p in zip(seqs, pos, strict=True)]
            attn = AttentionBatch(torch.from_numpy(slots), [SeqSlice(i, 1, c) for i, c in enumerate(ctx)])
            if hooks is not None and hooks.attention:  # attention hooks select from the tables
                lens = torch.from_numpy((pos + 1).astype(np.int32))
                attn = AttentionBatch(attn.slot_mapping, attn.seqs, torch.from_numpy(tables), lens, bs)
                attn.decode_seqs = list(range(n))
        op = ForwardOp(ids_t, torch.from_numpy(pos), attn, hooks, [None], device_ids)

        def finish(out: list[torch.Tensor | None]) -> torch.Tensor:
            logits = out[0]
            assert logits is not None
            if hooks is not None and hooks.logits:  # plugins' logits hooks, before sampling
                logits = hooks.apply_logits(logits)
            return logits

        return op, finish

    # -- collect mode: the one forward driver for residual reads and teacher-forced measurement -------
    @torch.inference_mode()
    def collect(
        self,
        token_lists: list[list[int]],
        layers: list[int] | tuple[int, ...] = (),
        *,
        position: str = "last",
        logit_positions: list[range] | None = None,
        hooks: CollectHooks | None = None,
        linear: LinearInputHook | None = None,
        max_tokens: int = 4096,
    ) -> Collected:
        """Prefill-style forwards over `token_lists` (each a fresh sequence at positions 0..n-1), packed
        into forwards of at most `max_tokens` tokens (a longer sequence goes alone), on the engine's own
        KV cache: each forward borrows free blocks from the engine's block manager and gives them back
        before the next, so running sequences' blocks are never touched and the free count is the same
        after the call (also when it raises). A forward takes no more blocks than are free: the call is
        cut into more forwards, and a sequence that needs more blocks than are free raises
        `NotEnoughBlocks`. Call it on the engine thread between steps (`run_in_engine` on a server).

        Reads: `layers` -> residuals after those decoder layers (the steering hook point), per sequence its
        `position` ("last" row or "mean" over its rows); `logit_positions[i]` -> logits at those positions
        of sequence i, all concatenated in sequence order. `hooks(rows, num_rows)` gives the residual
        hooks of each packed forward (per-row interventions, e.g. a plugin's `residual_hook` over
        `RowSpan`s built from `rows`); the residuals are read after them. `linear` acts on every row's
        projection inputs at its sites (e.g. to record activation statistics; inputs: none)."""
        layers = list(layers)
        spec = self.model.spec  # type: ignore[attr-defined]
        bad = [layer for layer in layers if not 0 <= layer < spec.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range [0, {spec.num_layers - 1}]")
        if position not in ("last", "mean"):
            raise ValueError(f"position must be 'last' or 'mean', got {position!r}")
        if any(len(t) == 0 for t in token_lists):
            raise ValueError("empty prompt")
        if logit_positions is not None:
            if len(logit_positions) != len(token_lists):
                raise ValueError(f"{len(logit_positions)} position ranges for {len(token_lists)} sequences")
            for i, (r, t) in enumerate(zip(logit_positions, token_lists, strict=True)):
                if len(r) and not (0 <= min(r) and max(r) < len(t)):
                    raise ValueError(f"logit positions of sequence {i} outside its {len(t)} tokens")
        long = [i for i, t in enumerate(token_lists) if len(t) > self.max_model_len]
        if long:
            i = long[0]
            raise ValueError(
                f"sequence {i} has {len(token_lists[i])} tokens, more than the model's maximum length of "
                f"{self.max_model_len}"
            )
        if self.block_manager is None:
            raise RuntimeError("collect needs the engine's block manager (LLMEngine binds it)")
        if linear is not None and self.comm.parallel:
            raise ValueError(
                "collect(linear=...) reads projection inputs, which tensor parallelism splits over ranks; "
                "run it on a server with --tensor-parallel-size 1"
            )
        out = torch.zeros(len(token_lists), len(layers), spec.hidden_size) if layers else None
        logits: list[torch.Tensor] = []
        for chunk in self._collect_chunks(token_lists, max_tokens):
            part = self._collect_forward(
                token_lists, chunk, layers, position, logit_positions, hooks, linear, out
            )
            if part is not None:
                logits.append(part)
        joined = None
        if logit_positions is not None:
            joined = torch.cat(logits) if logits else torch.zeros(0, spec.vocab_size, device=self.device)
        return Collected(out, joined)

    def _collect_chunks(self, token_lists: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Consecutive sequences per forward, within `max_tokens` and the blocks free now."""
        assert self.block_manager is not None
        free, bs = self.block_manager.num_free, self.block_size
        chunks: list[list[int]] = []
        tokens = blocks = 0
        for i, t in enumerate(token_lists):
            need = blocks_for(len(t), bs)
            if need > free:
                raise NotEnoughBlocks(
                    f"collect: a sequence of {len(t)} tokens needs {need} KV blocks, but only {free} of "
                    f"{self.block_manager.num_blocks} are free (running requests hold the rest); retry when "
                    "the engine is less busy, or give the server more KV blocks"
                )
            if chunks and tokens + len(t) <= max_tokens and blocks + need <= free:
                chunks[-1].append(i)
                tokens, blocks = tokens + len(t), blocks + need
            else:
                chunks.append([i])
                tokens, blocks = len(t), need
        return chunks

    def _collect_forward(
        self,
        token_lists: list[list[int]],
        chunk: list[int],
        layers: list[int],
        position: str,
        logit_positions: list[range] | None,
        hooks: CollectHooks | None,
        linear: LinearInputHook | None,
        out: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """One packed forward of the sequences `chunk` on borrowed blocks; their logits rows, if asked."""
        assert self.block_manager is not None
        bs, dev = self.block_size, self.device
        fresh = dev.type == "cuda"  # CUDA: SDPA over the new K/V, as a served prefill; CPU: per sequence
        borrowed = self.block_manager.borrow(sum(blocks_for(len(token_lists[i]), bs) for i in chunk))
        try:
            ids: list[int] = []
            positions: list[int] = []
            slot_parts: list[torch.Tensor] = []
            slices: list[SeqSlice] = []
            rows: list[CollectRows] = []
            taken = 0
            for i in chunk:
                toks = token_lists[i]
                n = len(toks)
                own = torch.tensor(borrowed[taken : taken + blocks_for(n, bs)], dtype=torch.long)
                taken += len(own)
                slots = (own.unsqueeze(1) * bs + torch.arange(bs, dtype=torch.long)).flatten()[:n]
                rows.append(CollectRows(i, len(ids), n))
                slices.append(SeqSlice(len(ids), n, slots))
                slot_parts.append(slots)
                ids.extend(toks)
                positions.extend(range(n))
            total = len(ids)
            attn = AttentionBatch(torch.cat(slot_parts), slices, fresh_prefill=fresh)
            residual = list(hooks(rows, total)) if hooks is not None else []
            if out is not None:
                residual.append(_Capture(layers, rows, position, out))
            plugins = []
            if linear is not None:
                every = torch.ones(total, dtype=torch.bool, device=dev)
                plugins.append(BoundHooks(PluginHooks(linear=linear), {}, every))
            step = StepHooks(residual, plugins=plugins) if residual or plugins else None
            reads: list[torch.Tensor | None] = []
            if logit_positions is not None:
                want = [r.row0 + p for r in rows for p in logit_positions[r.index]]
                reads.append(torch.tensor(want, dtype=torch.long))
            # the hooks here are the caller's, over tables the other tensor-parallel ranks need not keep
            op = ForwardOp(torch.tensor(ids), torch.tensor(positions), attn, step, reads, shared_table=False)
            logits = self.run_ops([op])[0]
            self.collect_forwards += 1
            return logits[0] if logits else None
        finally:
            self.block_manager.give_back(borrowed)
