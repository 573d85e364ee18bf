"""The Ray Serve application: an ingress deployment (the OpenAI endpoint) in front of N engine replicas.

The ingress reads each request's body, computes its affinity keys (routing.py) and hands it to the
engine deployment through a handle whose request router (router.py) picks the replica; the replica runs
the actserve app in-process (asgi.py) and streams the response back. Every API route of `actserve serve`
works unchanged, answered by one replica. A replica that dies under a request answers it with a 503
"retry" (an SSE stream already under way gets an error event and [DONE]); Ray Serve starts a
replacement. Named steering vectors are shared through `--steering-vectors DIR` on a shared folder:
every replica re-reads the folder when it changes (interventions/steering/library.py).

`app_builder` is the import path for Ray Serve config files and KubeRay (`deploy/ray/`); `run` is
`actserve serve-ray`."""

# no `from __future__ import annotations`: Ray Serve's class-based FastAPI view reads the route's
# annotations at run time (a string "Request" would make FastAPI take `request` as a query parameter)
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from actserve.server.api.app import create_app
from actserve.server.api.errors import error_response, error_sse
from actserve.server.engine.async_engine import make_engine
from actserve.server.engine.config import EngineConfig
from actserve.server.replicas.asgi import call_app
from actserve.server.replicas.options import Deployment, from_builder_args
from actserve.server.replicas.router import AffinityRouter
from actserve.server.replicas.routing import ForwardedRequest, affinity_keys

log = logging.getLogger(__name__)
APP_NAME, ENGINE, INGRESS = "actserve", "EngineReplica", "Ingress"
REPLICA_HEADER = "x-actserve-replica"  # which replica answered (its Ray actor name)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
GONE = (RayActorError, ActorUnavailableError)


class EngineReplica:
    """One engine and the actserve app around it (loaded in the constructor: Ray Serve counts the
    replica as starting until the model is in)."""

    def __init__(self, config: EngineConfig, api: dict[str, Any]) -> None:
        self.app = create_app(engine=make_engine(config), **api)
        self.state = self.app.state.actserve
        name = ray.get_runtime_context().get_actor_name() or serve.get_replica_context().replica_id.unique_id
        self.name = name.encode()

    async def handle(self, req: ForwardedRequest) -> AsyncIterator[Any]:
        async for item in call_app(self.app, req, [(REPLICA_HEADER.encode(), self.name)]):
            yield item

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine died or stalled."""
        problem = self.state.problem()
        if problem is not None and problem[0] == "unhealthy":
            raise RuntimeError(problem[1])

    def __del__(self) -> None:
        engine = getattr(getattr(self, "state", None), "engine", None)
        if engine is not None:
            engine.shutdown()


ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # the replicas answer /docs too


def _gone(e: BaseException) -> Response:
    return error_response(503, f"the replica serving this request stopped ({type(e).__name__}); retry")


@serve.ingress(ingress_app)
class Ingress:
    """The endpoint: forwards every request to an engine replica chosen by the affinity router."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine.options(stream=True)

    @ingress_app.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, path: str, request: Request) -> Response:
        body = await request.body()
        req = ForwardedRequest(
            method=request.method,
            path=request.url.path,
            query=request.url.query.encode(),
            headers=[(k.lower(), v) for k, v in request.headers.raw],
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
            keys=affinity_keys(request.url.path, body),
        )
        stream = self.engine.handle.remote(req)
        try:
            status, headers = await stream.__anext__()
        except GONE as e:
            return _gone(e)
        except RayTaskError as e:
            log.error("engine replica failed on %s %s: %s", req.method, req.path, e)
            return error_response(500, f"the engine replica failed: {type(e.cause).__name__}")
        headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        is_sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            except GONE as e:
                if is_sse:
                    yield error_sse(
                        503, f"the replica serving this stream stopped ({type(e).__name__})"
                    ).encode()
                    yield b"data: [DONE]\n\n"

        response = StreamingResponse(rest(), status_code=status)
        response.raw_headers = headers
        return response


def build(dep: Deployment) -> Any:
    """The application (ingress bound to the engine deployment) for `serve.run`."""
    opts = dep.replicas
    if opts.min_replicas == opts.max_replicas:
        scaling: dict[str, Any] = {"num_replicas": opts.min_replicas}
    else:
        scaling = {"autoscaling_config": {
            "min_replicas": opts.min_replicas, "initial_replicas": opts.min_replicas,
            "max_replicas": opts.max_replicas, "target_ongoing_requests": opts.target_ongoing_requests,
        }}  # fmt: skip
    engine = serve.deployment(EngineReplica, name=ENGINE).options(
        ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": opts.gpus_per_replica(dep.engine)},
        max_ongoing_requests=opts.max_ongoing_requests,
        graceful_shutdown_timeout_s=opts.graceful_shutdown_s,
        request_router_config=RequestRouterConfig(
            request_router_class=AffinityRouter,
            request_router_kwargs={"affinity_slack": opts.affinity_slack},
        ),
        **scaling,
    )
    ingress = serve.deployment(Ingress, name=INGRESS).options(
        num_replicas=opts.ingress_replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000
    )
    return ingress.bind(engine.bind(dep.engine, dep.api))


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder (`import_path: actserve.server.replicas.app:app_builder`):
    `args` as `options.from_builder_args` reads them."""
    return build(from_builder_args(args))


def run(dep: Deployment, host: str, port: int, address: str | None) -> int:
    """`actserve serve-ray`: connect to (or start) a Ray cluster, serve until interrupted."""
    ray.init(address=address, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(dep), name=APP_NAME, route_prefix="/", blocking=True)
    return 0
