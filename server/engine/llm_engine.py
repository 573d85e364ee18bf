"""The synchronous engine core: owns the model, scheduler and tokenizer; `step()` runs one batch.

A step that raises fails only the requests it concerns: their outputs carry an `error` (the API answers
500 and says an internal error hit this request), their KV blocks and intervention plans are released,
and the engine goes on serving the others. A sequence is failed only by a step it ran alone: when a
batch of several fails, each of them is re-run in a step of its own (recomputed from scratch, like a
preempted sequence), so the error lands on the row that causes it, and a transient fault or one that
only a whole batch triggers fails nobody (every solo step still generates a token, so this ends).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace
from typing import Any

import torch

from actserve.server.engine import detokenizer
from actserve.server.engine.block_manager import BlockManager
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.kv_tier import HostTier
from actserve.server.engine.model_runner import StepResult
from actserve.server.engine.model_setup import build_runner, load_and_size, step_budget
from actserve.server.engine.outputs import RequestRejected, SeqOutput
from actserve.server.engine.scheduler import Scheduler
from actserve.server.engine.sequence import SeqStatus, Sequence
from actserve.server.engine.tp_group import TPGroup, start_rank0
from actserve.server.engine.tp_worker import worker_main
from actserve.server.layers.parallel import SINGLE
from actserve.server.metrics import EngineMetrics
from actserve.server.models.builder import LoadConfig, resolve_device
from actserve.server.models.loader import ModelLoadError

log = logging.getLogger(__name__)


def is_fatal(error: BaseException) -> bool:
    """Errors after which no later step can succeed: a CUDA error leaves the device context unusable
    (every later launch fails too), and an error that says so (`fatal`: a tensor-parallel rank failed,
    the ranks may be out of step), so the engine stops and the server exits for a restart."""
    if not isinstance(error, Exception) or getattr(error, "fatal", False):
        return True  # KeyboardInterrupt, SystemExit, ...
    text = str(error)
    return type(error).__name__ == "AcceleratorError" or "CUDA error" in text or "CUBLAS_STATUS" in text


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        device = resolve_device(config.device)
        batched = step_budget(config, device)  # refused before loading anything
        load = replace(config.load_config(), max_num_batched_tokens=batched)
        # tensor parallelism (docs/architecture.md §12): this process is rank 0; the other ranks start now
        # (spawned here, or by torchrun) and load, size and capture in step with it
        self.tp: TPGroup | None = None
        if config.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be at least 1, got {config.tensor_parallel_size}")
        if config.tensor_parallel_size > 1:
            self.tp = start_rank0(config, load, device, worker_main)
        try:
            self._build(config, load)
        except BaseException:
            if self.tp is not None:
                self.tp.close()
            raise

    def _build(self, config: EngineConfig, load: LoadConfig) -> None:
        comm = self.tp.comm if self.tp is not None else SINGLE
        self.loaded, self.registry, kv_only = load_and_size(config, load, comm)
        self._plan_host_tier(config, kv_only)
        self.tokenizer = self.loaded.tokenizer
        self.model_info = self.loaded.info
        self.model_name = self.model_info.name
        self.block_size = config.block_size
        self.max_model_len = self.model_info.max_model_len
        self.runner = build_runner(self.loaded, config, self.registry)
        if self.tp is not None:  # from here on rank 0 sends every step's ops to the other ranks
            self.tp.serve(self.runner, self.registry, self.loaded)
        num_blocks = self.loaded.num_blocks
        # the prefix cache needs the native runner's paged KV (the fallback keeps its own caches)
        self.prefix_caching = config.enable_prefix_caching and self.loaded.spec is not None
        host_base = num_blocks + 1 + self.loaded.reserved_kv_blocks  # after the scratch and reserved blocks
        self.host_tier: HostTier | None = None
        if self.host_blocks and self.loaded.spec is not None:
            self.host_tier = HostTier(self.runner.kv_caches, config.block_size, self.host_blocks, host_base)
        hosted = self.host_blocks if self.host_tier is not None else 0
        self.blocks = BlockManager(
            num_blocks, config.block_size, self.prefix_caching, host_base if hosted else 0, hosted
        )
        self.registry.bind_kv(
            config.block_size, num_blocks, num_blocks + 1, host_base + hosted, self.host_tier
        )
        self._stats_read = 0.0
        self._prefix_counted = (0, 0)
        self.runner.block_manager = self.blocks  # collect mode borrows free blocks of the serving cache
        aware = config.attention_aware_chunks
        if aware is None:
            aware = self.model_info.device.type == "cuda"
        spec = self.loaded.spec
        break_even = spec.attention_break_even() if aware and spec is not None else None
        batched = load.max_num_batched_tokens
        assert batched is not None
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, batched, break_even, admission=self.loaded.admission
        )
        self.metrics = EngineMetrics(self.model_name)
        self.metrics.add_plugin_histograms(self.registry.histograms())
        on_gpu = self.model_info.device.type == "cuda"
        pinned = self.loaded.host_weight_bytes if on_gpu else 0
        self.metrics.set_static_memory(self.loaded.weights_by_format, self.runner.kv_bytes, on_gpu, pinned)
        for telemetry in self.loaded.telemetry:  # the model's own series, counted from here on
            telemetry.reset()
            self.metrics.add_model_series(telemetry.series)
            self.metrics.update_model_series(telemetry.counters, telemetry.gauges, {})
        if self.host_tier is not None:
            self.metrics.pinned_bytes = self.host_tier.nbytes
        if self.tp is not None:  # every rank's weights and KV bytes (the gauges above are rank 0's)
            self.metrics.set_rank_memory(self.tp.rank_memory)
        self.seqs: dict[str, Sequence] = {}
        # CUDA: overlap steps (CPU steps stay strictly sequential unless asked, e.g. to test the overlap)
        self.overlap = (
            config.overlap_steps
            if config.overlap_steps is not None
            else self.model_info.device.type == "cuda"
        )
        self._inflight: Any = None
        self._touched: list[Sequence] = []  # sequences of the batches the current step has launched
        self.failed_steps = 0
        self.chained_steps = 0
        self._preempt_seen = 0
        if self.model_info.device.type == "cuda":
            # what exists now (model, tokenizer, graphs, modules) lives as long as the engine: keep the
            # cyclic collector from rescanning it between steps (not on CPU, where tests build many
            # engines and frozen cycles would never be freed)
            gc.collect()
            gc.freeze()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks and leave their process groups (nothing to do without
        tensor parallelism); the engine takes no step afterwards."""
        if self.tp is not None:
            self.tp.close()

    def _plan_host_tier(self, config: EngineConfig, kv_only: int) -> None:
        """Size the host tier (`--kv-offload-gb`, in blocks) and set aside the GPU blocks plugins reserve
        for it. The plugins' per-block data of host blocks and the reserved blocks come out of the GPU
        pool when it was sized from memory (a given --num-kv-blocks is kept: they are added to it)."""
        loaded = self.loaded
        self.host_blocks = int(config.kv_offload_gb * 2**30 // kv_only) if config.kv_offload_gb > 0 else 0
        if not self.host_blocks or loaded.spec is None:
            self.host_blocks = 0
            return
        reserved = self.registry.reserved_kv_blocks()
        loaded.reserved_kv_blocks = reserved
        if config.num_kv_blocks is None:
            side = self.host_blocks * self.registry.kv_block_bytes()
            cut = reserved + -(-side // loaded.kv_block_bytes)
            min_blocks = -(-loaded.info.max_model_len // config.block_size)
            if loaded.num_blocks - cut < min_blocks:
                raise ModelLoadError(
                    f"--kv-offload-gb {config.kv_offload_gb} leaves {loaded.num_blocks - cut} GPU KV blocks "
                    f"(plugins set {cut} aside for the host tier), fewer than --max-model-len needs "
                    f"({min_blocks}): lower --kv-offload-gb or --max-model-len"
                )
            loaded.num_blocks -= cut
        log.info(
            "KV host tier: %d blocks (%.2f GiB), %d GPU blocks reserved for it",
            self.host_blocks, self.host_blocks * kv_only / 2**30, reserved,
        )  # fmt: skip

    # -- requests ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence already checked against the context (`outputs.check_fits`, run by whoever
        made it: the API, `offline.make_sequences`). One that was not is refused here, which fails just
        its request (both front-ends report an `add` error to that request only)."""
        if (
            seq.params.max_tokens is None
            or not 0 < seq.prompt_len <= seq.max_total_tokens <= self.max_model_len
        ):
            raise RequestRejected(f"sequence {seq.seq_id} was not checked against the context", "prompt")
        seq.eos_token_ids = seq.eos_token_ids or self.loaded.eos_token_ids
        # what else shapes its prompt's KV, for the prefix cache: the dtype and prompt-phase interventions
        seq.prefix_extra = (str(self.model_info.dtype), self.registry.prefix_key(seq.interventions))
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=self.model_info.device).manual_seed(seq.params.seed)
        detokenizer.start(seq)
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        for key, value in self.registry.metric_labels(seq.interventions):
            self.metrics.interventions.labels(self.model_name, key, value).inc()

    def abort(self, seq_id: str) -> SeqOutput | None:
        seq = self.seqs.get(seq_id)
        if seq is None or seq.is_finished:
            return None
        self._finish(seq, "abort")
        self._update_gauges()  # the engine may go idle now; gauges must not keep the aborted sequence
        return self._output(seq)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[SeqOutput]:
        """One engine step. On CUDA the steps overlap: as soon as step N's tokens are known and the
        sequences they end are retired, step N+1 is launched, and step N's detokenization, stop-string
        checks and outputs run while the GPU computes. A stop string thus ends its sequence one step
        late (that extra token is computed and dropped); nothing else changes.

        Never raises for a failure of the step itself (only for fatal device errors): see the module
        docstring. The last resort, a failure outside the guarded phases, fails the running sequences
        and keeps the waiting ones."""
        try:
            return self._step()
        except Exception as e:
            if is_fatal(e):
                raise
            log.exception("engine step failed outside its guarded phases; failing the running requests")
            seqs = [*self._touched, *self.scheduler.running, *self.scheduler.isolated]
            self._inflight = None
            outputs = self._step_failed(e, seqs, retry=False)  # this step's state is unknown
            self._update_gauges()
            return outputs

    def _step(self) -> list[SeqOutput]:
        pending = self._inflight
        self._inflight = None
        self._touched = [*pending.seqs, *getattr(pending, "partial", [])] if pending is not None else []
        try:  # launch (unless in flight), chain the next one, collect: device work, no host state yet
            if pending is None:
                pending = self._launch()
                if pending is None:
                    self._update_gauges()
                    return []
            chained = self._chain(pending) if self.overlap else None
            results = pending.collect()
            self._commit_prefixes(pending)  # before _append retires (frees) finished sequences
            appended = self._append(results)
            self._offload_cold()
            if chained is not None and hasattr(chained, "finish"):  # its late logits hooks read these tokens
                chained = chained.finish()
        except Exception as e:
            if is_fatal(e):
                raise
            outputs = self._step_failed(e, self._touched)
            self._update_gauges()
            return outputs
        launch_error: Exception | None = None
        if self.overlap:
            if chained is not None:
                self._inflight = chained
            else:
                self._touched = []
                try:
                    self._inflight = self._launch()
                except Exception as e:  # its sequences' tokens of this step are still emitted below
                    if is_fatal(e):
                        raise
                    launch_error = e
        outputs = self._emit(appended)
        if launch_error is not None:
            outputs += self._step_failed(launch_error, self._touched)
        self._update_gauges()
        return outputs

    def _step_failed(self, error: Exception, seqs: list[Sequence], retry: bool = True) -> list[SeqOutput]:
        """Fail the sequence of a step that raised when it ran alone; re-run each of several alone."""
        self.failed_steps += 1
        live = list({id(s): s for s in seqs if not s.final_sent}.values())
        if not live:
            return []
        retry = retry and len(live) > 1
        log.error(
            "engine step failed for %d sequence(s) (%s); %s",
            len(live),
            ", ".join(s.seq_id for s in live[:8]),
            "re-running each alone" if retry else "failing them",
            exc_info=error,
        )
        if not retry:
            return [self._fail(seq, error) for seq in live]
        outputs = []
        for seq in live:
            if seq.is_finished:  # retired by this step before it raised: its end was never reported
                outputs.append(self._fail(seq, error))
            else:
                self.scheduler.isolate(seq)
        return outputs

    def _fail(self, seq: Sequence, error: BaseException) -> SeqOutput:
        """End `seq` with an error for its client; its blocks and intervention plans are given back."""
        seq.error = (
            f"internal error in the engine while generating this request ({type(error).__name__}: "
            f"{error}); the request was stopped, other requests are unaffected"
        )
        self._retire(seq, "error")
        self._record(seq, "error")
        out = self._output(seq)
        out.finish_reason, out.error = None, seq.error
        return out

    def has_work(self) -> bool:
        return self._inflight is not None or self.scheduler.has_work()

    def _launch(self) -> Any:
        batch = self.scheduler.schedule()
        if batch.preempted:
            self.metrics.preemptions.labels(self.model_name).inc(len(batch.preempted))
        if not batch:
            return None
        self._touched.extend(batch.seqs)
        now = time.monotonic()
        for seq in batch.prefills:
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            self.registry.activate(seq.interventions)
        return self.runner.launch(batch)

    def _commit_prefixes(self, pending: Any) -> None:
        """Key the prompt blocks the collected step completed (the prefix cache may hand them out now)."""
        if self.prefix_caching:
            for seq in [*pending.seqs, *getattr(pending, "partial", [])]:
                self.blocks.commit(seq)

    def _chain(self, pending: Any) -> Any:
        """Launch the next decode step of exactly `pending`'s sequences before its tokens reach the host
        (they feed the next step on the device), when nothing else needs the scheduler: no request
        waiting, no penalties, logprobs or plugins that need the host-side tokens, a KV slot for every row."""
        seqs = getattr(pending, "seqs", None)
        if not seqs or self.scheduler.num_queued or len(seqs) != len(self.scheduler.running):
            return None
        running = self.scheduler.running
        if getattr(pending, "partial", None) or any(s.num_computed < s.num_tokens for s in running):
            return None  # a prompt is mid-prefill: its next chunk needs the scheduler
        if not hasattr(self.runner, "launch_chained") or getattr(pending.pending, "tokens", None) is None:
            return None
        late: frozenset[str] = frozenset()
        for seq in seqs:
            keys = self.registry.late_logits(seq.interventions)
            if keys is None:
                return None  # a plugin reads each row's last token on the host before its next forward
            late |= keys
        need = 0
        for seq in seqs:
            p = seq.params
            if seq.is_finished or p.logprobs is not None or len(seq.output_token_ids) < p.min_tokens:
                return None
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                return None
            if len(seq.output_token_ids) + 2 > (p.max_tokens or 0) or seq.num_tokens + 2 > self.max_model_len:
                return None  # the in-flight token may be the last one: nothing to chain
            need += self.blocks.needs_block(seq, seq.num_tokens + 1)
        if need > self.blocks.num_free:
            return None
        for seq in seqs:
            self.blocks.allocate(seq, seq.num_tokens + 1)
        self.chained_steps += 1
        return self.runner.launch_chained(pending, late)

    def _append(self, results: list[StepResult]) -> list[tuple[Sequence, int, str | None]]:
        """Take each sampled token; retire (free) the sequences its token ends, so the next launch
        does not schedule them. Returns (seq, token, stop kind) for the emit phase."""
        now, m, name = time.monotonic(), self.metrics, self.model_name
        pending: list[tuple[Sequence, int, str | None]] = []
        for r in results:
            seq = r.seq
            if seq.is_finished:  # aborted or stopped while the step ran
                continue
            if seq.first_token is None:
                seq.first_token = now
                m.ttft.labels(name).observe(now - seq.arrival)
                if seq.count_prompt:
                    m.prompt_tokens.labels(name).inc(seq.prompt_len)
            elif seq.last_token is not None:
                m.itl.labels(name).observe(now - seq.last_token)
            if seq.params.max_tokens == 0:
                self._retire(seq, "length")
                pending.append((seq, -1, "empty"))
                continue
            seq.last_token = now
            seq.output_token_ids.append(r.token_id)
            if r.logprob is not None:
                seq.logprobs.append(r.logprob)
            stop = self._stop_token(seq, r.token_id)
            if stop is not None:
                self._retire(seq, "stop")
            elif self._at_length(seq):
                self._retire(seq, "length")
            pending.append((seq, r.token_id, stop))
        generated = sum(1 for _, t, _ in pending if t >= 0)
        if generated:
            m.generation_tokens.labels(name).inc(generated)
        return pending

    def _offload_cold(self) -> None:
        """With a host tier: move the cold blocks of running sequences whose plans allow it
        (`kv_residency`: all but their first and last blocks) to the host, once their prompt is computed
        and a decode step has run (so their plugin has made a choice it can recall)."""
        tier = self.host_tier
        if tier is None or not self.blocks.host_free:
            return
        src: list[int] = []
        dst: list[int] = []
        for seq in self.scheduler.running:
            if seq.is_finished or seq.num_computed < seq.prompt_len or len(seq.output_token_ids) < 2:
                continue
            keep = self.registry.kv_residency(seq.interventions)
            if keep is None:
                continue
            # one block more than the window: a chained step may already run one token ahead
            a, b = self.blocks.move_to_host(seq, keep.sink_blocks, keep.window_blocks + 1)
            src += a
            dst += b
        if src:
            tier.offload(src, dst)
            self.registry.blocks_moved(torch.tensor(src), torch.tensor(dst))

    def _emit(self, pending: list[tuple[Sequence, int, str | None]]) -> list[SeqOutput]:
        """Detokenize all new tokens in one call, apply stop strings, record finishes, build outputs."""
        # a stop token's own text stays out of the output, as in vLLM
        outputs = self._detokenize(
            [s for s, t, stop in pending if t >= 0 and (stop is None or s.params.include_stop_str_in_output)]
        )
        for seq, token, stop in pending:
            if seq.error is not None:
                continue  # failed while detokenizing: its error output is already in `outputs`
            if stop == "empty":
                self._record(seq, "length")
            elif stop is not None:
                seq.stop_reason = None if stop == "eos" else token
                self._record(seq, "stop")
            elif self._stop_string(seq):
                if seq.is_finished:  # retired for length in the same step: the stop string wins
                    self._record(seq, "stop")
                else:
                    self._finish(seq, "stop")
            elif seq.is_finished:
                self._record(seq, "length")
            outputs.append(self._output(seq))
        return outputs

    def _detokenize(self, seqs: list[Sequence]) -> list[SeqOutput]:
        """All new tokens' text in one call; if that raises, one call per sequence, and the sequences
        that still fail are failed (the error outputs are returned)."""
        try:
            detokenizer.step_many(self.tokenizer, seqs)
            return []
        except Exception as e:  # noqa: BLE001 - narrowed below
            log.warning("batched detokenization failed (%s); retrying sequence by sequence", e)
        failed = []
        for seq in seqs:
            try:
                detokenizer.step_many(self.tokenizer, [seq])
            except Exception as e:  # noqa: BLE001 - this sequence only
                log.exception("detokenizing %s failed", seq.seq_id)
                failed.append(self._fail(seq, e))
        return failed

    def _stop_token(self, seq: Sequence, token: int) -> str | None:
        """'eos' or 'stop_token' when this token ends the sequence (after min_tokens), else None."""
        p = seq.params
        if len(seq.output_token_ids) < p.min_tokens:
            return None
        if not p.ignore_eos and token in seq.eos_token_ids:
            return "eos"
        return "stop_token" if token in p.stop_token_ids else None

    def _at_length(self, seq: Sequence) -> bool:
        return (
            len(seq.output_token_ids) >= (seq.params.max_tokens or 0) or seq.num_tokens >= self.max_model_len
        )

    def _stop_string(self, seq: Sequence) -> bool:
        """Cut the text at the first stop string in the new text; True if one was found."""
        p = seq.params
        if not p.stop or len(seq.output_token_ids) < p.min_tokens:
            return False
        window = max(len(s) for s in p.stop) + 16
        begin = max(0, seq.sent_text_len - window)
        for stop in p.stop:
            at = seq.output_text.find(stop, begin)
            if at >= 0:
                cut = at + len(stop) if p.include_stop_str_in_output else at
                seq.output_text = seq.output_text[:cut]
                seq.stop_reason = stop
                return True
        return False

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._retire(seq, reason)
        self._record(seq, reason)

    def _retire(self, seq: Sequence, reason: str) -> None:
        """Stop scheduling the sequence and give back its blocks and intervention data."""
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        for name, labels, value in self.registry.finish_observations(seq.interventions):
            self.metrics.observe_plugin(name, labels, value)
        self.registry.release(seq.interventions)
        self.runner.release(seq)
        self.seqs.pop(seq.seq_id, None)

    def _record(self, seq: Sequence, reason: str) -> None:
        """The finish as clients and metrics see it (a stop string may override a length retire)."""
        now, m, name = time.monotonic(), self.metrics, self.model_name
        seq.finish_reason = reason
        m.success.labels(name, reason).inc()
        m.e2e.labels(name).observe(now - seq.arrival)
        if seq.first_scheduled is not None:
            m.queue.labels(name).observe(seq.first_scheduled - seq.arrival)
            if seq.first_token is not None:
                m.prefill.labels(name).observe(seq.first_token - seq.first_scheduled)
                m.decode.labels(name).observe((seq.last_token or seq.first_token) - seq.first_token)

    def _output(self, seq: Sequence) -> SeqOutput:
        """The unsent part; while stop strings may still match, hold back a possible partial match."""
        hold = 0
        if not seq.is_finished and seq.params.stop:
            hold = max(len(s) for s in seq.params.stop) - 1
        end = max(seq.sent_text_len, len(seq.output_text) - hold)
        text = seq.output_text[seq.sent_text_len : end]
        seq.sent_text_len = end
        ids = seq.output_token_ids[seq.sent_tokens :]
        lps = seq.logprobs[seq.sent_tokens :] if seq.params.logprobs is not None else []
        first = seq.sent_tokens == 0 and not seq.prompt_lp_sent
        seq.sent_tokens = len(seq.output_token_ids)
        seq.final_sent = seq.is_finished
        out = SeqOutput(
            seq_id=seq.seq_id,
            text=text,
            token_ids=ids,
            logprobs=lps,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            prompt_logprobs=seq.prompt_logprobs if first else None,
            num_prompt_tokens=seq.prompt_len,
            num_output_tokens=len(seq.output_token_ids),
            num_cached_tokens=seq.num_cached_tokens,
        )
        if first and seq.prompt_logprobs is not None:
            seq.prompt_lp_sent = True
        return out

    def _update_gauges(self) -> None:
        m, name = self.metrics, self.model_name
        counted = (self.blocks.queries, self.blocks.hits)
        if counted != self._prefix_counted:
            m.prefix_queries.labels(name).inc(counted[0] - self._prefix_counted[0])
            m.prefix_hits.labels(name).inc(counted[1] - self._prefix_counted[1])
            self._prefix_counted = counted
        for telemetry in self.loaded.telemetry:
            telemetry.refresh()
            m.update_model_series(telemetry.counters, telemetry.gauges, telemetry.drain())
        m.running.labels(name).set(len(self.scheduler.running))
        m.waiting.labels(name).set(self.scheduler.num_queued)
        m.kv_usage.labels(name).set(self.blocks.usage)
        m.kv_blocks.labels(name, "gpu").set(self.blocks.num_gpu_used)
        m.kv_blocks.labels(name, "cpu").set(self.blocks.num_host_used)
        now = time.monotonic()
        if now - self._stats_read >= 1.0 or not self.scheduler.running:  # plugins may sync to read them
            self._stats_read = now
            if self.host_tier is not None:  # recalls are counted on the device (a sync to read)
                m.set_kv_transfer(self.host_tier.bytes_to_host, self.host_tier.bytes_to_device)
            m.set_plugin_stats(self.registry.stats())
            m.set_plugin_gauges(self.registry.gauges())
