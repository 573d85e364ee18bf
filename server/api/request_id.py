"""`X-Request-Id`: a client's id for its request, echoed on the response (a fresh one when absent).

As vLLM does, the id names the completion (`cmpl-<id>`, `chatcmpl-<id>`), so a client, a proxy's log and
the server's log can all be matched on it. It is checked before anything else runs: a header value is
free text, and it ends up in logs and response bodies. Clients may reuse ids (retries, fan-out), so the
engine's sequence ids add a unique suffix to a client's id (see `request_ids`)."""

from __future__ import annotations

import re
import uuid

from fastapi import Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actserve.server.api.errors import error_response

HEADER = "X-Request-Id"
MAX_LENGTH = 128  # a UUID is 36 characters, a W3C traceparent 55
# visible ASCII only: no spaces, control characters (log injection) or non-ASCII
_VALID = re.compile(r"[\x21-\x7e]+")


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_request_id(value: str) -> str | None:
    """Why `value` is not an acceptable request id, or None when it is."""
    if not value:
        return f"{HEADER}: must not be empty"
    if len(value) > MAX_LENGTH:
        return f"{HEADER}: at most {MAX_LENGTH} characters; got {len(value)}"
    if not _VALID.fullmatch(value):
        return f"{HEADER}: only visible ASCII characters (0x21-0x7E, no spaces) are allowed"
    return None


class RequestIdMiddleware:
    """Validates the client's `X-Request-Id` (400 naming the header), puts the id (the client's, or a
    new one) in `request.state.request_id`, and sets it on every response, streamed or not. Pure ASGI,
    like the other middleware (see APIKeyMiddleware in app.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).getlist(HEADER)
        problem = None
        if len(given) > 1:
            problem = f"{HEADER}: give one value; got {len(given)} headers"
        elif given:
            problem = check_request_id(given[0])
        rid = given[0] if given and problem is None else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"], state["request_id_given"] = rid, bool(given) and problem is None

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        if problem is not None:
            await error_response(400, problem, HEADER, "invalid_request_id")(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)


def request_ids(raw: Request | None, prefix: str) -> tuple[str, str]:
    """The completion's `id` (`<prefix>-<request id>`) and the prefix of its engine sequence ids: the
    same, made unique when the client chose the id (two live requests with one id would otherwise share
    sequence ids in the engine)."""
    state = raw.state if raw is not None else None
    rid = f"{prefix}-{getattr(state, 'request_id', None) or new_request_id()}"
    given = getattr(state, "request_id_given", False)
    return rid, f"{rid}-{uuid.uuid4().hex[:8]}" if given else rid
