"""Shared fixtures: model folders (real small models and random-init families) and a live server."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

# the third-party-style test plugins (tests/plugins): their package from the source tree, their entry
# points from the metadata scripts/setup.sh installs into .venv/test-plugins; only the test suite sees them
# (a process engine's core inherits sys.path), so a server started from the same venv does not load them
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT / "tests/plugins/actserve_test_plugins"), str(_ROOT / ".venv/test-plugins")]

# Ray (tests/test_ray_replicas.py) on loopback only, sending no usage report: read when ray is imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the node's address: 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

# TinyStories-656K ships with the repository (tests/data/tinystories-656k/README.md: source, licence)
TINYSTORIES = Path(__file__).resolve().parent / "data" / "tinystories-656k"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    if not (TINYSTORIES / "model.safetensors").exists():
        pytest.fail(f"TinyStories-656K not found at {TINYSTORIES} (it is part of the repository)")
    return TINYSTORIES


@pytest.fixture(scope="session")
def ref(tinystories_dir: Path) -> Any:
    """transformers' own TinyStories model in float32, the reference most tests compare against; shared
    by the session, so a test that registers hooks on it removes them (try/finally)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tinystories_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def sparsity_calibration(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TinyStories-656K's sparsity calibration (TEAL, CHESS, R-Sparse) on the FP4 bench's calibration
    split, made once per session by `actserve sparsity calibrate` (tests/test_sparsity*.py)."""
    from actserve.server.cli import main

    calib = Path(__file__).resolve().parents[1] / "bench" / "data" / "fp4_quality" / "tinystories_calib.jsonl"
    out = tmp_path_factory.mktemp("sparsity") / "tiny.safetensors"
    argv = ["sparsity", "calibrate", "--model", str(tinystories_dir), "--device", "cpu", "--text", str(calib)]
    assert main([*argv, "--out", str(out), "--correction-tokens", "1024"]) == 0
    return out


def save_random_model(config: object, path: Path, seed: int = 0) -> Path:
    """A random-init HF model of any family, saved with TinyStories' tokenizer (vocab 2048)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(TINYSTORIES / name, path / name)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1 in a thread, serving a real engine."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", http="h11")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return
                if r.status_code == 503 and r.json().get("status") == "unhealthy":
                    self.stop()
                    raise RuntimeError(f"model failed to load: {r.json().get('error')}")
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy in 120 s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(model_dir: Path, api_key: str | None = None, **engine_kwargs: object) -> LiveServer:
    """A live server; `engine_process="on"` runs the engine core in its own process (default: a thread)."""
    from actserve.server.api.app import create_app
    from actserve.server.engine.async_engine import make_engine
    from actserve.server.engine.config import EngineConfig

    config = EngineConfig(model=str(model_dir), **engine_kwargs)  # type: ignore[arg-type]
    return LiveServer(create_app(load=lambda: make_engine(config), api_key=api_key))


def assert_refused(url: str, body: dict[str, Any], bad: list[tuple[Any, str, list[str]]]) -> None:
    """Each (interventions, param, words) of `bad` sent as the body's interventions is a 400 whose error
    names `param` and whose message holds every word."""
    for interventions, param, words in bad:
        r = httpx.post(f"{url}/v1/completions", json={**body, "interventions": interventions}, timeout=60)
        assert r.status_code == 400, (interventions, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (interventions, r.text)
        for w in words:
            assert w in err["message"], (interventions, err["message"])


ENGINE_MODES = {"thread": "off", "process": "on"}


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def tinystories_server(tinystories_dir: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """The API/e2e tests run against both engine modes: a thread of the server, and its own process."""
    server = start_server(tinystories_dir, num_kv_blocks=256, engine_process=ENGINE_MODES[request.param])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct), converted once into the user cache."""
    from actserve.server.models.default_model import DefaultModelUnavailable, ensure_default_model

    try:
        return ensure_default_model()
    except DefaultModelUnavailable as e:
        pytest.fail(str(e))
