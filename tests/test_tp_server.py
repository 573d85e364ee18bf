"""Tensor parallelism end to end on the CPU (gloo): `actserve serve --tensor-parallel-size 2` answers chat
and steered completions exactly as one rank does, exports each rank's memory, and a rank that dies takes
the server down cleanly (open requests get a 503, the process exits 1, nothing is left behind); and the
torchrun-style launch (two processes given RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as two hosts
would be) serves the same answers and stops both ranks on SIGTERM. Real subprocesses on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import LiveServer, free_port, start_server
from tests.test_api_chat import MESSAGES, copy_with_chat_template
from tests.test_cli import health_status
from tests.test_serve_lifecycle import MODEL, STREAM, Served, Streams, assert_no_process_left, exited, started

pytestmark = pytest.mark.slow  # servers of their own (four): seconds each

CHAT = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 24, "ignore_eos": True}
STEER = {
    "steering": {"vectors": [{"directions": {"1": [0.25 * ((i % 7) - 3) for i in range(128)]}, "scale": 4}]}
}
COMPLETION = {
    "model": MODEL,
    "prompt": "Once upon a time",
    "temperature": 0,
    "max_tokens": 24,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def chat_dir(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_with_chat_template(tinystories_dir, tmp_path_factory.mktemp("tp-chat"))


@pytest.fixture(scope="module")
def one(chat_dir: Path) -> Iterator[LiveServer]:
    server = start_server(chat_dir, num_kv_blocks=256)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two(chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with started(chat_dir, tmp_path_factory.mktemp("tp"), "--tensor-parallel-size", "2") as s:
        yield s


def answers(url: str) -> list[Any]:
    """A chat completion, a plain and a steered completion (text and token usage)."""
    out = []
    for path, body in (
        ("chat/completions", CHAT),
        ("completions", COMPLETION),
        ("completions", {**COMPLETION, "interventions": STEER}),
    ):
        r = httpx.post(f"{url}/v1/{path}", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        usage = r.json()["usage"]  # (its cached-token count depends on what the server ran before)
        text = choice.get("message", {}).get("content", choice.get("text"))
        out.append((text, usage["prompt_tokens"], usage["completion_tokens"]))
    return out


def test_answers_equal_one_rank(one: LiveServer, two: Served) -> None:
    want = answers(one.url)
    assert answers(two.url) == want
    assert want[2] != want[1]  # the steering acts


def test_model_card_says_how_many_ranks(one: LiveServer, two: Served) -> None:
    assert httpx.get(f"{two.url}/v1/models", timeout=30).json()["data"][0]["tensor_parallel_size"] == 2
    assert httpx.get(f"{one.url}/v1/models", timeout=30).json()["data"][0]["tensor_parallel_size"] == 1


def test_refused_intervention_is_a_400(two: Served) -> None:
    body = {**COMPLETION, "interventions": {"precision": {"weights": "nvfp4"}}}
    r = httpx.post(f"{two.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "interventions.precision" and "--tensor-parallel-size 2" in err["message"]


def test_memory_of_every_rank_is_exported(two: Served) -> None:
    text = httpx.get(f"{two.url}/metrics", timeout=30).text
    rows = [line for line in text.splitlines() if line.startswith("actserve_tp_rank_memory_bytes{")]
    by = {
        (r.split('rank="')[1].split('"')[0], r.split('kind="')[1].split('"')[0]): float(r.split()[-1])
        for r in rows
    }
    assert set(by) == {(r, k) for r in ("0", "1") for k in ("weights", "kv_cache")}
    assert by[("0", "kv_cache")] == by[("1", "kv_cache")] > 0  # each rank holds half of the KV heads
    assert by[("0", "weights")] > 0 and by[("1", "weights")] > 0


def ranks(s: Served) -> tuple[psutil.Process, psutil.Process]:
    """The engine core (rank 0) and the rank it spawned (multiprocessing also starts resource trackers)."""

    def spawned(p: psutil.Process) -> list[psutil.Process]:
        return [c for c in p.children() if "spawn_main" in " ".join(c.cmdline())]

    (core,) = spawned(psutil.Process(s.proc.pid))
    (worker,) = spawned(core)
    return core, worker


def test_a_dead_rank_fails_requests_with_503_and_the_server_exits(two: Served) -> None:
    """Last in the module: it takes the server down."""
    children = psutil.Process(two.proc.pid).children(recursive=True)
    _, worker = ranks(two)
    streams = Streams(two.url, 3, {**STREAM, "max_tokens": 480})
    streams.wait_started()
    t0 = time.monotonic()
    worker.send_signal(signal.SIGKILL)
    streams.join()
    assert time.monotonic() - t0 < 20  # at once, not after a client or collective timeout
    for i in range(3):  # each stream ends with a 503 and [DONE]
        assert streams.errors[i] is None and streams.lines[i][-1] == "data: [DONE]"
        error = streams.events(i)[-1]["error"]
        assert error["code"] == 503 and "engine stopped" in error["message"]
    assert exited(two, 30) == 1
    assert "tensor parallel" in two.stderr().replace("-", " "), two.stderr()[-3000:]
    assert_no_process_left(children)


def test_a_rank_that_dies_while_idle_stops_the_server(chat_dir: Path, tmp_path: Path) -> None:
    """No step is running to notice it: rank 0's watch does, the next request gets a 503, the server
    exits 1 (also without that request: after a grace period)."""
    with started(chat_dir, tmp_path, "--tensor-parallel-size", "2") as s:
        children = psutil.Process(s.proc.pid).children(recursive=True)
        _, worker = ranks(s)
        worker.send_signal(signal.SIGKILL)
        time.sleep(1.0)  # rank 0's watch polls every 0.2 s
        r = httpx.post(f"{s.url}/v1/completions", json=COMPLETION, timeout=60)
        assert r.status_code == 503, r.text
        assert exited(s, 30) == 1
        assert "exited with code -9" in s.stderr(), s.stderr()[-3000:]
        assert_no_process_left(children)


def test_torchrun_style_launch(chat_dir: Path, tmp_path: Path, one: LiveServer) -> None:
    """Two processes given the ranks in their environment, as torchrun starts them on two hosts: rank 0
    serves HTTP, rank 1 runs the model's other half; SIGTERM to rank 0 stops both in order."""
    port, master = free_port(), free_port()
    cmd = [sys.executable, "-m", "actserve.server", "serve", "--model", str(chat_dir), "--port", str(port)]
    cmd += ["--num-kv-blocks", "256", "--log-level", "warning", "--tensor-parallel-size", "2"]
    base = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)}
    procs = []
    logs = [tmp_path / f"rank{r}.stderr" for r in (0, 1)]
    try:
        for r in (0, 1):
            env = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
            with logs[r].open("wb") as err:
                run = dict(env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
                procs.append(subprocess.Popen(cmd, **run))  # type: ignore[call-overload]
        url = f"http://127.0.0.1:{port}"
        assert health_status(url, 120) == 200, logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
        assert answers(url) == answers(one.url)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=60) == 0, logs[0].read_text()[-3000:]
        assert procs[1].wait(timeout=30) == 0, logs[1].read_text()[-3000:]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
