"""Process mode (`--engine-process on`): the engine core in its own process behind the same API.

The API/e2e suites already run in both modes (the `tinystories_server` fixture); these tests cover what
only process mode has: deltas equal to thread mode's, aborts that free the sequence in the other
process, errors that cross the pipe with their type and HTTP status, calls that time out, the death of the
core, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from actserve.interventions.steering.library import VectorLibrary
from actserve.interventions.steering.plugin import library_call
from actserve.interventions.steering.train import TrainingError
from actserve.server.engine import process_engine
from actserve.server.engine.async_engine import AsyncEngine, make_engine
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.engine_client import EngineClient, EngineDeadError, EngineStalledError
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.process_engine import ProcessEngine
from actserve.server.engine.sequence import Sequence
from tests.conftest import LiveServer, start_server
from tests.engine_utils import greedy, wait_for

MODEL = "tinystories-656k"
PROMPTS = ["Once upon a time", "The little dog", "Tom had a big red ball. He", "Lily saw a bird"]


def engine_of(server: LiveServer) -> EngineClient:
    engine = server.server.config.app.state.actserve.engine  # type: ignore[attr-defined]
    assert engine is not None
    return engine


def engine_state(eng: LLMEngine) -> tuple[int, int, int]:
    """Runs in the engine process: live sequences, free and total KV blocks."""
    return len(eng.seqs), eng.blocks.num_free, eng.blocks.num_blocks


def raise_training_error(eng: LLMEngine, message: str) -> None:
    raise TrainingError(message, "positive[2]")


def slow_library_call(lib: VectorLibrary, seconds: float) -> str:
    time.sleep(seconds)
    return "late"


def free_steering_slots(eng: LLMEngine) -> int:
    return len(eng.registry.plugins["steering"]._free)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def proc_server(tinystories_dir: Path) -> Iterator[LiveServer]:
    server = start_server(tinystories_dir, num_kv_blocks=128, engine_process="on")
    yield server
    server.stop()


async def collect(engine: EngineClient, prompts: list[list[int]], lengths: list[int]) -> list[Any]:
    async def one(i: int) -> tuple[list[int], str, bool]:
        tokens, text, finished = [], "", False
        async for out in engine.generate(Sequence(f"d{i}", prompts[i], greedy(lengths[i]), [])):
            tokens += out.token_ids
            text += out.text
            finished = out.finished
        return tokens, text, finished

    return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def test_concurrent_greedy_deltas_equal_thread_mode(proc_server: LiveServer, tinystories_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    lengths = [30, 7, 45, 1]
    thread = AsyncEngine(LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=128)))
    try:
        expected = asyncio.run(collect(thread, prompts, lengths))
    finally:
        thread.shutdown()
    process = engine_of(proc_server)
    assert isinstance(process, ProcessEngine)
    got = asyncio.run(collect(process, prompts, lengths))
    assert got == expected
    assert [len(t) for t, _, _ in got] == lengths and all(f for _, _, f in got)


def test_disconnect_frees_the_sequence_in_the_engine_process(proc_server: LiveServer) -> None:
    engine = engine_of(proc_server)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 480, "ignore_eos": True, "stream": True}
    url = f"{proc_server.url}/v1/completions"
    with httpx.Client(timeout=60) as hc, hc.stream("POST", url, json=body) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        next(events), next(events)
        seqs, free, total = asyncio.run(engine.run_in_engine(engine_state))
        assert seqs == 1 and free < total
    assert wait_for(lambda: asyncio.run(engine.run_in_engine(engine_state))[:2] == (0, 128))


def test_errors_cross_the_pipe_with_type_and_status(proc_server: LiveServer) -> None:
    engine = engine_of(proc_server)
    with pytest.raises(TrainingError) as info:
        asyncio.run(engine.run_in_engine(raise_training_error, "positive[2]: too short"))
    assert info.value.param == "positive[2]" and str(info.value) == "positive[2]: too short"
    url = proc_server.url
    # the vector library lives in the engine process: its 404 arrives as a 404
    r = httpx.get(f"{url}/v1/steering/vectors/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"
    # an intervention plan is prepared there: its 400 names the field, before any stream starts
    bad = {"steering": {"vectors": [{"directions": {"1": [1.0] * 5}, "scale": 1.0}]}}
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream": True, "interventions": bad}
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "interventions.steering.vectors[0].directions.1"
    # training runs there too: a bad layer is a 400 naming `layers`
    train = {"name": "t", "positive": ["happy"], "negative": ["sad"], "layers": [99]}
    r = httpx.post(f"{url}/v1/steering/vectors/train", json=train)
    assert r.status_code == 400 and r.json()["error"]["param"] == "layers"
    # and a good request still works, steered through a plan prepared in the engine process
    good = {"steering": {"vectors": [{"directions": {"1": [0.5] * 128}, "scale": 1.0}]}}
    r = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "interventions": good})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_training_runs_in_the_engine_process(proc_server: LiveServer) -> None:
    url = proc_server.url
    train = {"name": "glad", "positive": ["I am happy", "What joy"], "negative": ["I am sad", "What grief"]}
    r = httpx.post(f"{url}/v1/steering/vectors/train", json={**train, "layers": [1]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["layers"] == [1] and len(r.json()["directions"]["1"]) == 128
    assert httpx.post(f"{url}/v1/steering/vectors/train", json=train).status_code == 409
    names = [v["name"] for v in httpx.get(f"{url}/v1/steering/vectors").json()["data"]]
    assert names == ["glad"]
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 3,
            "interventions": {"steering": {"vectors": [{"name": "glad", "scale": 2.0}]}}}  # fmt: skip
    assert httpx.post(f"{url}/v1/completions", json=body).json()["usage"]["completion_tokens"] == 3


def test_calls_time_out_and_late_plans_are_given_back(
    proc_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(proc_server)
    assert isinstance(engine, ProcessEngine)
    monkeypatch.setattr(process_engine, "CALL_TIMEOUT_S", 0.5)
    with pytest.raises(EngineStalledError, match="did not answer within 0.5 s"):
        asyncio.run(engine.plugin_call("steering", library_call, slow_library_call, 2.0))
    assert asyncio.run(engine.run_in_engine(engine_state))[0] == 0  # the core is fine
    assert engine.health_problem() is None  # a call that runs is no stall
    free = asyncio.run(engine.run_in_engine(free_steering_slots))
    monkeypatch.setattr(process_engine, "CALL_TIMEOUT_S", 0.0)  # the caller gives up before the reply
    spec = {"steering": {"vectors": [{"directions": {"1": [0.5] * 128}, "scale": 1.0}]}}
    with pytest.raises(EngineStalledError):
        asyncio.run(engine.prepare_interventions(spec, 2))
    # the late plan is given back when the core's reply arrives: seconds under a loaded CPU (60 s cap)
    assert wait_for(lambda: asyncio.run(engine.run_in_engine(free_steering_slots)) == free, timeout=60)


def test_core_death_is_503_not_a_hang(tinystories_dir: Path) -> None:
    server = start_server(tinystories_dir, num_kv_blocks=64, engine_process="on")
    try:
        engine = engine_of(server)
        assert isinstance(engine, ProcessEngine)
        url = server.url
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines)
            assert engine.process.pid is not None
            os.kill(engine.process.pid, signal.SIGKILL)
            rest = list(lines)  # the stream ends (no hang) with an in-band 503 and [DONE]
        assert rest[-1] == "data: [DONE]"
        assert any('"code": 503' in line for line in rest), rest[-3:]
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=10)
        assert r.status_code == 503 and "engine stopped" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/metrics").status_code == 503
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.run_in_engine(engine_state))
    finally:
        server.stop()


def test_load_error_is_raised_and_shutdown_leaves_no_process(tinystories_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="config.json"):
        make_engine(EngineConfig(model=str(tmp_path), engine_process="on"))
    engine = make_engine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=32, engine_process="on"))
    assert isinstance(engine, ProcessEngine) and engine.process.is_alive()
    t0 = time.monotonic()
    engine.shutdown()
    assert not engine.process.is_alive() and engine.process.exitcode == 0
    assert time.monotonic() - t0 < 10


def test_messages_pickle_round_trip() -> None:
    """Every message between the API process and the core survives the pipe (frozen, slotted
    dataclasses), and equal fields give equal messages."""
    import pickle

    from actserve.server.engine import messages as m
    from actserve.server.engine.outputs import SeqOutput

    out = SeqOutput("s", "hi", [1, 2], [], False)
    for msg in (
        m.Abort("s"),
        m.Call(3, len, ((1, 2),)),
        m.Prepare(4, {"steering": {}}, 2),
        m.Release([1, 2]),
        m.Stop(),
        m.Outputs([out], 5),
        m.Beat(0),
        m.SeqFailed("s", (RuntimeError, ("x",), {}, "RuntimeError: x")),
        m.Reply(3, True, 2),
        m.Dead((RuntimeError, ("x",), {}, "RuntimeError: x")),
    ):
        back = pickle.loads(pickle.dumps(msg))
        assert back == msg and type(back) is type(msg)
        assert not hasattr(msg, "__dict__")
