"""Optional CORS (`--allowed-origins`), off by default: browsers on other origins may call the API only
when the operator lists them. Starlette's CORSMiddleware does the work; the flags are vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from actserve.server.api.request_id import HEADER as REQUEST_ID_HEADER


@dataclass(frozen=True)
class CORSConfig:
    """Origins allowed to call the API from a browser ("*": any); methods and headers default to all."""

    origins: list[str]
    methods: list[str] = field(default_factory=lambda: ["*"])
    headers: list[str] = field(default_factory=lambda: ["*"])
    credentials: bool = False


def install_cors(app: FastAPI, cors: CORSConfig) -> None:
    """Outermost of the app's middleware, so a preflight (no Authorization header) is answered before
    the API-key check, and error responses (401, 413, ...) carry the CORS headers a browser needs to
    read them. `X-Request-Id` is exposed to scripts."""
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors.origins,
        allow_methods=cors.methods,
        allow_headers=cors.headers,
        allow_credentials=cors.credentials,
        expose_headers=[REQUEST_ID_HEADER],
    )
