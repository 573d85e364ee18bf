"""The engine-core process (`--engine-process on`): loads the model from the `EngineConfig` and runs the
`LLMEngine` step loop, talking to the API process over one duplex pipe.

The messages are the dataclasses of messages.py: API -> core Add, Abort, Call, Prepare, Release, Stop;
core -> API Ready or Failed once, then Outputs once per step (every sequence's delta in one message),
Beat when nothing else was sent for a heartbeat interval (idle, or busy in a call), SeqFailed, Reply,
Dead.

A reader thread moves commands off the pipe into a queue at once, so the API process never blocks on a
full pipe while a step runs; the main thread drains that queue between steps, as the thread mode does.
Prepare alone runs in worker threads, as the thread mode's does: compiling a request's grammar may take
seconds (up to `--max-grammar-compile-seconds`), and the step loop must not wait for it.
A command that raises fails only its own request (or call); a failing step is handled inside
`LLMEngine.step`; only what escapes it (a fatal device error) ends the process with `Dead`.

The core ignores SIGTERM and SIGINT: they reach it with its server's process group (systemd, Kubernetes,
Ctrl-C), and the server first drains its requests, then stops the core in order. The pipe's EOF (the API
process died) stops the loop, and a watchdog thread exits the process when its parent is gone (also
while loading), so the core never outlives its server.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from actserve.server.engine.config import EngineConfig, apply_cpu_threads
from actserve.server.engine.engine_client import pack_error
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.messages import (
    Abort,
    Add,
    Beat,
    Call,
    Dead,
    Failed,
    FromCore,
    Outputs,
    Prepare,
    Ready,
    Release,
    Reply,
    SeqFailed,
    Stop,
    ToCore,
)
from actserve.server.engine.watchdog import exit_with_parent, heartbeat_interval

log = logging.getLogger(__name__)
REMOTE_PLAN = "\x00plan"  # key of a plan stand-in in the API process: {REMOTE_PLAN: id}
PREPARE_THREADS = 8  # requests' interventions prepared at once; more wait in line


def engine_facts(engine: LLMEngine) -> Ready:
    """What the API process keeps locally (no round trip per request)."""
    return Ready(
        model_name=engine.model_name,
        model_info=engine.model_info,
        tokenizer=engine.tokenizer,
        max_model_len=engine.max_model_len,
        interventions=engine.registry.describe(),
    )


class EngineCore:
    def __init__(self, engine: LLMEngine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self.commands: queue.Queue[ToCore] = queue.Queue()
        self.plans: dict[int, dict[str, Any]] = {}  # prepared, not yet added (or released)
        self._plan_ids = itertools.count()
        self.running = True
        self.beat_s = heartbeat_interval(engine.config.stall_timeout)
        self._send_lock = threading.Lock()  # the main thread and the call heartbeat both send
        self._last_sent = time.monotonic()
        self._in_call = False
        self._preparing = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="actserve-core-prepare")
        threading.Thread(target=self._read, name="actserve-core-reader", daemon=True).start()
        threading.Thread(target=self._beat_during_calls, name="actserve-core-beat", daemon=True).start()

    def send(self, msg: FromCore) -> None:
        with self._send_lock:
            self.conn.send(msg)
            self._last_sent = time.monotonic()

    def _read(self) -> None:
        try:
            while True:
                self.commands.put(self.conn.recv())
        except (EOFError, OSError):
            self.commands.put(Stop())  # the API process is gone

    def _beat_during_calls(self) -> None:
        """A call (training a vector, say) may hold the main thread for long; it is work, not a stall, so
        this thread keeps the heartbeat going meanwhile. A stopped process beats from no thread."""
        while self.running:
            time.sleep(self.beat_s / 2)
            if self._in_call and time.monotonic() - self._last_sent >= self.beat_s:
                try:
                    self.send(Beat(self.engine.scheduler.num_queued))
                except (OSError, EOFError):
                    return

    def run(self) -> None:
        eng = self.engine
        while self.running:
            self._drain(block=not eng.has_work())
            if not self.running:
                return
            if eng.has_work():
                outputs = eng.step()
                if outputs:
                    self.send(Outputs(outputs, eng.scheduler.num_queued))
            else:
                eng.metrics.refresh_memory()
            if time.monotonic() - self._last_sent >= self.beat_s:
                self.send(Beat(eng.scheduler.num_queued))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self.commands.get(block=block, timeout=min(0.5, self.beat_s / 2) if block else None)
        except queue.Empty:
            return
        while True:
            try:
                self._handle(cmd)
            except (OSError, EOFError):
                raise  # the pipe is gone
            except Exception:  # noqa: BLE001 - one command's failure is not the engine's
                log.exception("engine core: command %s failed", type(cmd).__name__)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: ToCore) -> None:
        eng = self.engine
        if isinstance(cmd, Add):
            seq = cmd.seq
            ref = seq.interventions.get(REMOTE_PLAN)
            if ref is not None:
                seq.interventions = self.plans.pop(ref, {})
            try:
                eng.add(seq)
            except Exception as e:  # noqa: BLE001 - reported to that request only
                eng.registry.release(seq.interventions)
                self.send(SeqFailed(seq.seq_id, pack_error(e)))
        elif isinstance(cmd, Abort):
            eng.abort(cmd.seq_id)
        elif isinstance(cmd, Call):
            self._reply(cmd.call_id, cmd.fn, eng, *cmd.args)
        elif isinstance(cmd, Prepare):  # any thread may prepare; plans are stored before the reply
            self._preparing.submit(self._answer, cmd.call_id, self._prepare, cmd.spec, cmd.count)
        elif isinstance(cmd, Release):
            for ref in cmd.plan_ids:
                eng.registry.release(self.plans.pop(ref, {}))
        elif isinstance(cmd, Stop):
            self.running = False
        else:
            raise TypeError(f"unknown command {type(cmd).__name__}")

    def _prepare(self, spec: dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
        made = self.engine.registry.prepare_many(spec, count)
        refs = []
        for plans in made:
            ref = next(self._plan_ids)
            self.plans[ref] = plans
            refs.append({REMOTE_PLAN: ref})
        return refs

    def _reply(self, call_id: int, fn: Any, *args: Any) -> None:
        """`_answer` on the main thread, which the heartbeat thread covers meanwhile."""
        self._in_call = True
        try:
            self._answer(call_id, fn, *args)
        finally:
            self._in_call = False

    def _answer(self, call_id: int, fn: Any, *args: Any) -> None:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            self.send(Reply(call_id, False, pack_error(e)))
            return
        try:
            self.send(Reply(call_id, True, result))
        except Exception as e:  # noqa: BLE001 - e.g. a result that does not pickle
            self.send(Reply(call_id, False, pack_error(e)))


def engine_core_main(config: EngineConfig, conn: Connection, log_level: int, parent: int) -> None:
    """Entry point of the spawned process; `parent` is the server's pid."""
    # the group's SIGTERM / Ctrl-C is the server's to act on: it drains, then sends us "stop"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent(parent)
    fmt = f"%(asctime)s %(levelname)s core[{os.getpid()}] %(name)s: %(message)s"
    logging.basicConfig(level=log_level, format=fmt)
    try:
        apply_cpu_threads(config.cpu_threads)  # the main thread runs the steps (and the load)
        engine = LLMEngine(config)
        conn.send(engine_facts(engine))
    except BaseException as e:  # noqa: BLE001 - the API process reports it (/health, load error)
        log.exception("engine core failed to load the model")
        conn.send(Failed(pack_error(e)))
        return
    core = EngineCore(engine, conn)
    try:
        core.run()
    except BaseException as e:  # noqa: BLE001 - tell the API process, then exit
        log.exception("engine core loop failed")
        core.running = False
        try:
            core.send(Dead(pack_error(e)))
        except Exception:  # noqa: BLE001 - the pipe may be gone too
            pass
        engine.close()  # tensor parallelism: the other ranks stop (or are killed)
        raise SystemExit(1) from None
    core.running = False
    engine.close()
    # stopped in order, but threads may still compile grammars that requests gave up on: the interpreter's
    # finalization waited for them (seconds; up to STOP_WAIT_S and a kill), so leave as a forked child does
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
