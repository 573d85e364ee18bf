"""Runs `LLMEngine` on its own thread and hands each sequence's deltas to asyncio consumers.

The event loop never runs a forward pass, so `/health` and `/metrics` answer during a long prefill, and a
consumer that goes away (client disconnect) aborts its sequences, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine, SeqOutput
from actserve.server.engine.sequence import Sequence

log = logging.getLogger(__name__)
T = TypeVar("T")


def merge_outputs(a: SeqOutput, b: SeqOutput) -> SeqOutput:
    """Two consecutive deltas of one sequence as one (b's state is the later one)."""
    return dataclasses.replace(
        b,
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        logprobs=a.logprobs + b.logprobs,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
    )


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an unexpected error; the server reports 503 from then on."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[SeqOutput | Exception]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="actserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    # -- event-loop side ------------------------------------------------------------------------------
    async def generate(self, seq: Sequence) -> AsyncIterator[SeqOutput]:
        """Yield deltas until the sequence finishes; closing the iterator early aborts it."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error}")
        self.engine.check_fits(seq.prompt_len, seq.params.max_tokens)  # raise before queueing
        q: asyncio.Queue[SeqOutput | Exception] = asyncio.Queue()
        with self._lock:
            self._streams[seq.seq_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", seq))
        finished = False
        try:
            while True:
                item = await q.get()
                while isinstance(item, SeqOutput) and not item.finished and not q.empty():
                    # the consumer fell behind (many streams): hand over the backlog as one delta
                    nxt = q.get_nowait()
                    item = merge_outputs(item, nxt) if isinstance(nxt, SeqOutput) else nxt
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(seq.seq_id, None)
            if not finished:
                self._commands.put(("abort", seq.seq_id))

    async def run_in_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps (it owns the model and device state)."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._commands.put(("call", (fn, loop, future)))
        return await future

    def abort(self, seq_id: str) -> None:
        self._commands.put(("abort", seq_id))

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("noop", None))
        self._thread.join(timeout=10)

    # -- engine-thread side ---------------------------------------------------------------------------
    def _deliver(self, out: SeqOutput | Exception, seq_id: str) -> None:
        with self._lock:
            target = self._streams.get(seq_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _deliver_many(self, outs: list[SeqOutput]) -> None:
        """One wake-up per event loop per step, not one per sequence (64 streams -> 1 callback)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, SeqOutput]]] = {}
        with self._lock:
            for out in outs:
                target = self._streams.get(out.seq_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _drain(self, block: bool) -> None:
        try:
            cmd, arg = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            if cmd == "add":
                try:
                    self.engine.add(arg)
                except Exception as e:  # noqa: BLE001 - reported to that request only
                    self._deliver(e, arg.seq_id)
            elif cmd == "abort":
                self.engine.abort(arg)
            elif cmd == "call":
                self._call(*arg)
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return

    def _call(
        self, fn: Callable[[LLMEngine], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future
    ) -> None:
        try:
            result = fn(self.engine)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_work())
                if not self.engine.has_work():
                    self.engine.metrics.refresh_memory()
                    continue
                self._deliver_many(self.engine.step())
        except BaseException as e:  # noqa: BLE001 - tell every waiter, then stop
            log.exception("engine loop failed")
            self.error = e
            with self._lock:
                ids = list(self._streams)
            for seq_id in ids:
                self._deliver(EngineDeadError(f"engine stopped: {e}"), seq_id)
