"""The `actserve serve` process and its signals: drain on SIGTERM (to the server or its whole process
group, as systemd and Kubernetes send it), abort after --shutdown-timeout, exit non-zero when the model
cannot load or the engine core is killed. Real subprocesses on loopback; every test kills its process
group in the end, whatever happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import TOKENIZER_FILES, free_port
from tests.test_cli import health_status

MODEL = "tinystories-656k"
STREAM = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "ignore_eos": True, "stream": True}


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def core(self) -> psutil.Process:
        """The engine core (multiprocessing also starts a resource tracker)."""
        cores = [p for p in self.children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(cores) == 1, [p.cmdline() for p in self.children()]
        return cores[0]


@contextmanager
def serve(model: Path, tmp_path: Path, *flags: str) -> Iterator[Served]:
    """`python -m actserve.server serve` in a session of its own; SIGKILLed with its group at the end."""
    port = free_port()
    log = tmp_path / f"serve-{port}.stderr"
    cmd = [sys.executable, "-m", "actserve.server", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--num-kv-blocks", "256", "--log-level", "warning", *flags]
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        yield Served(proc, f"http://127.0.0.1:{port}", log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group is this test's: the server and its core
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def started(model: Path, tmp_path: Path, *flags: str) -> Any:
    """`serve`, once /health says 200."""

    @contextmanager
    def run() -> Iterator[Served]:
        with serve(model, tmp_path, *flags) as s:
            assert health_status(s.url, 90) == 200, s.stderr()[-3000:]
            yield s

    return run()


class Streams:
    """`n` streamed completions in threads; `wait_started` returns once each has sent its first event,
    `wait_accepted` once each has its response headers (a queued request has them before any event)."""

    def __init__(self, url: str, n: int, body: dict[str, Any]) -> None:
        self.lines: list[list[str]] = [[] for _ in range(n)]
        self.errors: list[BaseException | None] = [None] * n
        self._first = [threading.Event() for _ in range(n)]
        self._accepted = [threading.Event() for _ in range(n)]
        self._threads = [threading.Thread(target=self._run, args=(url, i, body)) for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, url: str, i: int, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                self._accepted[i].set()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.lines[i].append(line)
                        self._first[i].set()
        except Exception as e:  # noqa: BLE001 - checked by the test
            self.errors[i] = e
        finally:
            self._first[i].set()
            self._accepted[i].set()

    def wait_started(self) -> None:
        for ev in self._first:
            assert ev.wait(60), "a stream never started"

    def wait_accepted(self) -> None:
        for ev in self._accepted:
            assert ev.wait(60), "a stream was never accepted"

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=90)
            assert not t.is_alive(), "a stream hung"

    def events(self, i: int) -> list[dict[str, Any]]:
        return [json.loads(x[6:]) for x in self.lines[i] if x != "data: [DONE]"]


def exited(s: Served, timeout: float) -> int:
    try:
        return s.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {timeout} s:\n{s.stderr()[-3000:]}")


def assert_no_process_left(children: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


# ---------------------------------------------------------------------------------------- model load


def bad_weights(tinystories_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "bad-weights"
    folder.mkdir()
    for name in ["config.json", *TOKENIZER_FILES]:
        (folder / name).write_bytes((tinystories_dir / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    return folder


@pytest.mark.parametrize("mode", ["off", "on"], ids=["thread", "process"])
@pytest.mark.parametrize("case", ["empty-folder", "bad-weights"])
def test_a_model_that_cannot_load_exits_nonzero(
    tinystories_dir: Path, tmp_path: Path, mode: str, case: str
) -> None:
    model = tmp_path / "empty" if case == "empty-folder" else bad_weights(tinystories_dir, tmp_path)
    model.mkdir(exist_ok=True)
    with serve(model, tmp_path, "--engine-process", mode) as s:
        seen = set()
        while s.proc.poll() is None:  # until it exits: /health never promises a model that will not come
            try:
                r = httpx.get(f"{s.url}/health", timeout=2)
                seen.add(r.json()["status"] if r.status_code == 503 else r.status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        code = exited(s, 60)
        log = s.stderr()
    assert code == 3, log[-3000:]
    assert "actserve: error: model failed to load" in log
    assert ("config.json" if case == "empty-folder" else "safetensors") in log.lower()
    assert 200 not in seen


# ---------------------------------------------------------------------------------------- dead core


def test_a_killed_core_fails_every_request_and_the_server_exits_nonzero(
    tinystories_dir: Path, tmp_path: Path
) -> None:
    with started(tinystories_dir, tmp_path, "--engine-process", "on") as s:
        children, core = s.children(), s.core()
        streams = Streams(s.url, 6, {**STREAM, "max_tokens": 480})
        streams.wait_started()
        t0 = time.monotonic()
        core.send_signal(signal.SIGKILL)
        streams.join()
        assert time.monotonic() - t0 < 15  # at once, not after a client timeout (60 s): generous
        for i in range(6):  # each stream ends with a 503 and [DONE]
            assert streams.errors[i] is None and streams.lines[i][-1] == "data: [DONE]"
            error = streams.events(i)[-1]["error"]
            assert error["code"] == 503 and "engine stopped" in error["message"]
        assert exited(s, 30) == 1
        assert "engine stopped" in s.stderr()
        assert_no_process_left(children)


# ---------------------------------------------------------------------------------------- SIGTERM


@pytest.mark.parametrize(
    ("mode", "target"),
    [("on", "group"), ("on", "server"), ("off", "group")],
    ids=["process-group", "process-server-alone", "thread-group"],
)
def test_sigterm_drains_accepted_streams_then_exits_zero(
    tinystories_dir: Path, tmp_path: Path, mode: str, target: str
) -> None:
    with started(tinystories_dir, tmp_path, "--engine-process", mode) as s:
        children = s.children()
        streams = Streams(s.url, 8, {**STREAM, "max_tokens": 300})
        streams.wait_started()
        if target == "group":
            os.killpg(s.proc.pid, signal.SIGTERM)
        else:
            s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:  # a request after the signal: refused, or 503
            late = httpx.post(f"{s.url}/v1/completions", json={**STREAM, "stream": False}, timeout=10)
            assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        except httpx.TransportError:
            pass
        streams.join()
        for i in range(8):
            assert streams.errors[i] is None, streams.errors[i]
            assert streams.lines[i][-1] == "data: [DONE]"
            last = streams.events(i)[-1]
            assert last["choices"][0]["finish_reason"] == "length", last
            assert sum(len(e["choices"][0]["text"]) > 0 for e in streams.events(i)) > 0
        assert exited(s, 40) == 0, s.stderr()[-3000:]
        assert_no_process_left(children)


def test_shutdown_timeout_aborts_what_is_left_with_an_error(tinystories_dir: Path, tmp_path: Path) -> None:
    # one sequence at a time: 16 streams of 480 tokens need far longer than the 1 s allowed
    flags = ("--engine-process", "on", "--shutdown-timeout", "1", "--max-num-seqs", "1")
    with started(tinystories_dir, tmp_path, *flags) as s:
        children = s.children()
        streams = Streams(s.url, 16, {**STREAM, "max_tokens": 480})
        streams.wait_accepted()  # all of them running or queued
        t0 = time.monotonic()
        os.killpg(s.proc.pid, signal.SIGTERM)
        assert exited(s, 30) == 0, s.stderr()[-3000:]
        took = time.monotonic() - t0
        streams.join()
        aborted = 0
        for i in range(16):
            assert streams.errors[i] is None and streams.lines[i][-1] == "data: [DONE]", streams.lines[i][-3:]
            last = streams.events(i)[-1]
            if "error" in last:
                aborted += 1
                assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"]
            else:
                assert last["choices"][0]["finish_reason"] == "length"
        assert aborted >= 8
        assert took < 15  # 1 s of drain, then the engine stops: generous
        assert_no_process_left(children)
