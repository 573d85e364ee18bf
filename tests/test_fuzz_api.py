"""Schema-driven fuzzing of the HTTP API: schemathesis generates requests from the live server's own
/openapi.json (valid ones, and ones that break the schema on purpose), sends them over loopback, and no
answer may be a 5xx. Afterwards the engine must still serve a normal completion.

Cheap by construction: the server's context is 64 tokens and generated lengths are capped at 4 tokens
(`_cheap`), so a valid generation costs a few engine steps. The routes and the number of cases per
route, mode and seed are fixed, and each seed is fixed, so a run is repeatable and bounded (about
5,000 cases; a few minutes on two cores)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.conftest import LiveServer
from tests.test_api_chat import copy_with_chat_template

MAX_MODEL_LEN = 64
MAX_GENERATED = 4
SEEDS = [0, 1, 2]
POS, NEG = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (path, method, mode, cases per seed): every route a client can call to generate, tokenize or list
ROUTES: list[tuple[str, str, GenerationMode, int]] = [
    ("/v1/completions", "POST", POS, 420),
    ("/v1/completions", "POST", NEG, 300),
    ("/v1/chat/completions", "POST", POS, 300),
    ("/v1/chat/completions", "POST", NEG, 200),
    ("/tokenize", "POST", POS, 150),
    ("/tokenize", "POST", NEG, 100),
    ("/detokenize", "POST", POS, 150),
    ("/detokenize", "POST", NEG, 100),
    ("/v1/models", "GET", POS, 5),
    ("/v1/models/{model}", "GET", POS, 80),  # (a string path parameter cannot break the schema)
]
MIN_CASES = 5000


@pytest.fixture(scope="module")
def fuzz_server(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """TinyStories with a chat template (so chat requests reach the engine), a 64-token context."""
    from actserve.server.api.app import create_app
    from actserve.server.engine.async_engine import make_engine
    from actserve.server.engine.config import EngineConfig

    folder = copy_with_chat_template(tinystories_dir, tmp_path_factory.mktemp("fuzz"))
    config = EngineConfig(
        model=str(folder), num_kv_blocks=128, max_model_len=MAX_MODEL_LEN, engine_process="off"
    )
    live = LiveServer(create_app(load=lambda: make_engine(config), max_waiting=256))
    yield live
    live.stop()


def _cheap(body: Any) -> Any:
    """Cap generated lengths that would be valid (a 400 for an out-of-range value stays a 400), and
    give requests without a length (chat's default is the whole context) a small one."""
    if isinstance(body, dict) and ("prompt" in body or "messages" in body):
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if type(v) is int and MAX_GENERATED < v <= MAX_MODEL_LEN:
                body[key] = MAX_GENERATED
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_GENERATED
    return body


def _fuzz(url: str, operation: Any, mode: GenerationMode, cases: int, seed: int) -> tuple[int, list[str]]:
    """Send up to `cases` generated requests; returns how many were sent and the 5xx ones."""
    sent: list[int] = [0]
    failures: list[str] = []

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @hypothesis.seed(seed)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.body = _cheap(case.body)
        response = case.call(base_url=url, timeout=60)
        sent[0] += 1
        if response.status_code >= 500:
            body = case.body if not isinstance(case.body, bytes) else case.body[:300]
            failures.append(f"{case.method} {case.formatted_path} {body!r:.500} -> {response.text[:300]}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # e.g. no way to break a route without parameters
        pass
    return sent[0], failures


@pytest.mark.slow
def test_no_generated_request_gets_a_5xx(fuzz_server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    url = fuzz_server.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    total, failures = 0, []
    caplog.set_level(logging.ERROR, logger="actserve.server.api.protocol")  # "fields ... ignored"
    for seed in SEEDS:
        for path, method, mode, cases in ROUTES:
            sent, bad = _fuzz(url, schema[path][method], mode, cases, seed)
            total += sent
            failures += bad
    assert not failures, "\n".join(failures[:20])
    assert total >= MIN_CASES, total
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8 or r.json()["choices"][0]["finish_reason"] == "stop"
    assert httpx.get(f"{url}/health").status_code == 200
