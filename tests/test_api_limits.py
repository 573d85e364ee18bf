"""Size limits checked before parsing (body bytes, JSON depth, prompt characters) on a live server, and
that large tokenizer work stays off the event loop (a concurrent /health answers)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actserve.server.api.limits import MAX_JSON_DEPTH, json_depth
from tests.conftest import ENGINE_MODES, LiveServer
from tests.test_api_errors import assert_openai_error, assert_still_serving

LIMIT = 4 * 2**20  # --max-request-bytes of the test server


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def server(tinystories_dir: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    from actserve.server.api.app import create_app
    from actserve.server.engine.async_engine import make_engine
    from actserve.server.engine.config import EngineConfig

    config = EngineConfig(
        model=str(tinystories_dir), num_kv_blocks=64, engine_process=ENGINE_MODES[request.param]
    )
    live = LiveServer(create_app(load=lambda: make_engine(config), max_request_bytes=LIMIT))
    yield live
    live.stop()


def test_body_over_the_limit_is_413_from_content_length(server: LiveServer) -> None:
    body = b'{"prompt": "' + b"x" * LIMIT + b'"}'
    for route in ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]:
        r = httpx.post(f"{server.url}{route}", content=body, headers={"content-type": "application/json"})
        err = assert_openai_error(r, 413)
        assert err["type"] == "PayloadTooLargeError" and str(LIMIT) in err["message"]
    assert_still_serving(server.url)


def test_chunked_body_over_the_limit_is_413_while_streaming(server: LiveServer) -> None:
    """No Content-Length: the body is counted as it arrives and refused once past the limit."""
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(64):  # 16 MiB offered; the server stops reading after 4 MiB
            sent += 2**18
            yield b"x" * 2**18
        yield b'"}'

    try:
        r = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
    except httpx.HTTPError:  # the server may close the connection while the client is still sending
        pass
    else:
        err = assert_openai_error(r, 413)
        assert "more than that" in err["message"]
    assert_still_serving(server.url)


def test_body_within_the_limit_is_parsed(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Once " * 100_000})  # ~500 KB
    assert r.status_code == 200 and r.json()["count"] > 100_000


def test_vector_uploads_keep_their_own_larger_cap(server: LiveServer) -> None:
    """The vector-file route allows 64 MiB (its own check); a file over --max-request-bytes reaches it."""
    r = httpx.post(
        f"{server.url}/v1/steering/vectors?name=big",
        content=b"\0" * (LIMIT + 1024),
        headers={"content-type": "application/octet-stream"},
    )
    assert_openai_error(r, 400, "file")  # not a vector file, but not a 413 either


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 50_000])
def test_deep_json_is_a_400_before_parsing(server: LiveServer, depth: int) -> None:
    for inner in ("[" * depth + "]" * depth, '{"a": ' * depth + "1" + "}" * depth):
        body = '{"model": "tinystories-656k", "prompt": "x", "interventions": ' + inner + "}"
        r = httpx.post(
            f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        err = assert_openai_error(r, 400)
        assert f"deeper than {MAX_JSON_DEPTH}" in err["message"]
    assert_still_serving(server.url)


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth(b'{"prompt": "' + b"[" * 1000 + b'"}') <= 1
    assert json_depth(b'{"a": "\\"' + b"[" * 40 + b'", "b": [[1]]}') == 3  # an escaped quote in a string
    assert json_depth(b"[" * 40 + b"]" * 40) == 40
    assert json_depth(b'[{"x": "]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"}' + b",[" * 40 + b"]" * 41) == 41


def test_prompt_too_long_by_its_characters_is_refused_untokenized(server: LiveServer) -> None:
    """2M characters cannot fit 512 tokens: a 400 at once, while /health keeps answering."""

    async def main() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            big = asyncio.create_task(client.post("/v1/completions", json={"prompt": "ab " * 700_000}))
            await asyncio.sleep(0)
            t0 = time.monotonic()
            health = await client.get("/health")
            took = time.monotonic() - t0
            assert health.status_code == 200
            return await big, took

    r, took = asyncio.run(main())
    err = assert_openai_error(r, 400, "prompt")
    assert "2100000 characters" in err["message"] and "512" in err["message"]
    assert took < 1.0
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["Once", "ab " * 700_000]}, timeout=30)
    assert_openai_error(r, 400, "prompt[1]")


def test_large_tokenize_runs_off_the_event_loop(server: LiveServer) -> None:
    """/tokenize has no context bound (it counts tokens); 3M characters take seconds to tokenize, in a
    worker thread: /health answers while that request is still in flight."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            big = asyncio.create_task(client.post("/tokenize", json={"prompt": "hello world " * 250_000}))
            await asyncio.sleep(0.3)  # the body is sent and tokenization has started
            t0 = time.monotonic()
            health = await client.get("/health")
            took = time.monotonic() - t0
            assert health.status_code == 200
            assert not big.done(), "tokenization finished before /health was asked: nothing measured"
            assert took < 1.0, f"/health took {took:.2f} s while /tokenize ran"
            r = await big
            assert r.status_code == 200 and r.json()["count"] > 250_000

    asyncio.run(main())


def test_thread_mode_prepares_interventions_off_the_event_loop(server: LiveServer) -> None:
    """Validating an intervention spec (up to 8 vectors x layers x hidden_size floats, n copies) runs in a
    worker thread, not on the server's event loop thread."""
    state = server.server.config.app.state.actserve  # type: ignore[union-attr]
    registry = getattr(getattr(state.engine, "engine", None), "registry", None)
    if registry is None:
        pytest.skip("process mode: plans are prepared in the engine process")
    threads: list[int] = []
    original = registry.prepare_many

    def recording(*args: object) -> object:
        threads.append(threading.get_ident())
        return original(*args)

    registry.prepare_many = recording
    try:
        vectors = [{"directions": {"1": [0.01] * 128}, "scale": 1.0}]
        body = {
            "prompt": "Once",
            "max_tokens": 2,
            "n": 2,
            "interventions": {"steering": {"vectors": vectors}},
        }
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        del registry.prepare_many
    assert threads and server.thread.ident not in threads
