"""The real `actserve serve` process: flags, start-up, health while loading, one request, clean errors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from actserve.server.cli import build_parser, engine_config
from tests.conftest import free_port


def test_flags_map_to_engine_config() -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--max-num-seqs", "8", "--max-model-len", "128", "--dtype", "float32"]
    )
    cfg = engine_config(args)
    assert (cfg.model, cfg.max_num_seqs, cfg.max_model_len, cfg.dtype) == ("m", 8, 128, "float32")
    assert cfg.engine_process == "auto"
    on = build_parser().parse_args(["serve", "--engine-process", "on"])
    assert engine_config(on).engine_process == "on"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-num-seqs", "0"])
    assert engine_config(on).cuda_graph_prefill_len == 512
    off = build_parser().parse_args(["serve", "--cuda-graph-prefill-len", "0"])
    assert engine_config(off).cuda_graph_prefill_len == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--cuda-graph-prefill-len", "-1"])
    assert cfg.plugin_options["structured_output"] == {"max_compile_seconds": 5.0}
    fast = build_parser().parse_args(["serve", "--max-grammar-compile-seconds", "0.25"])
    assert engine_config(fast).plugin_options["structured_output"] == {"max_compile_seconds": 0.25}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-grammar-compile-seconds", "0"])


def test_lifecycle_flags() -> None:
    default = build_parser().parse_args(["serve"])
    cfg = engine_config(default)
    assert (cfg.cpu_threads, cfg.stall_timeout, default.shutdown_timeout) == (None, 60.0, 30.0)
    args = ["serve", "--cpu-threads", "3", "--engine-stall-timeout", "5", "--shutdown-timeout", "2.5"]
    given = build_parser().parse_args(args)
    cfg = engine_config(given)
    assert (cfg.cpu_threads, cfg.stall_timeout, given.shutdown_timeout) == (3, 5.0, 2.5)
    for bad in (["--cpu-threads", "0"], ["--engine-stall-timeout", "0"], ["--shutdown-timeout", "-1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])


def test_module_alias_prints_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "actserve.server", "serve", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--max-num-batched-tokens" in out.stdout


def health_status(url: str, timeout: float) -> int | None:
    """Poll a starting server's /health until it answers 200 or `timeout` seconds pass; its last status."""
    status = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and status != 200:
        try:
            status = httpx.get(f"{url}/health", timeout=2).status_code
        except httpx.HTTPError:
            pass
        if status != 200:
            time.sleep(0.2)
    return status


def test_serve_process(tinystories_dir: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "actserve.server", "serve", "--model", str(tinystories_dir)]
    cmd += ["--port", str(port)]
    cmd += ["--num-kv-blocks", "64", "--api-key", "sekret", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert health_status(url, 60) == 200
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_engine_core_exits_when_the_server_is_killed(tinystories_dir: Path) -> None:
    """SIGKILL to the API process (no shutdown, no pipe close in order): its engine core process goes too."""
    import psutil

    port = free_port()
    cmd = [sys.executable, "-m", "actserve.server", "serve", "--model", str(tinystories_dir)]
    cmd += ["--port", str(port), "--num-kv-blocks", "64", "--engine-process", "on", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert health_status(f"http://127.0.0.1:{port}", 90) == 200
        cores = psutil.Process(proc.pid).children(recursive=True)
        assert cores, "no engine core process"
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(cores, timeout=15)
        assert not alive, f"engine core outlived its server: {[c.pid for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


CORE_LOADING = """
import multiprocessing as mp, os, time

def core(parent):
    from actserve.server.engine.engine_core_process import exit_with_parent
    exit_with_parent(parent, 0.1)  # the server may already be gone here: it was killed during imports
    time.sleep(120)  # a model still loading: nobody reads the pipe yet

if __name__ == "__main__":
    p = mp.get_context("spawn").Process(target=core, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(120)
"""


def test_engine_core_exits_with_its_parent_while_loading(tmp_path: Path) -> None:
    import psutil

    script = tmp_path / "server.py"
    script.write_text(CORE_LOADING)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        core = psutil.Process(int(proc.stdout.readline()))
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs([core], timeout=30)
        assert not alive, "the core kept running after its parent was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
