"""The steering vector library over HTTP: list, get (JSON or a file download), create, delete.

`POST /v1/steering/vectors` takes, by Content-Type:
- `application/json`: `{"name", "directions": {"L": [...]}, "model_hint"?, "metadata"?, "replace"?}` or
  `{"name", "combine": [{"name": "a", "scale": 1.0}, ...]}` (the sum of scaled stored vectors);
- `application/octet-stream`: the bytes of a .safetensors or .gguf control-vector file (format told by
  its header, not its name), with `?name=` (else the name stored in the file) and `?replace=true`.
  Raw bytes rather than multipart, so curl's `--data-binary @file` works with no extra dependency.
Bodies over 64 MiB get a 413. Parsing and file IO run off the event loop: in a worker thread, or in the
engine process (process mode), which holds the library. Files the parsers cannot read are 400s naming
what is wrong (`formats.VectorFormatError`), never a 5xx.

`GET /v1/steering/vectors` pages (`?limit=` 1-1000, default 100; `?after=<last name of the previous
page>`) and leaves out each vector's `metadata` (up to 64 KiB each): `GET /v1/steering/vectors/{name}`
has it all. So a list answer stays well under a megabyte however many vectors are stored.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import from_json
from starlette.concurrency import run_in_threadpool

from actserve.interventions.steering.formats import VectorFormatError, cut, read_vector
from actserve.interventions.steering.library import (
    LibraryError,
    StoredVector,
    VectorLibrary,
    check_metadata,
)
from actserve.interventions.steering.plugin import library_call
from actserve.interventions.steering.schema import check_directions_size, layer_index
from actserve.server.api.errors import APIError
from actserve.server.api.steering_train_route import train_route
from actserve.server.contract import InterventionError, ModelInfo
from actserve.server.engine.engine_client import EngineClient

MAX_UPLOAD_BYTES = 64 * 2**20
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 100, 1000
router = APIRouter(prefix="/v1/steering/vectors", tags=["steering"])

# POST /v1/steering/vectors/train: training from examples (server/api/steering_train_route.py) stores its
# result in the same library. No other POST route takes a path parameter, so it cannot clash.
router.add_api_route("/train", train_route, methods=["POST"])


class CombineTerm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    scale: float = Field(1.0, allow_inf_nan=False)


class CreateVector(BaseModel):
    """JSON body of POST /v1/steering/vectors: give exactly one of `directions` and `combine`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    directions: dict[str, list[float]] | None = None
    combine: list[CombineTerm] | None = Field(None, min_length=1, max_length=64)
    model_hint: str | None = None
    metadata: dict[str, str] | None = None
    replace: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> CreateVector:
        if (self.directions is None) == (self.combine is None):
            raise ValueError("give exactly one of 'directions' and 'combine'")
        return self


def engine(request: Request) -> EngineClient:
    return request.app.state.actserve.ready()


def _api_error(e: Exception, file_param: str | None = None) -> APIError:
    if isinstance(e, VectorFormatError):
        return APIError(400, f"file: {e}", file_param or "file")
    assert isinstance(e, LibraryError)
    return APIError(e.status, str(e), e.param)


async def _guarded(request: Request, fn: Any, *args: Any) -> Any:
    """fn(library, *args) off the event loop (a worker thread, or the engine process that holds the
    library); its errors become OpenAI-shaped 4xx."""
    try:
        return await engine(request).plugin_call("steering", library_call, fn, *args)
    except (LibraryError, VectorFormatError) as e:
        raise _api_error(e) from None


def _page(lib: VectorLibrary, limit: int, after: str | None) -> dict[str, Any]:
    vectors, more = lib.page(limit, after)
    return {
        "object": "list",
        "data": [v.summary(metadata=False) for v in vectors],
        "first_id": vectors[0].name if vectors else None,
        "last_id": vectors[-1].name if vectors else None,
        "has_more": more,
    }


def _get(lib: VectorLibrary, name: str) -> StoredVector:
    return lib.get(name)


def _delete(lib: VectorLibrary, name: str) -> StoredVector:
    return lib.delete(name)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise APIError(413, f"request body is {int(declared)} bytes; the limit is {MAX_UPLOAD_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_UPLOAD_BYTES:
            raise APIError(413, f"request body exceeds the limit of {MAX_UPLOAD_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _directions(raw: dict[str, list[float]]) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for key, values in raw.items():
        layer = layer_index(key)
        if layer is None:
            raise APIError(400, f"directions.{key}: layer keys are integers", f"directions.{key}")
        out[layer] = torch.tensor(values, dtype=torch.float64)
    return out


def _parse_create(raw: bytes, info: ModelInfo) -> CreateVector:
    """The JSON body, refused by its sizes (layer keys, direction lengths, metadata) before the schema
    validates every number: cost bounded by what the model allows, not by what was sent."""
    try:
        obj = from_json(raw or b"null")  # nesting-limited, unlike json.loads
    except ValueError as e:
        raise APIError(400, f"body: not valid JSON ({cut(str(e))})") from None
    try:
        if isinstance(obj, dict) and isinstance(obj.get("directions"), dict):
            check_directions_size(obj["directions"], "directions", info.num_layers, info.hidden_size)
    except InterventionError as e:
        raise APIError(400, str(e), e.param) from None
    try:
        body = CreateVector.model_validate(obj)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    try:
        check_metadata(body.metadata, body.model_hint)
    except LibraryError as e:
        raise APIError(e.status, str(e), e.param) from None
    return body


def _create_from_json(lib: VectorLibrary, body: CreateVector) -> StoredVector:
    if body.combine is not None:
        vec = lib.combine(body.name, [(t.name, t.scale) for t in body.combine])
    else:
        assert body.directions is not None
        vec = lib.build(body.name, _directions(body.directions), body.model_hint, body.metadata)
    return lib.add(vec, replace=body.replace)


def _create_from_file(lib: VectorLibrary, data: bytes, name: str | None, replace: bool) -> StoredVector:
    return lib.add(lib.from_file(read_vector(data), name), replace=replace)


def _list_limit(raw: str | None) -> int:
    """`?limit=`: 1-1000 (default 100); anything else is a 400 naming the range."""
    if raw is None:
        return LIST_LIMIT_DEFAULT
    if raw.isascii() and raw.isdigit() and len(raw) <= 4 and 1 <= int(raw) <= LIST_LIMIT_MAX:
        return int(raw)
    message = f"limit: an integer in [1, {LIST_LIMIT_MAX}] (default {LIST_LIMIT_DEFAULT}); got {raw!r}"
    raise APIError(400, cut(message), "limit")


@router.get("")
async def list_vectors(
    request: Request, limit: str | None = None, after: str | None = None
) -> dict[str, Any]:
    """One page of stored vectors in name order, without their metadata."""
    return await _guarded(request, _page, _list_limit(limit), after)


@router.get("/{name}")
async def get_vector(
    request: Request, name: str, format: Literal["json", "safetensors", "gguf"] = "json"
) -> Any:
    vec: StoredVector = await _guarded(request, _get, name)
    if format == "json":
        directions = {str(k): d.tolist() for k, d in sorted(vec.directions.items())}
        return {**vec.summary(), "directions": directions}
    data = await run_in_threadpool(vec.to_bytes, format)
    headers = {"Content-Disposition": f'attachment; filename="{vec.name}.{format}"'}
    if format == "gguf" and 0 in vec.directions:
        headers["X-Actserve-Warning"] = "llama.cpp refuses direction.0 (it cannot steer layer 0's output)"
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.post("")
async def create_vector(request: Request, name: str | None = None, replace: bool = False) -> dict[str, Any]:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind == "application/octet-stream":
        data = await _read_body(request)
        if not data:
            raise APIError(400, "file: the request body is empty; send the bytes of a vector file", "file")
        vec = await _guarded(request, _create_from_file, data, name, replace)
    elif kind in ("application/json", ""):
        raw = await _read_body(request)
        body = await run_in_threadpool(_parse_create, raw, engine(request).model_info)
        vec = await _guarded(request, _create_from_json, body)
    else:
        raise APIError(
            415,
            f"Content-Type {kind!r} is not accepted: send JSON (application/json) or the raw bytes of a "
            ".safetensors/.gguf file (application/octet-stream, name in ?name=)",
        )
    return vec.summary()


@router.delete("/{name}")
async def delete_vector(request: Request, name: str) -> dict[str, Any]:
    vec: StoredVector = await _guarded(request, _delete, name)
    return {"object": "steering.vector.deleted", "name": vec.name, "deleted": True}
