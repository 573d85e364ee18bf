"""The FastAPI app: OpenAI routes, health, metrics, tokenizer routes, interventions listing.

The engine loads in a background thread after the socket is open, so `/health` answers 503 while the
model loads and 200 once it serves. It answers 503 too once the engine has died or stalled, and while the
server drains for shutdown. A server that can never serve (the model failed to load, the engine died)
calls `ServerState.fatal` when `actserve serve` has set it: the process then exits non-zero
(server/serving.py), so a supervisor restarts it instead of /health reporting "loading" forever."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from actserve.server.api.admission import Admission, Reservation
from actserve.server.api.chat import ChatHandler, render_chat
from actserve.server.api.completions import CompletionHandler
from actserve.server.api.cors import CORSConfig, install_cors
from actserve.server.api.errors import (
    APIError,
    InternalErrorMiddleware,
    error_response,
    install_error_handlers,
)
from actserve.server.api.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimitMiddleware
from actserve.server.api.protocol import (
    MAX_SEQUENCES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_fields,
)
from actserve.server.api.request_id import RequestIdMiddleware
from actserve.server.api.steering_routes import MAX_UPLOAD_BYTES
from actserve.server.api.steering_routes import router as steering_router
from actserve.server.api.tokens import PromptEncoder
from actserve.server.engine.engine_client import EngineClient, EngineDeadError
from actserve.server.version import __version__

log = logging.getLogger(__name__)
# probes, metrics and the API description (the same for all three doc routes) need no key
OPEN_PATHS = {"/health", "/metrics", "/version", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def key_list(api_key: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The accepted keys: one string, several, or none (no auth); empty strings are not keys."""
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    return [k for k in keys if k]


EXIT_ENGINE_DIED = 1  # exit codes of `actserve serve` when it stops on its own (0: stopped by a signal)
EXIT_LOAD_FAILED = 3  # as uvicorn's own start-up failure


class ServerState:
    """Engine slot filled once loading finishes (or the load error that prevented it)."""

    def __init__(
        self, api_key: str | list[str] | None, max_waiting: int, served_names: list[str] | None = None
    ) -> None:
        self.engine: EngineClient | None = None
        self.aliases = list(served_names or [])  # --served-model-name: the engine serves the first
        self.load_error: BaseException | None = None
        self.api_keys = key_list(api_key)
        self.draining = False  # shutting down: new requests get 503, accepted ones finish
        self.fatal: Callable[[int, str], None] | None = None  # `actserve serve`: exit with this code
        self.max_waiting = max_waiting
        self.admission = Admission(max_waiting)
        self.started = time.time()
        self.completions: CompletionHandler | None = None
        self.chat: ChatHandler | None = None
        self.encoder: PromptEncoder | None = None

    def set_engine(self, engine: EngineClient) -> None:
        name = engine.model_name
        self.encoder = PromptEncoder(engine.tokenizer, engine.max_model_len)
        self.completions = CompletionHandler(engine, name, self.encoder)
        self.chat = ChatHandler(engine, name, self.encoder)
        self.engine = engine
        engine.on_fatal = self.engine_died
        if engine.error is not None:  # died before it was handed over
            self.engine_died(f"engine stopped: {engine.error}")

    def engine_died(self, why: str) -> None:
        if self.fatal is not None:
            self.fatal(EXIT_ENGINE_DIED, why)

    def load_failed(self, error: BaseException) -> None:
        self.load_error = error
        if self.fatal is not None:
            self.fatal(EXIT_LOAD_FAILED, f"model failed to load: {type(error).__name__}: {error}")

    def problem(self) -> tuple[str, str] | None:
        """(status, why) when the server cannot take requests now, else None."""
        if self.draining:
            return "shutting down", "server is shutting down"
        if self.engine is None:
            if self.load_error is not None:
                return "unhealthy", f"model failed to load: {self.load_error}"
            return "loading", "model is loading"
        why = self.engine.health_problem()
        return ("unhealthy", why) if why is not None else None

    def ready(self) -> EngineClient:
        problem = self.problem()
        if problem is not None:
            raise APIError(503, problem[1])
        assert self.engine is not None
        return self.engine

    def model_names(self) -> list[str]:
        """Every name the model answers to, the engine's (reported when a request names none) first."""
        first = self.ready().model_name
        return [first, *(a for a in dict.fromkeys(self.aliases) if a != first)]

    def check_model(self, model: str | None) -> None:
        names = self.model_names()
        if model is not None and model not in names:
            served = ", ".join(repr(n) for n in names)
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {served}",
                "model",
                "model_not_found",
            )

    def check_load(self, count: int, param: str) -> Reservation:
        """Admit a request of `count` sequences (prompts x n) against `--max-waiting` (see admission.py);
        the caller gives the reservation back when the request ends."""
        self.ready()
        if count > MAX_SEQUENCES:
            raise APIError(
                400, f"{param}: prompts x n is {count}; at most {MAX_SEQUENCES} per request", param
            )
        return self.admission.reserve(count, param)


class APIKeyMiddleware:
    """Bearer-token check as plain ASGI middleware.

    Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps `receive`, after which
    `Request.is_disconnected()` never reports a client that hung up, so a non-streamed request kept
    generating to the end after its client had gone."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.state.api_keys
        if keys and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = Headers(scope=scope).get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not key_matches(token, keys):
                message = "missing or invalid API key (Authorization: Bearer ...)"
                await error_response(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def key_matches(token: str, keys: list[str]) -> bool:
    """Constant-time compare against every key (no early exit, so timing does not tell which key or
    how many matched)."""
    given = token.encode("utf-8", "surrogatepass")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode("utf-8", "surrogatepass"))
    return found


def create_app(
    engine: EngineClient | None = None,
    load: Callable[[], EngineClient] | None = None,
    api_key: str | list[str] | None = None,
    max_waiting: int = 4096,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    served_names: list[str] | None = None,
    cors: CORSConfig | None = None,
) -> FastAPI:
    """Pass a ready engine, or a loader that runs in a thread when the app starts. `api_key` is one key
    or a list of accepted keys; `max_request_bytes` caps request bodies (413 beyond it); `served_names`
    are more names the model answers to (the engine's own name stays the first); `cors` turns CORS on."""
    app = FastAPI(title="actserve", version=__version__)
    state = ServerState(api_key, max_waiting, served_names)
    app.state.actserve = state
    install_error_handlers(app)
    if engine is not None:
        state.set_engine(engine)

    @app.on_event("startup")
    async def _start() -> None:
        if state.engine is None and load is not None:

            def run() -> None:
                try:
                    state.set_engine(load())
                    log.info("model loaded; serving")
                except BaseException as e:  # noqa: BLE001 - reported by /health, and fatal under the CLI
                    log.exception("model failed to load")
                    state.load_failed(e)

            threading.Thread(target=run, name="actserve-load", daemon=True).start()

    @app.on_event("shutdown")
    async def _stop() -> None:
        if state.engine is not None:
            state.engine.shutdown()

    # outermost last: CORS -> request id -> errors -> API key (before reading any body) -> body limits
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes,
                       path_limits={"/v1/steering/vectors": MAX_UPLOAD_BYTES})  # fmt: skip
    app.add_middleware(APIKeyMiddleware, state=state)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(RequestIdMiddleware)
    if cors is not None:
        install_cors(app, cors)

    @app.get("/health")
    async def health() -> Response:
        problem = state.problem()
        if problem is None:
            return Response(status_code=200)
        status, why = problem
        return JSONResponse({"status": status, "error": "" if status == "loading" else why}, status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.engine is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        try:
            body = await state.engine.metrics_text()  # process mode: fetched from the engine process
        except EngineDeadError:
            return Response(b"", status_code=503, media_type=CONTENT_TYPE_LATEST)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict[str, Any]:
        info = state.ready().model_info
        return {
            "id": name,
            "object": "model",
            "created": int(state.started),
            "owned_by": "actserve",
            "root": info.path,
            "max_model_len": info.max_model_len,
            "architecture": info.architecture,
            "implementation": info.implementation,
            "fallback_reason": info.fallback_reason,
            "dtype": str(info.dtype).removeprefix("torch."),
            "device": str(info.device),
            "tensor_parallel_size": info.tensor_parallel_size,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in state.model_names()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        state.check_model(model)
        return model_card(model)

    @app.get("/v1/interventions")
    async def interventions() -> dict[str, Any]:
        return {"object": "list", "data": state.ready().describe_interventions()}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        state.check_model(req.model)
        check_fields(req)
        count = req.num_prompts() * req.n
        admitted = state.check_load(count, "n" if req.n > 1 else "prompt")
        assert state.completions is not None
        return await state.completions(req, raw, admitted)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request) -> Any:
        state.check_model(req.model)
        check_fields(req)
        admitted = state.check_load(req.n, "n")
        assert state.chat is not None
        return await state.chat(req, raw, admitted)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        """Token ids of any text (no context-length bound: this route counts tokens), tokenized in a
        worker thread when large."""
        state.check_model(req.model)
        check_fields(req)
        eng, encoder = state.ready(), state.encoder
        assert encoder is not None
        if req.messages is not None:
            ids = await render_chat(encoder, req.messages, req.add_generation_prompt, bounded=False)
        else:
            assert req.prompt is not None
            ids = await encoder.encode_unbounded(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": eng.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        """Text of at most max_model_len ids (more can never come from one request), decoded in a
        worker thread."""
        state.check_model(req.model)
        check_fields(req)
        eng = state.ready()
        vocab, cap = eng.model_info.vocab_size, eng.max_model_len
        if len(req.tokens) > cap:
            raise APIError(400, f"tokens: at most {cap} ids (max_model_len); got {len(req.tokens)}", "tokens")
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: ids must be in [0, {vocab - 1}]; got {bad[0]}", "tokens")
        return {"prompt": await run_in_threadpool(eng.tokenizer.decode, req.tokens)}

    app.include_router(steering_router)
    return app
