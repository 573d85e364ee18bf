"""Sync and async HTTP clients for actserve, over httpx.

They cover what the `openai` SDK does not: typed interventions, `/tokenize`, `/metrics`,
`/v1/interventions`, `/health`. Request bodies and response parsing are shared plain functions, so the
two clients differ only in how they wait for the network.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import quote, urlencode

import httpx
from prometheus_client.parser import text_string_to_metric_families

from actserve.clients.interventions import InterventionsLike, SteeringLike, build_interventions, vector_body
from actserve.clients.training import TrainVector

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_TIMEOUT = 600.0
Prompt = str | list[str] | list[int] | list[list[int]]
Messages = list[dict[str, Any]]


class Options(TypedDict, total=False):
    """Keyword options of the generation methods: OpenAI's and vLLM's request fields (see docs/api.md)
    plus typed interventions. Listed for type checkers; the server validates every value."""

    model: str
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int
    stop: str | list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    min_tokens: int
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    stream_options: dict[str, Any]
    user: str
    echo: bool
    logprobs: int | bool
    top_logprobs: int
    max_completion_tokens: int
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any]
    steering: SteeringLike
    interventions: InterventionsLike


class ActServeError(Exception):
    """A non-2xx answer (or an in-stream error event), with the fields of the server's OpenAI error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str | None = None, code: Any = None
    ) -> None:
        super().__init__(f"{status} {type or 'Error'}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    @classmethod
    def from_body(cls, status: int, body: Any, text: str = "") -> ActServeError:
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):  # not ours (a proxy, or /health's body): keep the raw text
            return cls(status, text or str(body))
        return cls(status, str(err.get("message", "")), err.get("param"), err.get("type"), err.get("code"))


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (prompt_tokens_details)

    @classmethod
    def from_json(cls, u: dict[str, Any]) -> Usage:
        """The fields this client knows; others (a newer server's) are ignored, not an error."""
        details = u.get("prompt_tokens_details") or {}
        return cls(
            int(u.get("prompt_tokens", 0)),
            int(u.get("completion_tokens", 0)),
            int(u.get("total_tokens", 0)),
            int(details.get("cached_tokens", 0)),
        )


@dataclass
class Choice:
    """One choice; `text` is the completion text, or the assistant message content for chat."""

    index: int
    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: Any = None
    message: dict[str, Any] | None = None


@dataclass
class Completion:
    """A parsed /v1/completions or /v1/chat/completions response; `raw` keeps the full JSON."""

    id: str
    model: str
    choices: list[Choice]
    usage: Usage | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def text(self) -> str:
        """The first choice's text: the common n=1 case."""
        return self.choices[0].text


def parse_completion(body: dict[str, Any]) -> Completion:
    choices = []
    for c in body.get("choices", []):
        msg = c.get("message")
        text = c.get("text") if msg is None else (msg.get("content") or "")
        choices.append(
            Choice(
                c["index"], text or "", c.get("finish_reason"), c.get("stop_reason"), c.get("logprobs"), msg
            )
        )
    u = body.get("usage")
    usage = Usage.from_json(u) if u else None
    return Completion(body.get("id", ""), body.get("model", ""), choices, usage, body)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value}.

    Each sample appears under `name{label="v",...}` (labels sorted); the bare `name` holds the sum over
    its label sets (e.g. all `finished_reason`s), except for histogram buckets and quantiles, where a sum
    means nothing.
    """
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
            if labels and "le" not in s.labels and "quantile" not in s.labels:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def request_body(
    fields: dict[str, Any],
    model: str | None,
    steering: SteeringLike | None,
    interventions: InterventionsLike | None,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """One JSON body: fixed fields, then extra sampling params, with None values left out."""
    body = {k: v for k, v in {**fields, "model": model, **params}.items() if v is not None}
    merged = build_interventions(steering, interventions)
    if merged is not None:
        body["interventions"] = merged
    return body


def train_body(name: str, positive: list[str], negative: list[str], **kw: Any) -> dict[str, Any]:
    """Body of POST /v1/steering/vectors/train; unknown keywords are refused by the server (400)."""
    return {"name": name, "positive": list(positive), "negative": list(negative), **kw}


def _check(resp: httpx.Response, as_json: bool = True) -> Any:
    """The JSON (or text) body of a 2xx response, else the server's error as ActServeError."""
    if resp.is_success:
        return resp.json() if as_json else resp.text
    try:
        body: Any = resp.json()
    except ValueError:
        body = None
    raise ActServeError.from_body(resp.status_code, body, resp.text)


def _sse_data(line: str) -> dict[str, Any] | None:
    """A chunk from one SSE line; None for blank/comment lines and `[DONE]`; error events raise."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:
        code = chunk["error"].get("code")
        raise ActServeError.from_body(code if isinstance(code, int) else 500, chunk)
    return chunk


def _page_query(seen: list[dict[str, Any]]) -> str:
    """Query of the next page of the vector list: the largest page, after the last name seen."""
    return urlencode({"limit": 1000, **({"after": seen[-1]["name"]} if seen else {})})


def _delta_text(chunk: dict[str, Any]) -> str:
    text = ""
    for c in chunk.get("choices", []):
        text += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return text


def _single_choice(params: Mapping[str, Any]) -> None:
    if params.get("n", 1) != 1:
        raise ValueError("text-delta streaming merges choices; use n=1 (or stream_chunks for n>1)")


class _Base:
    def __init__(self, base_url: str, api_key: str | None, model: str | None) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        key = api_key if api_key is not None else os.environ.get("ACTSERVE_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _completion_body(
        self, prompt: Prompt, max_tokens: int | None, stream: bool, **kw: Unpack[Options]
    ) -> dict[str, Any]:
        return self._body({"prompt": prompt, "max_tokens": max_tokens, "stream": stream or None}, **kw)

    def _chat_body(
        self, messages: Messages, max_tokens: int | None, stream: bool, **kw: Unpack[Options]
    ) -> dict[str, Any]:
        return self._body({"messages": messages, "max_tokens": max_tokens, "stream": stream or None}, **kw)

    def _body(
        self,
        fields: dict[str, Any],
        model: str | None = None,
        steering: SteeringLike | None = None,
        interventions: InterventionsLike | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        if "stream" in params:
            raise TypeError("pass no 'stream': use stream_completions / stream_chat for streaming")
        return request_body(fields, model or self.model, steering, interventions, params)


class ActServeClient(_Base):
    """Blocking client. `base_url` may end in `/v1` (as for the openai SDK) or not.

    Generation methods take `steering=` (Steering, SteeringVector or a list of vectors), `interventions=`
    (raw dict or typed helpers) and any other request field as a keyword (top_k, seed, stop, ...).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(base_url, api_key, model)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> ActServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str) -> Any:
        return _check(self._http.get(path))

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return _check(self._http.post(path, json=body))

    def completions(
        self, prompt: Prompt, *, max_tokens: int | None = 16, **kw: Unpack[Options]
    ) -> Completion:
        return parse_completion(
            self._post("/v1/completions", self._completion_body(prompt, max_tokens, False, **kw))
        )

    def chat(self, messages: Messages, *, max_tokens: int | None = None, **kw: Unpack[Options]) -> Completion:
        return parse_completion(
            self._post("/v1/chat/completions", self._chat_body(messages, max_tokens, False, **kw))
        )

    def stream_chunks(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Raw SSE chunks of a streaming request (`body` must set stream: true)."""
        with self._http.stream("POST", path, json=body) as resp:
            if not resp.is_success:
                resp.read()
                _check(resp)
            for line in resp.iter_lines():
                if (chunk := _sse_data(line)) is not None:
                    yield chunk

    def stream_completions(
        self, prompt: Prompt, *, max_tokens: int | None = 16, **kw: Unpack[Options]
    ) -> Iterator[str]:
        """Text deltas as they are generated; they concatenate to the non-streamed text."""
        _single_choice(kw)
        for chunk in self.stream_chunks(
            "/v1/completions", self._completion_body(prompt, max_tokens, True, **kw)
        ):
            if text := _delta_text(chunk):
                yield text

    def stream_chat(
        self, messages: Messages, *, max_tokens: int | None = None, **kw: Unpack[Options]
    ) -> Iterator[str]:
        _single_choice(kw)
        for chunk in self.stream_chunks(
            "/v1/chat/completions", self._chat_body(messages, max_tokens, True, **kw)
        ):
            if text := _delta_text(chunk):
                yield text

    def models(self) -> list[dict[str, Any]]:
        return self._get("/v1/models")["data"]

    def interventions(self) -> list[dict[str, Any]]:
        """The server's intervention plugins: name, description, hook_points, JSON schema."""
        return self._get("/v1/interventions")["data"]

    def health(self) -> bool:
        """True when the server is ready (200); False while loading or unhealthy (503)."""
        return self._http.get("/health").status_code == 200

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        """Block until /health says ready; connection errors count as not ready yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout} s")
            time.sleep(interval)

    def version(self) -> str:
        return self._get("/version")["version"]

    def tokenize(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
                 add_special_tokens: bool = True, model: str | None = None) -> list[int]:  # fmt: skip
        body = {"prompt": prompt, "messages": messages, "add_special_tokens": add_special_tokens}
        return self._post("/tokenize", request_body(body, model or self.model, None, None, {}))["tokens"]

    def detokenize(self, tokens: list[int], *, model: str | None = None) -> str:
        return self._post(
            "/detokenize", request_body({"tokens": tokens}, model or self.model, None, None, {})
        )["prompt"]

    def metrics(self) -> dict[str, float]:
        """`/metrics` parsed: see `parse_metrics` for the keys."""
        return parse_metrics(_check(self._http.get("/metrics"), as_json=False))

    # -- steering vector library (docs/api.md "Vector library") -----------------------------------
    def steering_vectors(self) -> list[dict[str, Any]]:
        """All stored vectors (every page): name, layers, norms, model_hint, hidden_size, num_layers,
        created, warnings; `steering_vector(name)` adds metadata and directions."""
        out: list[dict[str, Any]] = []
        while True:
            page = self._get(f"/v1/steering/vectors?{_page_query(out)}")
            out += page["data"]
            if not page.get("has_more") or not page["data"]:
                return out

    def steering_vector(self, name: str) -> dict[str, Any]:
        """One stored vector with its `directions` ({"L": [floats]})."""
        return self._get(f"/v1/steering/vectors/{quote(name)}")

    def download_steering_vector(self, name: str, format: str = "gguf") -> bytes:
        """The vector as a file: "gguf" (repeng / llama.cpp control vector) or "safetensors"."""
        resp = self._http.get(f"/v1/steering/vectors/{quote(name)}", params={"format": format})
        _check(resp, as_json=False)
        return resp.content

    def create_steering_vector(self, name: str, **kw: Any) -> dict[str, Any]:
        """Store a vector from `directions=` or `combine=` (see `vector_body`); returns its summary."""
        return self._post("/v1/steering/vectors", vector_body(name, **kw))

    def upload_steering_vector(self, file: str | os.PathLike[str] | bytes, name: str | None = None,
                               replace: bool = False) -> dict[str, Any]:  # fmt: skip
        """Store a .safetensors or .gguf vector file (a path or its bytes)."""
        data = file if isinstance(file, bytes) else Path(file).read_bytes()
        params = {"replace": str(replace).lower(), **({"name": name} if name else {})}
        headers = {"Content-Type": "application/octet-stream"}
        return _check(self._http.post("/v1/steering/vectors", content=data, params=params, headers=headers))

    def delete_steering_vector(self, name: str) -> None:
        _check(self._http.delete(f"/v1/steering/vectors/{quote(name)}"))

    def train_steering_vector(
        self, name: str, positive: list[str], negative: list[str], **kw: Any
    ) -> dict[str, Any]:
        """Train a vector on the server from contrastive examples and store it (`layers`, `method`,
        `position`, `paired`, `replace` as the route takes them); returns its summary."""
        return self._post("/v1/steering/vectors/train", train_body(name, positive, negative, **kw))

    def train(self, spec: TrainVector) -> dict[str, Any]:
        """Train and store a vector from a typed spec (pairs, layers, method, ...); returns its summary."""
        return self._post("/v1/steering/vectors/train", spec.to_dict())


class AsyncActServeClient(_Base):
    """The asyncio twin of ActServeClient: same methods and arguments, awaited."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(base_url, api_key, model)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)

    async def __aenter__(self) -> AsyncActServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str) -> Any:
        return _check(await self._http.get(path))

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return _check(await self._http.post(path, json=body))

    async def completions(
        self, prompt: Prompt, *, max_tokens: int | None = 16, **kw: Unpack[Options]
    ) -> Completion:
        body = self._completion_body(prompt, max_tokens, False, **kw)
        return parse_completion(await self._post("/v1/completions", body))

    async def chat(
        self, messages: Messages, *, max_tokens: int | None = None, **kw: Unpack[Options]
    ) -> Completion:
        body = self._chat_body(messages, max_tokens, False, **kw)
        return parse_completion(await self._post("/v1/chat/completions", body))

    async def stream_chunks(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with self._http.stream("POST", path, json=body) as resp:
            if not resp.is_success:
                await resp.aread()
                _check(resp)
            async for line in resp.aiter_lines():
                if (chunk := _sse_data(line)) is not None:
                    yield chunk

    async def stream_completions(
        self, prompt: Prompt, *, max_tokens: int | None = 16, **kw: Unpack[Options]
    ) -> AsyncIterator[str]:
        _single_choice(kw)
        body = self._completion_body(prompt, max_tokens, True, **kw)
        async for chunk in self.stream_chunks("/v1/completions", body):
            if text := _delta_text(chunk):
                yield text

    async def stream_chat(
        self, messages: Messages, *, max_tokens: int | None = None, **kw: Unpack[Options]
    ) -> AsyncIterator[str]:
        _single_choice(kw)
        async for chunk in self.stream_chunks(
            "/v1/chat/completions", self._chat_body(messages, max_tokens, True, **kw)
        ):
            if text := _delta_text(chunk):
                yield text

    async def models(self) -> list[dict[str, Any]]:
        return (await self._get("/v1/models"))["data"]

    async def interventions(self) -> list[dict[str, Any]]:
        return (await self._get("/v1/interventions"))["data"]

    async def health(self) -> bool:
        return (await self._http.get("/health")).status_code == 200

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout} s")
            await asyncio.sleep(interval)

    async def version(self) -> str:
        return (await self._get("/version"))["version"]

    async def tokenize(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
                       add_special_tokens: bool = True, model: str | None = None) -> list[int]:  # fmt: skip
        body = {"prompt": prompt, "messages": messages, "add_special_tokens": add_special_tokens}
        return (await self._post("/tokenize", request_body(body, model or self.model, None, None, {})))[
            "tokens"
        ]

    async def detokenize(self, tokens: list[int], *, model: str | None = None) -> str:
        body = request_body({"tokens": tokens}, model or self.model, None, None, {})
        return (await self._post("/detokenize", body))["prompt"]

    async def metrics(self) -> dict[str, float]:
        return parse_metrics(_check(await self._http.get("/metrics"), as_json=False))

    async def steering_vectors(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = await self._get(f"/v1/steering/vectors?{_page_query(out)}")
            out += page["data"]
            if not page.get("has_more") or not page["data"]:
                return out

    async def steering_vector(self, name: str) -> dict[str, Any]:
        return await self._get(f"/v1/steering/vectors/{quote(name)}")

    async def download_steering_vector(self, name: str, format: str = "gguf") -> bytes:
        resp = await self._http.get(f"/v1/steering/vectors/{quote(name)}", params={"format": format})
        _check(resp, as_json=False)
        return resp.content

    async def create_steering_vector(self, name: str, **kw: Any) -> dict[str, Any]:
        return await self._post("/v1/steering/vectors", vector_body(name, **kw))

    async def upload_steering_vector(self, file: str | os.PathLike[str] | bytes, name: str | None = None,
                                     replace: bool = False) -> dict[str, Any]:  # fmt: skip
        data = file if isinstance(file, bytes) else Path(file).read_bytes()
        params = {"replace": str(replace).lower(), **({"name": name} if name else {})}
        headers = {"Content-Type": "application/octet-stream"}
        resp = await self._http.post("/v1/steering/vectors", content=data, params=params, headers=headers)
        return _check(resp)

    async def delete_steering_vector(self, name: str) -> None:
        _check(await self._http.delete(f"/v1/steering/vectors/{quote(name)}"))

    async def train_steering_vector(
        self, name: str, positive: list[str], negative: list[str], **kw: Any
    ) -> dict[str, Any]:
        return await self._post("/v1/steering/vectors/train", train_body(name, positive, negative, **kw))

    async def train(self, spec: TrainVector) -> dict[str, Any]:
        return await self._post("/v1/steering/vectors/train", spec.to_dict())


__all__ = [
    "ActServeClient",
    "ActServeError",
    "AsyncActServeClient",
    "Choice",
    "Completion",
    "Usage",
    "parse_completion",
    "parse_metrics",
]
