"""Thread mode: `LLMEngine` runs on its own thread of the API process (`--engine-process off`).

The event loop never runs a forward pass, so `/health` and `/metrics` answer during a long prefill. Simple
and cheap to start (tests, CPU); the engine's host-side Python shares the GIL with HTTP work, which is why
GPU serving uses `ProcessEngine` instead.

The engine thread marks its progress after every step and every idle wait (at most 0.5 s apart); a
thread stuck in a step for longer than the stall timeout makes `/health` answer 503 (watchdog.py). A
command that raises (add, abort, a call) fails only its own request; a step that raises is handled by
`LLMEngine.step` itself; anything else ends the loop, fails every request and calls `on_fatal`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import generate_latest
from starlette.concurrency import run_in_threadpool

from actserve.server.engine.config import EngineConfig, apply_cpu_threads
from actserve.server.engine.engine_client import (
    EngineClient,
    EngineDeadError,
    merge_outputs,
    plugin_call_in_engine,
)
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.messages import Abort, Add, Stop
from actserve.server.engine.sequence import Sequence
from actserve.server.engine.watchdog import Progress, thread_cpu_clock

log = logging.getLogger(__name__)
T = TypeVar("T")
__all__ = ["AsyncEngine", "EngineDeadError", "make_engine", "merge_outputs"]


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def use_engine_process(config: EngineConfig) -> bool:
    """auto: a process on CUDA (the engine's host work and HTTP work then use different cores), a thread
    on CPU (where the forward pass is the bottleneck and a spawned process costs seconds to start).
    Tensor parallelism always uses a process: a rank that dies ends it, and the server answers 503 and
    exits (a thread could only take the whole server down without answering)."""
    if config.tensor_parallel_size > 1:
        if config.engine_process == "off":
            raise ValueError(
                "--tensor-parallel-size above 1 runs the engine core in its own process; "
                "drop --engine-process off"
            )
        return True
    if config.engine_process != "auto":
        return config.engine_process == "on"
    if config.device != "auto":
        return config.device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def make_engine(config: EngineConfig) -> EngineClient:
    """The engine for `actserve serve`: in its own process or on a thread, per `config.engine_process`."""
    if use_engine_process(config):
        from actserve.server.engine.process_engine import ProcessEngine

        return ProcessEngine(config)
    return AsyncEngine.from_config(config)


@dataclass(frozen=True, slots=True)
class ThreadCall:
    """`run_in_engine` in thread mode: fn(engine, *args) on the engine thread, settled on `loop`. The
    process engine's `Call` carries an id instead (a loop and a future do not cross processes)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


# what the event loop sends the engine thread (the typed messages of engine/messages.py, and ThreadCall)
Command = Add | Abort | ThreadCall | Stop


class AsyncEngine(EngineClient):
    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self.model_name = engine.model_name
        self.tokenizer = engine.tokenizer
        self.model_info = engine.model_info
        self.max_model_len = engine.max_model_len
        self._commands: queue.Queue[Command] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="actserve-engine", daemon=True)
        self._thread.start()
        on_cpu = engine.model_info.device.type == "cpu"
        cpu = thread_cpu_clock(self._thread) if on_cpu else None
        self._watch_progress(Progress(engine.config.stall_timeout, cpu))

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    # -- event-loop side ------------------------------------------------------------------------------
    def _submit(self, seq: Sequence) -> None:
        self._commands.put(Add(seq))

    def abort(self, seq_id: str) -> None:
        self._commands.put(Abort(seq_id))

    async def run_in_engine(self, fn: Callable[..., T], *args: Any) -> T:
        self._check_alive()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._commands.put(ThreadCall(fn, args, loop, future))
        return await future

    async def plugin_call(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(plugin_call_in_engine, self.engine, name, fn, *args)

    async def prepare_interventions(self, spec: dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
        """In a worker thread: validating a large spec (vectors of hidden_size floats, named-vector
        lookups, n copies) must not stall the event loop. The registry is safe to prepare from any
        thread (plugins take their slots under a lock)."""
        return await run_in_threadpool(self.engine.registry.prepare_many, spec, count)

    def release_interventions(self, plans: dict[str, Any]) -> None:
        self.engine.registry.release(plans)

    def describe_interventions(self) -> list[dict[str, Any]]:
        return self.engine.registry.describe()

    def num_waiting(self) -> int:
        return self.engine.scheduler.num_queued

    async def metrics_text(self) -> bytes:
        return generate_latest(self.engine.metrics.registry)

    def shutdown(self) -> None:
        self._stop_watching()
        self._stop.set()
        self._commands.put(Stop())
        self._thread.join(timeout=10)

    # -- engine-thread side ---------------------------------------------------------------------------
    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            if isinstance(cmd, Add):
                try:
                    self.engine.add(cmd.seq)
                except Exception as e:  # noqa: BLE001 - reported to that request only
                    self.engine.registry.release(cmd.seq.interventions)
                    self._deliver(e, cmd.seq.seq_id)
            elif isinstance(cmd, Abort):
                try:
                    self.engine.abort(cmd.seq_id)
                except Exception:  # noqa: BLE001 - its client is gone already; keep serving the others
                    log.exception("aborting %s failed", cmd.seq_id)
            elif isinstance(cmd, ThreadCall):
                self._call(cmd.fn, cmd.args, cmd.loop, cmd.future)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future,
    ) -> None:
        assert self.progress is not None
        try:
            with self.progress.exempt():
                result = fn(self.engine, *args)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    def _loop(self) -> None:
        apply_cpu_threads(self.engine.config.cpu_threads)  # per thread with OpenMP: set it here
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_work())
                if self.progress is not None:
                    self.progress.beat()
                if not self.engine.has_work():
                    self.engine.metrics.refresh_memory()
                    continue
                self._deliver_many(self.engine.step())
        except BaseException as e:  # noqa: BLE001 - tell every waiter, then stop
            log.exception("engine loop failed")
            self._fail_all(e)
            while True:  # calls queued behind the failure get the error too, not a hang
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    return
                if isinstance(cmd, ThreadCall):
                    dead = EngineDeadError(f"engine stopped: {e}")
                    cmd.loop.call_soon_threadsafe(_settle, cmd.future, None, dead)
