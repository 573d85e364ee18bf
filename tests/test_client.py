"""The Python client (actserve.clients) against a live TinyStories-656K server, plus the openai SDK with
`extra_body(...)`; greedy decoding, so every comparison is exact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from actserve.clients import (
    ActServeClient,
    ActServeError,
    AsyncActServeClient,
    Steering,
    SteeringVector,
    extra_body,
    parse_metrics,
)

MODEL = "tinystories-656k"
PROMPT = "Once upon a time"
GREEDY = {"max_tokens": 24, "temperature": 0.0}


@pytest.fixture(scope="module")
def client(tinystories_server: Any) -> Iterator[ActServeClient]:
    with ActServeClient(tinystories_server.url, model=MODEL, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def hidden(tinystories_dir: Path) -> int:
    return json.loads((tinystories_dir / "config.json").read_text())["hidden_size"]


def direction(hidden: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


def test_completion(client: ActServeClient) -> None:
    out = client.completions(PROMPT, **GREEDY)
    assert out.model == MODEL and out.text and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage is not None and out.usage.prompt_tokens == len(client.tokenize(PROMPT))
    assert out.usage.completion_tokens <= 24


def test_stream_deltas_concatenate_to_text(client: ActServeClient) -> None:
    deltas = list(client.stream_completions(PROMPT, **GREEDY))
    assert len(deltas) > 1
    assert "".join(deltas) == client.completions(PROMPT, **GREEDY).text


def test_chat_without_template_is_400(client: ActServeClient) -> None:
    with pytest.raises(ActServeError) as e:
        client.chat([{"role": "user", "content": "hi"}], max_tokens=4)
    assert e.value.status == 400 and e.value.param == "messages" and e.value.type == "BadRequestError"
    with pytest.raises(ActServeError) as e:
        list(client.stream_chat([{"role": "user", "content": "hi"}], max_tokens=4))
    assert e.value.param == "messages"


def test_steering_scale_zero_is_unsteered(client: ActServeClient, hidden: int) -> None:
    plain = client.completions(PROMPT, **GREEDY).text
    zero = Steering(SteeringVector({0: direction(hidden), 1: direction(hidden, 1)}, scale=0.0))
    assert client.completions(PROMPT, steering=zero, **GREEDY).text == plain
    strong = SteeringVector({1: direction(hidden).tolist()}, scale=8.0)  # reaches the model at all
    assert client.completions(PROMPT, steering=strong, **GREEDY).text != plain


def test_openai_sdk_extra_body_matches_native(
    tinystories_server: Any, client: ActServeClient, hidden: int
) -> None:
    steering = Steering(SteeringVector({1: direction(hidden, 2)}, scale=4.0, phases=["generation"]))
    sdk = openai.OpenAI(base_url=f"{tinystories_server.url}/v1", api_key="unused")
    body = extra_body(steering=steering)
    res = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0.0, extra_body=body)
    assert res.choices[0].text == client.completions(PROMPT, steering=steering, **GREEDY).text
    assert res.choices[0].text != client.completions(PROMPT, **GREEDY).text


def test_errors_carry_server_param(client: ActServeClient, hidden: int) -> None:
    cases = [
        (
            {"steering": SteeringVector({1: [0.5] * (hidden - 1)})},
            400,
            "interventions.steering.vectors[0].directions.1",
        ),
        (
            {"steering": SteeringVector({7: [0.5] * hidden})},
            400,
            "interventions.steering.vectors[0].directions.7",
        ),
        ({"interventions": {"nope": {}}}, 400, "interventions.nope"),
        ({"temperature": 5.0}, 400, "temperature"),
        ({"model": "no-such-model"}, 404, "model"),
    ]
    for kwargs, status, param in cases:
        with pytest.raises(ActServeError) as e:
            client.completions(PROMPT, max_tokens=2, **kwargs)
        assert (e.value.status, e.value.param) == (status, param), kwargs
        assert e.value.message
    with pytest.raises(ActServeError) as e:
        client.detokenize([10**6])
    assert (e.value.status, e.value.param) == (400, "tokens")


def test_endpoints(client: ActServeClient) -> None:
    assert client.health()
    assert [m["id"] for m in client.models()] == [MODEL]
    listing = {p["name"]: p for p in client.interventions()}
    assert "steering" in listing and "vectors" in listing["steering"]["schema"]["properties"]
    ids = client.tokenize("Once upon a time")
    assert ids and client.detokenize(ids).strip().endswith("Once upon a time")


def test_metrics(client: ActServeClient, hidden: int) -> None:
    client.completions(PROMPT, steering=SteeringVector({0: direction(hidden)}, scale=0.0), **GREEDY)
    m = client.metrics()
    assert m["actserve_prompt_tokens_total"] > 0 and m["actserve_generation_tokens_total"] > 0
    assert m["actserve_request_success_total"] >= 1
    key = f'actserve_intervention_requests_total{{intervention="steering",model_name="{MODEL}",value=""}}'
    assert m[key] >= 1
    assert m["actserve_time_to_first_token_seconds_count"] >= 1
    assert "actserve_time_to_first_token_seconds_bucket" not in m  # bucket sums would be meaningless


def test_parse_metrics_keys() -> None:
    text = 'x_total{model_name="m",r="a"} 2.0\nx_total{model_name="m",r="b"} 3.0\n'
    assert parse_metrics(text) == {"x_total": 5.0, 'x_total{model_name="m",r="a"}': 2.0,
                                   'x_total{model_name="m",r="b"}': 3.0}  # fmt: skip


def test_steering_to_dict_is_request_json() -> None:
    rows = torch.zeros(3, 2)
    rows[2] = torch.tensor([1.0, -2.0])
    spec = Steering(SteeringVector(rows, scale=-2.0, phases=["generation"], normalize=True)).to_dict()
    assert spec == {"steering": {"vectors": [
        {"directions": {"2": [1.0, -2.0]}, "scale": -2.0, "phases": ["generation"], "normalize": True}
    ]}}  # fmt: skip
    assert extra_body(steering=Steering(SteeringVector({0: [1.0]})), top_k=2) == {
        "top_k": 2,
        "interventions": {"steering": {"vectors": [
            {"directions": {"0": [1.0]}, "scale": 1.0, "phases": ["prompt", "generation"], "normalize": False}
        ]}},
    }  # fmt: skip
    for bad in (SteeringVector({0: [float("nan")]}), SteeringVector({0: [1.0]}, phases=["decode"]),
                SteeringVector({0: [1.0]}, scale=float("inf")), SteeringVector()):  # fmt: skip
        with pytest.raises(ValueError):
            bad.to_dict()


def test_async_client_matches_sync(tinystories_server: Any, client: ActServeClient, hidden: int) -> None:
    steering = SteeringVector({0: direction(hidden, 3)}, scale=3.0)

    async def run() -> tuple[str, str, list[int]]:
        async with AsyncActServeClient(tinystories_server.url, model=MODEL) as ac:
            assert await ac.health()
            text = (await ac.completions(PROMPT, steering=steering, **GREEDY)).text
            streamed = "".join([d async for d in ac.stream_completions(PROMPT, steering=steering, **GREEDY)])
            with pytest.raises(ActServeError):
                await ac.chat([{"role": "user", "content": "hi"}])
            return text, streamed, await ac.tokenize(PROMPT)

    text, streamed, ids = asyncio.run(run())
    assert text == streamed == client.completions(PROMPT, steering=steering, **GREEDY).text
    assert ids == client.tokenize(PROMPT)


def test_train_steering_vector_sync_and_async(tinystories_server: Any, client: ActServeClient) -> None:
    """Both clients train the same vector from the same examples; the server's own field checks reach the
    caller as ActServeError naming the field."""
    pos = ["Lily was so happy and she laughed.", "The sun was bright and everyone smiled."]
    neg = ["Lily was very sad and she cried.", "The sky was dark and everyone frowned."]
    summary = client.train_steering_vector("client-trained", pos, neg, layers=[1], replace=True)
    assert summary["layers"] == [1]

    async def run() -> dict[str, Any]:
        async with AsyncActServeClient(tinystories_server.url, model=MODEL) as ac:
            await ac.train_steering_vector("client-trained-async", pos, neg, layers=[1], replace=True)
            return await ac.steering_vector("client-trained-async")

    sync_vec, async_vec = client.steering_vector("client-trained"), asyncio.run(run())
    assert sync_vec["directions"] == async_vec["directions"] and list(sync_vec["directions"]) == ["1"]
    with pytest.raises(ActServeError) as err:
        client.train_steering_vector("bad", pos, neg, method="median")
    assert err.value.status == 400 and err.value.param == "method"
    for name in ("client-trained", "client-trained-async"):
        client.delete_steering_vector(name)


def test_api_key_and_401(tinystories_dir: Path) -> None:
    from tests.conftest import start_server

    server = start_server(tinystories_dir, api_key="sekret", num_kv_blocks=64)
    try:
        with pytest.raises(ActServeError) as e:
            ActServeClient(server.url, api_key="wrong").models()
        assert (e.value.status, e.value.type, e.value.code) == (401, "AuthenticationError", "invalid_api_key")
        with ActServeClient(f"{server.url}/v1", api_key="sekret") as c:
            assert c.health() and c.completions(PROMPT, max_tokens=2).usage is not None
            assert "actserve_prompt_tokens_total" in c.metrics()  # /metrics stays open
    finally:
        server.stop()


def test_in_stream_error_event_raises() -> None:
    """Failures after the status line arrive as an SSE error event; the client raises them."""
    events = 'data: {"choices": [{"index": 0, "text": "a"}]}\n\n' + (
        'data: {"error": {"message": "engine stopped", "type": "ServiceUnavailableError", '
        '"param": null, "code": 503}}\n\ndata: [DONE]\n\n'
    )
    transport = httpx.MockTransport(lambda _req: httpx.Response(200, text=events))
    c = ActServeClient("http://test")
    c._http = httpx.Client(base_url="http://test", transport=transport)
    stream = c.stream_completions(PROMPT)
    assert next(stream) == "a"
    with pytest.raises(ActServeError) as e:
        next(stream)
    assert (e.value.status, e.value.message) == (503, "engine stopped")
