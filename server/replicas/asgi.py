"""The actserve app called in-process, one HTTP request at a time, its response streamed back as it is
sent: the first item is (status, headers), then body chunks. A replica answers the ingress this way
(Ray Serve streams a generator's items between processes), so SSE streams stay streams. When the caller
stops reading (its client went away, or Ray cancelled the call) the app receives `http.disconnect`,
which aborts the request in the engine as a hung-up HTTP client would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from actserve.server.replicas.routing import ForwardedRequest

_DONE = object()
_running: set[asyncio.Task[None]] = set()  # apps still finishing after their caller left


async def call_app(
    app: Any, req: ForwardedRequest, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]] | bytes]:
    """Run `app` (ASGI) on `req`: yields (status, headers) once, then the body's non-empty chunks.
    `extra_headers` are added to the response's (e.g. which replica answered)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": req.path,
        "raw_path": req.path.encode(),
        "query_string": req.query,
        "root_path": "",
        "headers": req.headers,
        "client": req.client,
        "server": None,
        "state": {},
    }

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await queue.put(_DONE)

    task = asyncio.create_task(run())
    _running.add(task)
    task.add_done_callback(_running.discard)
    try:
        while True:
            msg = await queue.get()
            if msg is _DONE:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                return
            if msg["type"] == "http.response.start":
                yield msg["status"], [*msg.get("headers", []), *(extra_headers or [])]
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body", False):
                    return
    finally:
        gone.set()  # the response is over, or its reader left: the app sees a disconnect either way
