"""Process mode (`--engine-process on`): the API-process side of the engine-core process.

The core (server/engine/engine_core_process.py) owns the model; this process keeps the tokenizer, model
facts and interventions listing it sent at start-up, so tokenization, validation and SSE never wait on
it. A reader thread receives one message per engine step and hands all its deltas to the event loop in
one callback; calls (plugin services, training, metrics, intervention plans) are RPCs the core runs
between steps. Messages to the core go through a writer thread, so the event loop never blocks on a full
pipe (a stopped core reads nothing).

Every message from the core is a sign of progress (it sends one per step and a heartbeat while idle or
busy in a call); the watchdog (watchdog.py) turns a silence longer than `--engine-stall-timeout` into a
stall: 503 on `/health`, new requests and pending calls, open streams aborted. Calls also time out on
their own (`CALL_TIMEOUT_S`). If the core dies, every stream and pending call gets EngineDeadError
(503) and `on_fatal` is called: `actserve serve` then exits non-zero for its supervisor to restart it
(the core is not restarted in-process).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import generate_latest

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineStalledError,
    plugin_call_in_engine,
    unpack_error,
)
from actserve.server.engine.engine_core_process import REMOTE_PLAN, engine_core_main
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.messages import (
    Abort,
    Add,
    Beat,
    Call,
    Dead,
    Failed,
    Outputs,
    Prepare,
    Ready,
    Release,
    Reply,
    SeqFailed,
    Stop,
    ToCore,
)
from actserve.server.engine.sequence import Sequence
from actserve.server.engine.watchdog import Progress, process_cpu_clock

log = logging.getLogger(__name__)
T = TypeVar("T")
STARTUP_POLL_S = 0.5
# a call to the core (metrics, plugin services, intervention plans) that has no answer after this long
# fails with 503; `run_in_engine` (training) has no such limit, only the stall timeout
CALL_TIMEOUT_S = 30.0
STOP_WAIT_S = 10.0  # shutdown: how long the core may take to stop in order before it is killed


def metrics_bytes(eng: LLMEngine) -> bytes:
    return generate_latest(eng.metrics.registry)


def _settle(
    future: asyncio.Future, ok: bool, value: Any, dropped: Callable[[Any], None] | None = None
) -> None:
    """Settle `future` from a reply, unless its caller gave up first: then `dropped(value)` (a
    successful reply's clean-up, e.g. plans to give back), since nobody else will see the value."""
    if future.done():
        if dropped is not None and ok:
            dropped(value)
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class ProcessEngine(EngineClient):
    def __init__(self, config: EngineConfig) -> None:
        """Spawn the core and wait until it has loaded the model (raises its load error)."""
        super().__init__()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=engine_core_main,
            args=(config, child, logging.getLogger().getEffectiveLevel(), os.getpid()),
            name="actserve-engine-core",
        )
        self.process.start()
        atexit.register(self.shutdown)  # before multiprocessing's own exit hook joins the child
        child.close()  # only the core holds its end: its exit is EOF here
        self._outbox: queue.SimpleQueue[ToCore | None] = queue.SimpleQueue()
        # calls awaiting a reply: (loop, future, message kind); given up on (timeout, stall): kind, for
        # late replies. A reply and a give-up race (reader thread, event loop): both sides move a call
        # between the two under this lock, so a late plan is given back whichever comes first
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future, type]] = {}
        self._abandoned: dict[int, type] = {}
        self._calls_lock = threading.Lock()
        self._call_ids = itertools.count()
        self._waiting_reported = 0
        self._closed = False
        try:
            facts = self._await_ready()
        except BaseException:
            self._terminate(5)  # a core that failed to load exits by itself
            raise
        self.model_name = facts.model_name
        self.model_info = facts.model_info
        self.tokenizer = facts.tokenizer
        self.max_model_len = facts.max_model_len
        self._interventions = facts.interventions
        self._writer = threading.Thread(target=self._write, name="actserve-core-send", daemon=True)
        self._writer.start()
        self._reader = threading.Thread(target=self._read, name="actserve-core-ipc", daemon=True)
        self._reader.start()
        assert self.process.pid is not None
        cpu = process_cpu_clock(self.process.pid) if self.model_info.device.type == "cpu" else None
        self._watch_progress(Progress(config.stall_timeout, cpu))

    def _await_ready(self) -> Ready:
        while not self._conn.poll(STARTUP_POLL_S):
            if not self.process.is_alive():
                code = self.process.exitcode
                raise EngineDeadError(f"engine process exited with code {code} while loading")
        try:
            msg = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise EngineDeadError(
                f"engine process exited with code {self.process.exitcode} while loading"
            ) from None
        if isinstance(msg, Failed):
            raise unpack_error(msg.error)
        if not isinstance(msg, Ready):
            raise EngineDeadError(f"engine process sent {type(msg).__name__} before it was ready")
        return msg

    # -- sending --------------------------------------------------------------------------------------
    def _send(self, msg: ToCore) -> None:
        """Queue a message for the core (never blocks; a stalled core's messages wait in the queue)."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error}")
        self._outbox.put(msg)

    def _write(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self._conn.send(msg)
            except (OSError, EOFError, ValueError):
                return  # the core is gone: the reader sees the EOF and fails everything
            except Exception:  # noqa: BLE001 - e.g. an argument that does not pickle; the caller times out
                log.exception("could not send %s to the engine core", type(msg).__name__)

    def _submit(self, seq: Sequence) -> None:
        self._send(Add(seq))
        self._waiting_reported += 1  # until the next step report says otherwise

    def abort(self, seq_id: str) -> None:
        try:
            self._send(Abort(seq_id))
        except EngineDeadError:
            pass  # nothing left to abort

    async def _rpc(self, timeout: float | None, make: Callable[[int], Call | Prepare]) -> Any:
        """Send a call (`make(call_id)`) and wait for its reply, at most `timeout` seconds (None: until
        the core stalls)."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        call_id = next(self._call_ids)
        msg = make(call_id)
        with self._calls_lock:
            self._calls[call_id] = (loop, future, type(msg))
        try:
            self._send(msg)
            return await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, EngineStalledError):
            with self._calls_lock:  # no reply taken yet: the reader gives back what it brings
                if self._calls.pop(call_id, None) is not None:
                    self._abandoned[call_id] = type(msg)
            raise EngineStalledError(
                self.stall or f"the engine did not answer within {timeout:g} s (busy or stalled)"
            ) from None
        finally:
            with self._calls_lock:
                self._calls.pop(call_id, None)

    async def run_in_engine(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._rpc(None, lambda call_id: Call(call_id, fn, args))

    async def plugin_call(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        return await self._rpc(
            CALL_TIMEOUT_S, lambda call_id: Call(call_id, plugin_call_in_engine, (name, fn, *args))
        )

    async def prepare_interventions(self, spec: dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
        if not spec:
            return [{} for _ in range(count)]
        return await self._rpc(CALL_TIMEOUT_S, lambda call_id: Prepare(call_id, spec, count))

    def release_interventions(self, plans: dict[str, Any]) -> None:
        if REMOTE_PLAN in plans:
            try:
                self._send(Release([plans[REMOTE_PLAN]]))
            except EngineDeadError:
                pass

    def describe_interventions(self) -> list[dict[str, Any]]:
        return self._interventions

    def num_waiting(self) -> int:
        return self._waiting_reported

    async def metrics_text(self) -> bytes:
        return await self._rpc(CALL_TIMEOUT_S, lambda call_id: Call(call_id, metrics_bytes, ()))

    def _on_stall(self, error: EngineStalledError) -> None:
        for loop, future, _ in list(self._calls.values()):
            loop.call_soon_threadsafe(_settle, future, False, error)

    # -- receiving (reader thread) --------------------------------------------------------------------
    def _read(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                msg = self._conn.recv()
                if self.progress is not None:
                    self.progress.beat()
                if isinstance(msg, Outputs):
                    self._waiting_reported = msg.num_waiting
                    self._deliver_many(msg.outputs)
                elif isinstance(msg, Beat):
                    self._waiting_reported = msg.num_waiting
                elif isinstance(msg, Reply):
                    self._on_reply(msg.call_id, msg.ok, msg.value)
                elif isinstance(msg, SeqFailed):
                    self._deliver(unpack_error(msg.error), msg.seq_id)
                elif isinstance(msg, Dead):
                    error = unpack_error(msg.error)
                    break
                else:
                    log.error("engine core sent an unknown message %s", type(msg).__name__)
        except (EOFError, OSError) as e:
            error = e
        except BaseException as e:  # noqa: BLE001 - a message we cannot read: same as losing the core
            log.exception("engine IPC failed")
            error = e
        if self._closed:
            return
        self.process.join(5)
        why = f"engine process exited (code {self.process.exitcode})"
        if error is not None and not isinstance(error, (EOFError, OSError)):
            why = f"{why}: {error}"
        log.error("%s", why)
        dead = EngineDeadError(f"engine stopped: {why}")
        for loop, future, _ in list(self._calls.values()):
            loop.call_soon_threadsafe(_settle, future, False, dead)
        self._fail_all(RuntimeError(why))

    def _on_reply(self, call_id: int, ok: bool, value: Any) -> None:
        with self._calls_lock:
            target = self._calls.pop(call_id, None)
            kind = target[2] if target is not None else self._abandoned.pop(call_id, None)
        # plans prepared for a caller that gave up (before or while this reply came): nobody will add or
        # release them
        give_back = self._give_back if kind is Prepare else None
        if target is not None:
            loop, future, _ = target
            loop.call_soon_threadsafe(_settle, future, ok, value if ok else unpack_error(value), give_back)
        elif give_back is not None and ok:
            give_back(value)

    def _give_back(self, plans: Any) -> None:
        self._send(Release([ref[REMOTE_PLAN] for ref in plans]))

    # -- shutdown -------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Ask the core to stop, then make sure it has (no orphan process, no hang at exit)."""
        if self._closed:
            return
        self._closed = True
        self._stop_watching()
        atexit.unregister(self.shutdown)
        if hasattr(self, "_writer"):  # serving: the core stops in order after the commands before this
            self._outbox.put(Stop())
            self._outbox.put(None)
            self._terminate(STOP_WAIT_S)
        else:  # still loading (the server is stopping before it was ready): nothing to lose
            self._terminate(0)

    def _terminate(self, wait_s: float = 0) -> None:
        """Wait up to `wait_s` for the core to exit, then kill it (it ignores SIGTERM and SIGINT: the
        server stops it in order)."""
        self._closed = True
        self.process.join(wait_s)
        if self.process.is_alive():
            if wait_s:
                log.warning("engine core did not stop within %g s; killing it", wait_s)
            self.process.kill()
            self.process.join(5)
        self._conn.close()
