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


def test_module_alias_prints_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "actserve.server", "serve", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--max-num-batched-tokens" in out.stdout


def test_serve_process(tinystories_dir: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "actserve.server", "serve", "--model", str(tinystories_dir)]
    cmd += ["--port", str(port)]
    cmd += ["--num-kv-blocks", "64", "--api-key", "sekret", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        status = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and status != 200:
            try:
                status = httpx.get(f"{url}/health", timeout=2).status_code
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == 200
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
