"""Intervention plans prepared for a request go back to the engine when the request never reaches it:
the client hung up before its stream's first byte (Starlette then never starts the stream's body)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import start_server
from tests.engine_utils import wait_for


def call_with_gone_client(app: Any, body: bytes) -> None:
    """Run one POST /v1/completions through the ASGI app whose client is gone when the response starts."""
    msgs = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if msgs:
            return msgs.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("client gone")

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
    }  # fmt: skip

    async def go() -> None:
        with pytest.raises(Exception):  # noqa: B017 - Starlette's ClientDisconnect or the OSError itself
            await app(scope, receive, send)

    asyncio.run(go())


def test_stream_that_never_starts_gives_its_steering_slots_back(tinystories_dir: Path) -> None:
    server = start_server(tinystories_dir, num_kv_blocks=64, engine_process="off")
    try:
        app = server.server.config.app
        steering = app.state.actserve.engine.engine.registry.plugins["steering"]
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        vectors = [{"directions": {"1": [0.1] * 128}, "scale": 2.0}, {"directions": {"0": [0.2] * 128}}]
        req = {"model": model, "prompt": "Once upon a time", "max_tokens": 4, "stream": True, "n": 2,
               "interventions": {"steering": {"vectors": vectors}}}  # fmt: skip
        free = len(steering._free)
        for _ in range(3):
            call_with_gone_client(app, json.dumps(req).encode())
        assert len(steering._free) == free, "slots taken by requests that never started were not given back"
        # a request that runs gives its slots back when it finishes (the engine does)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=req, timeout=60) as r:
            assert r.status_code == 200
            assert [line for line in r.iter_lines() if line.startswith("data: {")]
        assert wait_for(lambda: len(steering._free) == free)
    finally:
        server.stop()
