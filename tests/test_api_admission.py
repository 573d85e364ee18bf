"""Admission under a burst (`--max-waiting`): the API counts sequences from admission until they run, so
a burst of streamed and non-streamed requests is held to max_num_seqs + max_waiting at once; the rest
get 429 with Retry-After, and the server serves normally afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ENGINE_MODES, LiveServer
from tests.test_api_errors import assert_openai_error, assert_still_serving

MAX_NUM_SEQS, MAX_WAITING, BURST = 4, 8, 200


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def server(tinystories_dir: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    from actserve.server.api.app import create_app
    from actserve.server.engine.async_engine import make_engine
    from actserve.server.engine.config import EngineConfig

    config = EngineConfig(
        model=str(tinystories_dir),
        num_kv_blocks=128,
        max_num_seqs=MAX_NUM_SEQS,
        engine_process=ENGINE_MODES[request.param],
    )
    live = LiveServer(create_app(load=lambda: make_engine(config), max_waiting=MAX_WAITING))
    yield live
    live.stop()


async def _one(client: httpx.AsyncClient, i: int) -> tuple[int, float, float, dict[str, str]]:
    """(status, time the status was known, time the request ended, headers); odd i are streamed."""
    body = {"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "stream": i % 2 == 1}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        decided = time.monotonic()
        await r.aread()
        return r.status_code, decided, time.monotonic(), dict(r.headers)


def test_burst_is_held_to_the_queue_limit(server: LiveServer) -> None:
    async def main() -> list[tuple[int, float, float, dict[str, str]]]:
        limits = httpx.Limits(max_connections=BURST)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_one(client, i) for i in range(BURST)))

    results = asyncio.run(main())
    statuses = sorted({s for s, *_ in results})
    assert set(statuses) <= {200, 429}, statuses
    refused = [(d, h) for s, d, _, h in results if s == 429]
    accepted = [(d, e) for s, d, e, _ in results if s == 200]
    assert refused and accepted
    assert all(h.get("retry-after") == "1" for _, h in refused)
    # every decision is taken at arrival; until the last one, a slot frees only when an accepted request
    # ends, so accepted <= running + waiting + those that ended during the burst (+ a little slack for
    # responses still in transit when the last 429 was written)
    burst_end = max(d for d, _ in refused)
    ended = sum(1 for _, e in accepted if e < burst_end)
    assert len(accepted) <= MAX_NUM_SEQS + MAX_WAITING + ended + 2, (len(accepted), ended)
    assert_still_serving(server.url)


def test_429_body_and_a_request_that_can_never_fit(server: LiveServer) -> None:
    """prompts x n above --max-waiting can never be admitted: a 400 naming the field, not a 429."""
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "n": MAX_WAITING + 1})
    err = assert_openai_error(r, 400, "n")
    assert "--max-waiting" in err["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["x"] * (MAX_WAITING + 1)})
    assert_openai_error(r, 400, "prompt")
    body: dict[str, Any] = {"prompt": ["Once"] * 2, "n": MAX_WAITING // 2, "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200


def test_admission_counts_are_given_back(server: LiveServer) -> None:
    """After the burst, errors and disconnects, nothing stays reserved: max_waiting sequences fit again."""
    state = server.server.config.app.state.actserve  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while state.admission.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.admission.pending == 0
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"prompt": "x", "stream": True}) as r:
        assert r.status_code == 200  # leave before reading: the stream's share must come back too
    bad = {"prompt": "x", "stop_token_ids": [99999]}
    assert httpx.post(f"{server.url}/v1/completions", json=bad).status_code == 400
    deadline = time.monotonic() + 30
    while state.admission.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.admission.pending == 0
    body = {"prompt": "Once", "n": MAX_WAITING, "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
