"""Process mode (`--engine-process on`): the API-process side of the engine-core process.

The core (server/engine/engine_core_process.py) owns the model; this process keeps the tokenizer, model
facts and interventions listing it sent at start-up, so tokenization, validation and SSE never wait on
it. A reader thread receives one message per engine step and hands all its deltas to the event loop in
one callback; calls (vector library, training, metrics, intervention plans) are RPCs the core runs
between steps. If the core dies, every stream and pending call gets EngineDeadError (503).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import generate_latest

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.engine_client import (
    EngineClient,
    EngineDeadError,
    library_call_in_engine,
    unpack_error,
)
from actserve.server.engine.engine_core_process import REMOTE_PLAN, engine_core_main
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.sequence import Sequence

log = logging.getLogger(__name__)
T = TypeVar("T")
STARTUP_POLL_S = 0.5


def metrics_bytes(eng: LLMEngine) -> bytes:
    return generate_latest(eng.metrics.registry)


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.cancelled():
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
        self._send_lock = threading.Lock()
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._waiting_reported = 0
        self._closed = False
        try:
            facts = self._await_ready()
        except BaseException:
            self._terminate()
            raise
        self.model_name = facts["model_name"]
        self.model_info = facts["model_info"]
        self.tokenizer = facts["tokenizer"]
        self.max_model_len = facts["max_model_len"]
        self._interventions = facts["interventions"]
        self._reader = threading.Thread(target=self._read, name="actserve-core-ipc", daemon=True)
        self._reader.start()

    def _await_ready(self) -> dict[str, Any]:
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
        if msg[0] == "failed":
            raise unpack_error(msg[1])
        return msg[1]

    # -- sending --------------------------------------------------------------------------------------
    def _send(self, msg: tuple[Any, ...]) -> None:
        self._check_alive()
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, EOFError) as e:
            raise EngineDeadError(f"engine process is gone: {e}") from None

    def _submit(self, seq: Sequence) -> None:
        self._send(("add", seq))
        self._waiting_reported += 1  # until the next step report says otherwise

    def abort(self, seq_id: str) -> None:
        try:
            self._send(("abort", seq_id))
        except EngineDeadError:
            pass  # nothing left to abort

    async def _rpc(self, *msg: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        call_id = next(self._call_ids)
        self._calls[call_id] = (loop, future)
        try:
            self._send((msg[0], call_id, *msg[1:]))
            return await future
        finally:
            self._calls.pop(call_id, None)

    async def run_in_engine(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._rpc("call", fn, args)

    async def library_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run_in_engine(library_call_in_engine, fn, *args)

    async def prepare_interventions(self, spec: dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
        if not spec:
            return [{} for _ in range(count)]
        return await self._rpc("prepare", spec, count)

    def release_interventions(self, plans: dict[str, Any]) -> None:
        if REMOTE_PLAN in plans:
            try:
                self._send(("release", [plans[REMOTE_PLAN]]))
            except EngineDeadError:
                pass

    def describe_interventions(self) -> list[dict[str, Any]]:
        return self._interventions

    def num_waiting(self) -> int:
        return self._waiting_reported

    async def metrics_text(self) -> bytes:
        return await self.run_in_engine(metrics_bytes)

    # -- receiving (reader thread) --------------------------------------------------------------------
    def _read(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "out":
                    self._waiting_reported = msg[2]
                    self._deliver_many(msg[1])
                elif kind == "reply":
                    target = self._calls.get(msg[1])
                    if target is not None:
                        value = msg[3] if msg[2] else unpack_error(msg[3])
                        target[0].call_soon_threadsafe(_settle, target[1], msg[2], value)
                elif kind == "err":
                    self._deliver(unpack_error(msg[2]), msg[1])
                elif kind == "dead":
                    error = unpack_error(msg[1])
                    break
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
        self._fail_all(RuntimeError(why))
        dead = EngineDeadError(f"engine stopped: {why}")
        for loop, future in list(self._calls.values()):
            loop.call_soon_threadsafe(_settle, future, False, dead)

    # -- shutdown -------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Ask the core to stop, then make sure it has (no orphan process, no hang at exit)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            with self._send_lock:
                self._conn.send(("stop",))
        except (OSError, EOFError):
            pass
        self._terminate()

    def _terminate(self) -> None:
        self._closed = True
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()
