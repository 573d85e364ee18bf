"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the status codes of
docs/api.md "Errors"; FastAPI's 422 becomes a 400 that names the offending field."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actserve.server.contract import InterventionCapacityError, InterventionError
from actserve.server.engine.engine_client import EngineDeadError, EngineRequestError
from actserve.server.engine.outputs import RequestRejected

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               409: "ConflictError", 413: "PayloadTooLargeError", 415: "UnsupportedMediaTypeError",
               429: "RateLimitError", 503: "ServiceUnavailableError", 500: "InternalServerError"}  # fmt: skip
# Seconds a client should wait before retrying a 429 (queue full) or 503 (loading, slots in use): the
# queue drains at the engine's step rate, so a short fixed hint is as good as an estimate.
RETRY_AFTER_S = 1
log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _printable(text: str | None) -> str | None:
    """Text that always encodes as UTF-8 (messages and params may quote a client's invalid input)."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """OpenAI's error body; 429 and 503 carry `Retry-After` (seconds), as clients' retry logic expects."""
    body = {
        "error": {
            "message": _printable(message),
            "type": ERROR_TYPES.get(status, "Error"),
            "param": _printable(param),
            "code": code,
        }
    }
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def error_sse(status: int, message: str, param: str | None = None) -> str:
    """The same body as one SSE event, for failures after a stream has started."""
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "Error"),
            "param": param,
            "code": status,
        }
    }
    return f"data: {json.dumps(body)}\n\n"


def as_api_error(e: Exception) -> APIError | None:
    """Map engine and plugin exceptions to API errors; None for unexpected ones."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, (InterventionError, RequestRejected)):
        return APIError(400, str(e), e.param)
    if isinstance(e, InterventionCapacityError):
        return APIError(503, str(e), "interventions")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e))
    if isinstance(e, EngineRequestError):
        return APIError(500, str(e))
    return None


UNION_BRANCHES = ("str", "int", "float", "bool", "function-after")


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    err = errors[0]
    kind = err.get("type")
    raw_loc = [x for x in err.get("loc", ()) if x != "body"]
    if kind == "string_unicode" and not raw_loc:  # e.g. an object key with a lone surrogate
        return "request body: a key is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)", None
    if kind == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    # the body itself is missing, not JSON-decodable, or not an object (a model-level check has a
    # value_error at the root instead, and its message says what is wrong)
    if isinstance(err.get("input"), bytes) or (not raw_loc and kind != "value_error"):
        return "request body must be a JSON object (Content-Type: application/json)", None
    # drop pydantic's union-branch names (e.g. 'str', 'list[int]') from the path; list indices as [i]
    param = ""
    for x in raw_loc:
        if isinstance(x, int):
            param += f"[{x}]"
        elif not any(c in x for c in "[]") and x not in UNION_BRANCHES:
            param += f".{x}" if param else x
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    ctx = err.get("ctx") or {}
    bounds = ", ".join(
        f"{k} {v}" for k, v in ctx.items() if k in ("ge", "gt", "le", "lt", "min_length", "max_length")
    )
    got = err.get("input")
    text = f"{param}: {msg}" if param else msg
    if bounds:
        text += f" (allowed: {bounds})"
    if got is not None and not isinstance(got, (dict, list)):
        shown = repr(got)
        text += f"; got {shown[:80]}" + ("..." if len(shown) > 80 else "")
    return text, param or None


class InternalErrorMiddleware:
    """Last line of defence: an exception no handler mapped becomes OpenAI's 500 body (and a log entry
    with its traceback) instead of Starlette's plain-text "Internal Server Error". Pure ASGI, like the
    other middleware here (see APIKeyMiddleware on BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            rid = scope.get("state", {}).get("request_id")  # set by RequestIdMiddleware
            log.exception(
                "unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"), rid
            )
            if started:
                raise  # the status line is gone: let the server close the connection
            message = f"internal error ({type(e).__name__}); the server log has the details"
            await error_response(500, message)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(APIError)
    async def _api(_req: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = "route not found" if status == 404 else str(exc.detail)
        return error_response(status, message)

    async def _mapped(_req: Request, exc: Exception) -> JSONResponse:
        mapped = as_api_error(exc)
        assert mapped is not None
        return error_response(mapped.status, mapped.message, mapped.param)

    for cls in (
        InterventionError,
        RequestRejected,
        InterventionCapacityError,
        EngineDeadError,
        EngineRequestError,
    ):
        app.add_exception_handler(cls, _mapped)
