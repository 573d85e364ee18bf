"""Request-size limits applied before any parsing: body bytes (413) and JSON nesting depth (400).

One pure ASGI middleware reads the body itself, counting bytes as they arrive, so an oversized body is
refused from its Content-Length or, for a chunked upload, as soon as the count passes the limit: nothing
past the limit is ever buffered, and no JSON parser sees it. The body it read is then handed to the app
as one message; later `receive` calls go to the server, so the app still sees a client disconnect."""

from __future__ import annotations

import re

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actserve.server.api.errors import error_response

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32
# a JSON string, escapes included (the unrolled form: linear time, no backtracking blow-up)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OFF_LOOP_BYTES = 1 << 20  # bodies larger than this are depth-checked in a worker thread


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects in a JSON text, without parsing it (Python's parser, and
    pydantic after it, recurse once per level: 50k levels would be a RecursionError). Brackets inside
    strings do not count. Linear time in C (a regex, `bytes.translate`, numpy), no Python loop."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return body.count(b"[") + body.count(b"{")  # an upper bound, already within the limit
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _is_json(headers: Headers) -> bool:
    """FastAPI parses a body as JSON when its Content-Type says JSON or is missing."""
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    return not kind or kind == "application/json" or kind.endswith("+json")


class BodyLimitMiddleware:
    """413 for a body over `max_bytes` (`--max-request-bytes`), 400 for JSON nested deeper than
    `MAX_JSON_DEPTH`. `path_limits` raises the byte limit for routes that take larger bodies (the
    steering-vector upload, which enforces its own cap)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = max(self.max_bytes, self.path_limits.get(scope["path"], 0))
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send, limit, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, receive, send, limit, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(headers):
            depth = await run_in_threadpool(json_depth, body) if size > _OFF_LOOP_BYTES else json_depth(body)
            if depth > MAX_JSON_DEPTH:
                message_text = f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels"
                await error_response(400, message_text)(scope, receive, send)
                return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int, size: int | None) -> None:
        got = f"{size} bytes" if size is not None else "more than that"
        message = f"request body too large: the limit is {limit} bytes (--max-request-bytes); got {got}"
        await error_response(413, message)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the body read already, then whatever the server sends (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
