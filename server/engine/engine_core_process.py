"""The engine-core process (`--engine-process on`): loads the model from the `EngineConfig` and runs the
`LLMEngine` step loop, talking to the API process over one duplex pipe.

API -> core: ("add", seq), ("abort", seq_id), ("call", id, fn, args), ("prepare", id, spec, count),
("release", plan_ids), ("stop",).
Core -> API: ("ready", facts) or ("failed", error) once; then ("out", outputs, num_waiting) once per step
(every sequence's delta in one message), ("err", seq_id, error), ("reply", id, ok, value), ("dead", error).

A reader thread moves commands off the pipe into a queue at once, so the API process never blocks on a
full pipe while a step runs; the main thread drains that queue between steps, as the thread mode does.
The pipe's EOF (the API process died) stops the loop, and a watchdog thread exits the process when its
parent is gone (also while loading), so the core never outlives its server.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.engine_client import pack_error
from actserve.server.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)
REMOTE_PLAN = "\x00plan"  # key of a plan stand-in in the API process: {REMOTE_PLAN: id}


def engine_facts(engine: LLMEngine) -> dict[str, Any]:
    """What the API process keeps locally (no round trip per request)."""
    return {
        "model_name": engine.model_name,
        "model_info": engine.model_info,
        "tokenizer": engine.tokenizer,
        "max_model_len": engine.max_model_len,
        "interventions": engine.registry.describe(),
    }


class EngineCore:
    def __init__(self, engine: LLMEngine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self.commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.plans: dict[int, dict[str, Any]] = {}  # prepared, not yet added (or released)
        self._plan_ids = itertools.count()
        self.running = True
        threading.Thread(target=self._read, name="actserve-core-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                self.commands.put(self.conn.recv())
        except (EOFError, OSError):
            self.commands.put(("stop",))  # the API process is gone

    def run(self) -> None:
        eng = self.engine
        while self.running:
            self._drain(block=not eng.has_work())
            if not self.running:
                return
            if not eng.has_work():
                eng.metrics.refresh_memory()
                continue
            outputs = eng.step()
            if outputs:
                self.conn.send(("out", outputs, len(eng.scheduler.waiting)))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self.commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: tuple[Any, ...]) -> None:
        kind, eng = cmd[0], self.engine
        if kind == "add":
            seq = cmd[1]
            ref = seq.interventions.get(REMOTE_PLAN)
            if ref is not None:
                seq.interventions = self.plans.pop(ref, {})
            try:
                eng.add(seq)
            except Exception as e:  # noqa: BLE001 - reported to that request only
                eng.registry.release(seq.interventions)
                self.conn.send(("err", seq.seq_id, pack_error(e)))
        elif kind == "abort":
            eng.abort(cmd[1])
        elif kind == "call":
            self._reply(cmd[1], cmd[2], eng, *cmd[3])
        elif kind == "prepare":
            self._reply(cmd[1], self._prepare, cmd[2], cmd[3])
        elif kind == "release":
            for ref in cmd[1]:
                eng.registry.release(self.plans.pop(ref, {}))
        elif kind == "stop":
            self.running = False

    def _prepare(self, spec: dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
        made = self.engine.registry.prepare_many(spec, count)
        refs = []
        for plans in made:
            ref = next(self._plan_ids)
            self.plans[ref] = plans
            refs.append({REMOTE_PLAN: ref})
        return refs

    def _reply(self, call_id: int, fn: Any, *args: Any) -> None:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            self.conn.send(("reply", call_id, False, pack_error(e)))
            return
        try:
            self.conn.send(("reply", call_id, True, result))
        except Exception as e:  # noqa: BLE001 - e.g. a result that does not pickle
            self.conn.send(("reply", call_id, False, pack_error(e)))


def leave_a_core_to_the_server(engine: LLMEngine) -> None:
    """On CPU the forward pass uses every core by default; the API process then preempts one of its
    OpenMP threads mid-barrier and steps slow down many times over. Unless OMP_NUM_THREADS says
    otherwise, the engine takes one core fewer."""
    if engine.model_info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))


def exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """A thread that ends this process once `parent` (the server's pid, passed at spawn: it may already
    be gone by the time this runs) is no longer its parent. A SIGKILLed server never stops the core in
    order, and while the model loads nobody reads the pipe, so its EOF would go unseen until then."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("the server process (pid %d) is gone: engine core exiting", parent)
        os._exit(0)

    threading.Thread(target=watch, name="actserve-core-parent-watch", daemon=True).start()


def engine_core_main(config: EngineConfig, conn: Connection, log_level: int, parent: int) -> None:
    """Entry point of the spawned process; `parent` is the server's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us in order
    exit_with_parent(parent)
    fmt = f"%(asctime)s %(levelname)s core[{os.getpid()}] %(name)s: %(message)s"
    logging.basicConfig(level=log_level, format=fmt)
    try:
        engine = LLMEngine(config)
        leave_a_core_to_the_server(engine)
        conn.send(("ready", engine_facts(engine)))
    except BaseException as e:  # noqa: BLE001 - the API process reports it (/health, load error)
        log.exception("engine core failed to load the model")
        conn.send(("failed", pack_error(e)))
        return
    core = EngineCore(engine, conn)
    try:
        core.run()
    except BaseException as e:  # noqa: BLE001 - tell the API process, then exit
        log.exception("engine core loop failed")
        try:
            conn.send(("dead", pack_error(e)))
        except Exception:  # noqa: BLE001 - the pipe may be gone too
            pass
        raise SystemExit(1) from None
