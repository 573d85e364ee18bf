"""Engine health: a stopped or stuck engine is noticed (/health 503, requests and calls answer 503 instead
of hanging) and recovers when it moves again; a long CPU step is not mistaken for a stall; the engine's
torch thread count follows --cpu-threads in both engine modes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from actserve.server.engine import watchdog
from actserve.server.engine.async_engine import AsyncEngine, make_engine
from actserve.server.engine.config import EngineConfig, engine_cpu_threads
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.process_engine import ProcessEngine
from tests.conftest import LiveServer, start_server
from tests.engine_utils import wait_for

MODEL = "tinystories-656k"
STALL_S = 3.0  # the test servers' --engine-stall-timeout
BODY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}


def health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=10)


# ------------------------------------------------------------------------------ stall: process mode


@pytest.fixture()
def stopped_core(tinystories_dir: Path) -> Iterator[tuple[LiveServer, int]]:
    """A process-mode server whose core the test may SIGSTOP; it is continued and stopped in any case."""
    server = start_server(tinystories_dir, num_kv_blocks=64, engine_process="on", stall_timeout=STALL_S)
    engine = server.server.config.app.state.actserve.engine  # type: ignore[attr-defined]
    assert isinstance(engine, ProcessEngine) and engine.process.pid is not None
    pid = engine.process.pid
    try:
        yield server, pid
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        server.stop()


def test_a_stopped_core_is_noticed_and_recovers(stopped_core: tuple[LiveServer, int]) -> None:
    server, pid = stopped_core
    url = server.url
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=30).status_code == 200
    long = {**BODY, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as hc, hc.stream("POST", f"{url}/v1/completions", json=long) as r:
        lines = (x for x in r.iter_lines() if x.startswith("data: "))
        next(lines)
        os.kill(pid, signal.SIGSTOP)
        rest = list(lines)  # ends (no hang) once the stall is noticed
    assert rest[-1] == "data: [DONE]"
    if not any('"finish_reason": "length"' in x for x in rest):  # unless it finished before the stop
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == 503 and "engine stalled" in error["message"]
    assert wait_for(lambda: health(url).status_code == 503, timeout=STALL_S + 10)
    assert "engine stalled: no progress for" in health(url).json()["error"]
    for method, path, body in [
        ("GET", "/metrics", None),
        ("POST", "/v1/completions", BODY),
        ("GET", "/v1/steering/vectors", None),  # a vector-library call to the core
    ]:
        r = httpx.request(method, f"{url}{path}", json=body, timeout=20)  # answers, does not hang
        assert r.status_code == 503, (path, r.text)
    os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: health(url).status_code == 200, timeout=STALL_S + 10)
    r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{url}/metrics", timeout=20).status_code == 200


# -------------------------------------------------------------------------------- stall: thread mode


@pytest.fixture()
def thread_server(tinystories_dir: Path) -> Iterator[LiveServer]:
    server = start_server(tinystories_dir, num_kv_blocks=64, engine_process="off", stall_timeout=STALL_S)
    yield server
    server.stop()


def patch_launch(server: LiveServer, before: Any) -> None:
    """Run `before()` in the engine thread ahead of the next step's launch (once)."""
    engine = server.server.config.app.state.actserve.engine.engine  # type: ignore[attr-defined]
    launch = engine.runner.launch

    def patched(batch: Any) -> Any:
        engine.runner.launch = launch
        before()
        return launch(batch)

    engine.runner.launch = patched


def post_in_thread(url: str, body: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def post() -> None:
        result["r"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    worker = threading.Thread(target=post)
    worker.start()
    return worker, result


def test_a_stuck_engine_thread_is_noticed_and_recovers(thread_server: LiveServer) -> None:
    url = thread_server.url
    release = threading.Event()
    patch_launch(thread_server, lambda: release.wait(60))  # blocked, burning no CPU: a deadlock
    worker, result = post_in_thread(url, BODY)
    try:
        assert wait_for(lambda: health(url).status_code == 503, timeout=STALL_S + 10)
        assert "engine stalled" in health(url).json()["error"]
        assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=20).status_code == 503
        worker.join(timeout=20)  # the stuck request itself was answered
        assert result["r"].status_code == 503
    finally:
        release.set()
    assert wait_for(lambda: health(url).status_code == 200, timeout=STALL_S + 10)
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=30).status_code == 200


def test_a_long_cpu_step_is_not_a_stall(thread_server: LiveServer) -> None:
    """A step that computes for longer than the stall timeout (a long CPU prefill) keeps /health at 200:
    the engine thread's CPU time counts as progress."""
    url = thread_server.url

    def busy() -> None:
        end = time.monotonic() + STALL_S * 2
        while time.monotonic() < end:
            sum(range(1000))

    patch_launch(thread_server, busy)
    worker, result = post_in_thread(url, BODY)
    statuses = []
    while worker.is_alive():
        statuses.append(health(url).status_code)
        time.sleep(0.3)
    worker.join()
    assert result["r"].status_code == 200 and len(statuses) >= 5
    assert set(statuses) == {200}


def test_progress_counts_cpu_time_and_exempt_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 100.0, "cpu": 0.0}
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock["now"])
    busy = watchdog.Progress(10.0, cpu_seconds=lambda: clock["cpu"])
    idle = watchdog.Progress(10.0, cpu_seconds=lambda: 0.0)
    for _ in range(6):  # 30 s: the busy engine burns a core, the other nothing
        clock["now"] += 5
        clock["cpu"] += 5
        busy.poll()
        idle.poll()
    assert busy.stalled() is None
    assert idle.stalled() == "engine stalled: no progress for 30 s (--engine-stall-timeout 10)"
    idle.beat()
    assert idle.stalled() is None
    with idle.exempt():
        clock["now"] += 30
        idle.poll()
        assert idle.stalled() is None


# ------------------------------------------------------------------------------------------ CPU threads


def engine_threads(eng: LLMEngine) -> int:
    """Runs where the engine steps (its thread, or the core process's main thread)."""
    return torch.get_num_threads()


def test_cpu_threads_default_and_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("actserve.server.engine.config.available_cores", lambda: 8)
    assert engine_cpu_threads(None)[0] == 7
    assert engine_cpu_threads(3) == (3, "--cpu-threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert engine_cpu_threads(None) == (5, "OMP_NUM_THREADS")
    monkeypatch.setattr("actserve.server.engine.config.available_cores", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert engine_cpu_threads(None)[0] == 1


@pytest.mark.parametrize("mode", ["off", "on"], ids=["thread", "process"])
def test_cpu_threads_reach_the_engine(tinystories_dir: Path, mode: str) -> None:
    wanted = max(torch.get_num_threads(), engine_cpu_threads(None)[0]) + 1  # neither default
    config = EngineConfig(
        model=str(tinystories_dir), num_kv_blocks=32, engine_process=mode, cpu_threads=wanted
    )
    engine = make_engine(config)
    assert isinstance(engine, AsyncEngine if mode == "off" else ProcessEngine)
    try:
        assert asyncio.run(engine.run_in_engine(engine_threads)) == wanted
    finally:
        engine.shutdown()
