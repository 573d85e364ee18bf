"""What the API layer needs from an engine, whichever way it runs (a thread of this process or its own
process): model facts kept locally, per-request output streams, and calls executed by the engine.

The stream side lives here once: the engine (thread or IPC reader) hands each step's deltas over in one
batch per event loop, `generate` merges a consumer's backlog into one delta, and a consumer that goes
away (client disconnect) aborts its sequence, which frees its KV blocks in the engine.

So does the engine's health: a watchdog thread follows the engine's progress (`watchdog.Progress`);
once it has made none for the stall timeout, every open stream and pending call fails with
EngineStalledError (503) and new requests are refused until it moves again. An engine that died calls
`on_fatal`: the CLI then stops the server with a non-zero exit code, so that its supervisor restarts it
(the core is not restarted in-process: a fresh process is the one state known to be clean).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from actserve.server.engine.outputs import SeqOutput, check_fits
from actserve.server.engine.sequence import Sequence
from actserve.server.engine.watchdog import Progress

if TYPE_CHECKING:
    from actserve.server.contract import ModelInfo
    from actserve.server.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)
T = TypeVar("T")
Stream = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[SeqOutput | BaseException]"]


class EngineDeadError(RuntimeError):
    """The engine stopped on an unexpected error (or its process died); the server reports 503."""


class EngineStalledError(EngineDeadError):
    """The engine made no progress for the stall timeout (or did not answer a call in time): 503. Unlike
    a dead engine it may recover (e.g. a stopped process that is continued)."""


class EngineRequestError(RuntimeError):
    """An internal error of the engine hit this request (its step raised); the others go on. 500."""


def merge_outputs(a: SeqOutput, b: SeqOutput) -> SeqOutput:
    """Two consecutive deltas of one sequence as one (b's state is the later one)."""
    return dataclasses.replace(
        b,
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        logprobs=a.logprobs + b.logprobs,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
    )


def pack_error(e: BaseException) -> tuple[Any, ...]:
    """An exception in a form that survives pickling. Many of ours take (message, param) in __init__,
    which plain exception pickling cannot rebuild, so the class, args and attributes travel apart."""
    packed = (type(e), e.args, dict(vars(e)), f"{type(e).__name__}: {e}")
    try:
        pickle.dumps(packed)
    except Exception:  # noqa: BLE001 - an unpicklable attribute: keep the text only
        return (RuntimeError, (packed[3],), {}, packed[3])
    return packed


def unpack_error(packed: tuple[Any, ...]) -> BaseException:
    cls, args, attrs, text = packed
    try:
        e = cls.__new__(cls)
        e.args = args
        e.__dict__.update(attrs)
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt this way
        return RuntimeError(text)
    return e


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def plugin_call_in_engine(eng: LLMEngine, name: str, fn: Callable[..., T], *args: Any) -> T:
    """fn(plugin, *args) where the plugins live (the engine process, in process mode)."""
    return fn(engine_plugin(eng, name), *args)


def engine_plugin(eng: LLMEngine, name: str) -> Any:
    plugin = eng.registry.plugin(name)
    if plugin is None:
        raise LookupError(f"no intervention plugin {name!r} is loaded")
    return plugin


class EngineClient:
    """Base of `AsyncEngine` (engine thread) and `ProcessEngine` (engine process)."""

    model_name: str
    tokenizer: Any
    model_info: ModelInfo
    max_model_len: int

    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.progress: Progress | None = None  # set by `_watch_progress`
        self.stall: str | None = None  # why the engine counts as stalled now (the watchdog's verdict)
        self.on_fatal: Callable[[str], None] | None = None  # called once when the engine dies
        self._watch_stop = threading.Event()

    # -- what subclasses provide ---------------------------------------------------------------------
    def _submit(self, seq: Sequence) -> None:
        raise NotImplementedError

    def abort(self, seq_id: str) -> None:
        raise NotImplementedError

    async def run_in_engine(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(engine, *args) where the engine runs, between steps (it owns the model and device state).
        In process mode fn and args are pickled: pass a module-level function."""
        raise NotImplementedError

    async def plugin_call(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(plugin, *args) for the intervention plugin `name` (e.g. to use its `service`), off the
        event loop: a worker thread, or the engine process in process mode (module-level fn: pickled)."""
        raise NotImplementedError

    async def prepare_interventions(self, spec: dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
        """`count` plans for one request's `interventions` (one per sequence); raises its 400/503 errors."""
        raise NotImplementedError

    def release_interventions(self, plans: dict[str, Any]) -> None:
        raise NotImplementedError

    def describe_interventions(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def num_waiting(self) -> int:
        raise NotImplementedError

    async def metrics_text(self) -> bytes:
        """The engine's Prometheus exposition (names of docs/architecture.md §8)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------
    def check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        """`max_tokens` resolved for a prompt, or RequestRejected (this client's copy of `max_model_len`):
        the one admission check of API requests, run when their sequences are made (api/generation.py)."""
        return check_fits(self.max_model_len, prompt_len, max_tokens)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error}")
        if self.stall is not None:
            raise EngineStalledError(self.stall)

    def health_problem(self) -> str | None:
        """Why this engine cannot serve now (dead or stalled), or None."""
        if self.error is not None:
            return f"engine stopped: {self.error}"
        return self.stall

    def num_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- progress watchdog ------------------------------------------------------------------------------
    def _watch_progress(self, progress: Progress) -> None:
        """Start the thread that turns a lack of progress into a stall (and a resumed one back)."""
        self.progress = progress
        interval = max(0.05, min(0.5, progress.timeout / 4))

        def watch() -> None:
            while not self._watch_stop.wait(interval):
                if self.error is not None:
                    return
                progress.poll()
                why = progress.stalled()
                if why is not None and self.stall is None:
                    self.stall = why
                    log.error("%s; failing %d open request(s)", why, self.num_streams())
                    self.interrupt_all(EngineStalledError(f"{why}; request aborted"))
                    self._on_stall(EngineStalledError(why))
                elif why is None and self.stall is not None:
                    log.warning("engine is making progress again")
                    self.stall = None

        threading.Thread(target=watch, name="actserve-engine-watchdog", daemon=True).start()

    def _on_stall(self, error: EngineStalledError) -> None:
        """Fail whatever else waits on the engine (process mode: pending calls)."""

    def _stop_watching(self) -> None:
        self._watch_stop.set()

    async def generate(self, seq: Sequence) -> AsyncIterator[SeqOutput]:
        """Yield deltas until the sequence finishes; closing the iterator early aborts it."""
        self._check_alive()
        q: asyncio.Queue[SeqOutput | BaseException] = asyncio.Queue()
        with self._lock:
            self._streams[seq.seq_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            self._submit(seq)
            seq.submitted = True
            while True:
                item = await q.get()
                while isinstance(item, SeqOutput) and not item.finished and not q.empty():
                    # the consumer fell behind (many streams): hand over the backlog as one delta
                    nxt = q.get_nowait()
                    item = merge_outputs(item, nxt) if isinstance(nxt, SeqOutput) else nxt
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True  # the engine has already let go of the sequence
                    raise EngineRequestError(item.error)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(seq.seq_id, None)
            if not finished and self.error is None:
                self.abort(seq.seq_id)

    def interrupt(self, seq_id: str, error: BaseException) -> None:
        """End a stream from outside: its consumer raises `error` (e.g. the client disconnected)."""
        self._deliver(error, seq_id)

    def interrupt_all(self, error: BaseException) -> int:
        """End every open stream with `error` (their sequences are aborted); how many there were."""
        with self._lock:
            ids = list(self._streams)
        for seq_id in ids:
            self._deliver(error, seq_id)
        return len(ids)

    def _deliver(self, out: SeqOutput | BaseException, seq_id: str) -> None:
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

    def _fail_all(self, error: BaseException) -> None:
        """The engine is gone: every waiting stream gets EngineDeadError, then `on_fatal` is told."""
        self.error = error
        self._stop_watching()
        self.interrupt_all(EngineDeadError(f"engine stopped: {error}"))
        if self.on_fatal is not None:
            self.on_fatal(f"engine stopped: {error}")
