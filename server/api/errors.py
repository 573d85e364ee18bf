"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the status codes of
DESIGN.md §5; FastAPI's 422 becomes a 400 that names the offending field."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from actserve.interventions.base import InterventionCapacityError, InterventionError
from actserve.server.engine.engine_client import EngineDeadError, EngineRequestError
from actserve.server.engine.llm_engine import RequestRejected

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               409: "ConflictError", 413: "PayloadTooLargeError", 415: "UnsupportedMediaTypeError",
               429: "RateLimitError", 503: "ServiceUnavailableError", 500: "InternalServerError"}  # fmt: skip


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {
        "error": {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": param, "code": code}
    }
    return JSONResponse(body, status_code=status)


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
        text += f"; got {got!r}"
    return text, param or None


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
