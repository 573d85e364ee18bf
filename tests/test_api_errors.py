"""Error responses of the live server: OpenAI's body {"error": {"message", "type", "param", "code"}},
400 for every invalid request (never FastAPI's 422), 401/404 as docs/api.md says, and a server that keeps
serving normal requests afterwards."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import LiveServer, start_server

MODEL = "tinystories-656k"
STEER = "interventions.steering.vectors[0]"


def vec(n: int = 128) -> list[float]:
    return [0.01] * n


def steering(directions: dict[str, list[float]], **kw: Any) -> dict[str, Any]:
    return {"steering": {"vectors": [{"directions": directions, **kw}]}}


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] == param, err
    return err


def assert_still_serving(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 3}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# (route, JSON body or raw text, param the error must name, words the message must contain)
CASES: list[tuple[str, Any, str | None, list[str]]] = [
    ("/v1/completions", '{"model": "tinystories-656k", "prompt": "x",', None, ["JSON"]),
    ("/v1/completions", "[1, 2]", None, ["JSON object"]),
    ("/v1/completions", {"max_tokens": 2}, "prompt", ["prompt"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens", ["max_tokens", "0"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens", ["max_tokens"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", ["echo"]),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature", ["temperature", "0"]),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", ["n", "1"]),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n", ["n", "16"]),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", ["top_p", "0"]),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", ["logprobs", "20"]),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     ["stream"]),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", ["suffix"]),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 3}, "best_of", ["best_of"]),
    ("/v1/completions", {"prompt": []}, "prompt", ["empty"]),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt", ["empty"]),
    ("/v1/completions", {"prompt": [1, 99999]}, "prompt", ["2047"]),
    ("/v1/completions", {"prompt": "x " * 600}, "prompt", ["512"]),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 600}, "max_tokens", ["512"]),
    ("/v1/completions", {"prompt": "x", "interventions": {"nope": {}}}, "interventions.nope", ["steering"]),
    ("/v1/completions", {"prompt": "x", "interventions": steering({"1": vec(5)})},
     f"{STEER}.directions.1", ["128"]),
    ("/v1/completions", {"prompt": "x", "interventions": steering({"2": vec()})},
     f"{STEER}.directions.2", ["out of range"]),
    ("/v1/completions", {"prompt": "x", "interventions": steering({"first": vec()})},
     f"{STEER}.directions.first", ["integer"]),
    ("/v1/completions",  # Python's json (and so FastAPI) accepts NaN
     '{"prompt": "x", "interventions": {"steering": {"vectors": [{"directions": {"1": [' + "0.5, " * 127
     + '0.5]}, "scale": NaN}]}}}', f"{STEER}.scale", ["finite"]),
    ("/v1/completions",
     '{"prompt": "x", "interventions": {"steering": {"vectors": [{"directions": {"1": [' + "0.1, " * 127
     + 'NaN]}}]}}}', f"{STEER}.directions.1", ["finite"]),
    # finite as float64, not in the float32 model: the residual would become inf
    ("/v1/completions", {"prompt": "x", "interventions": steering({"1": [1e308] * 128})},
     f"{STEER}.directions.1", ["finite"]),
    ("/v1/completions", {"prompt": "x", "interventions": steering({"1": vec()}, scale=1e300)},
     f"{STEER}.scale", ["finite"]),
    ("/v1/completions", {"prompt": "x", "interventions": steering({"1": [1e20] * 128}, scale=1e20)},
     f"{STEER}.scale", ["not finite"]),
    ("/v1/completions", {"prompt": "x", "interventions": {"steering": {"vectors": []}}},
     "interventions.steering.vectors", []),
    ("/v1/completions", {"prompt": "x", "interventions": {"steering": {"vectors": [{"name": "happy"}]}}},
     f"{STEER}.name", []),
    ("/v1/chat/completions", {"messages": []}, "messages", ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role",
     ["role"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs", ["20"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs", ["logprobs"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools", ["tools"]),
    # TinyStories has no chat template
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages",
     ["chat template"]),
    ("/tokenize", {}, None, ["prompt", "messages"]),
    ("/detokenize", {"tokens": [-1]}, "tokens", []),
    # token ids and integers beyond the vocabulary or int64 (5000 crashed the sampler, 2**70 the engine)
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [5000]}, "stop_token_ids", ["[0, 2047]"]),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids", ["[0, 2047]"]),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [2**70]}, "stop_token_ids", ["[0, 2047]"]),
    ("/v1/completions", {"prompt": "x", "min_tokens": 5, "max_tokens": 4}, "min_tokens", ["max_tokens"]),
    ("/v1/completions", {"prompt": [1, 2**70]}, "prompt", ["2047"]),
    ("/v1/completions", {"prompt": [[1, 2], [-(2**70)]]}, "prompt", ["2047"]),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed", ["seed"]),
    ("/v1/completions", {"prompt": "x", "top_k": 2**70}, "top_k", ["top_k"]),
    ("/v1/completions", {"prompt": "x", "min_tokens": 2**70}, "min_tokens", ["min_tokens"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**70}, "max_tokens", ["max_tokens"]),
    ("/detokenize", {"tokens": [1, 2**70]}, "tokens", ["2047"]),
    ("/detokenize", {"tokens": [1] * 513}, "tokens", ["512"]),
    # lone surrogates: text that cannot be UTF-8 (a plain-text 500 from the tokenizer before)
    ("/v1/completions", '{"prompt": "\\ud800 x"}', "prompt", ["surrogate"]),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt", ["surrogate"]),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', "stop", ["surrogate"]),
    ("/v1/completions", '{"prompt": "x", "stop": "a\\udc00"}', "stop", ["surrogate"]),
    ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', "model", ["surrogate"]),
    ("/v1/completions", '{"prompt": "x", "\\ud800": 1}', None, ["Unicode"]),
    ("/v1/completions", '{"prompt": "x", "user": "\\ud800"}', "user", ["surrogate"]),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content", ["surrogate"]),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content", ["surrogate"]),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi", "x": "\\ud800"}]}',
     "messages[0]", ["surrogate"]),
    ("/tokenize", '{"prompt": "\\ud800 x"}', "prompt", ["surrogate"]),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\udbff"}]}', "messages[0].content",
     ["surrogate"]),
    # a prompt list is capped (256 prompts; prompts x n at most 256)
    ("/v1/completions", {"prompt": ["x"] * 257}, "prompt", ["256"]),
    ("/v1/completions", {"prompt": [[1]] * 257}, "prompt", ["256"]),
    ("/v1/completions", {"prompt": ["x"] * 20, "n": 16}, "n", ["256"]),
]  # fmt: skip

# Fields the server knows but does not implement: 400 "<field>: not supported by this server"
# (response_format, guided_json/regex/choice/grammar and logit_bias are implemented: test_structured_outputs)
UNSUPPORTED: list[tuple[str, Any]] = [
    ("guided_decoding_backend", "xgrammar"),
    ("structural_tag", "{}"),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [{"name": "f"}]),
    ("function_call", {"name": "f"}),
    ("parallel_tool_calls", True),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("suffix", "y"),
    ("logits_processors", ["a.b:C"]),
    ("prompt_logprobs", 1),
]
# ... and the values of those fields that ask for nothing, which are accepted
HARMLESS: list[tuple[str, Any]] = [
    ("response_format", None), ("response_format", {"type": "text"}), ("logit_bias", {}), ("tools", []),
    ("tool_choice", "none"), ("tool_choice", "auto"), ("functions", []), ("suffix", ""),
    ("modalities", ["text"]), ("logits_processors", []), ("prompt_logprobs", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value"), UNSUPPORTED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(UNSUPPORTED)]
)
def test_unimplemented_field_is_a_400_naming_it(
    tinystories_server: LiveServer, field: str, value: Any
) -> None:
    url = tinystories_server.url
    bodies = {
        "/v1/completions": {"prompt": "Once", "max_tokens": 2, field: value},
        "/v1/chat/completions": {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            field: value,
        },
    }
    for route, body in bodies.items():
        for stream in (False, True):
            r = httpx.post(f"{url}{route}", json={**body, "stream": stream})
            err = assert_openai_error(r, 400, field)
            assert err["message"] == f"{field}: not supported by this server"
    assert_still_serving(url)


@pytest.mark.parametrize(("field", "value"), HARMLESS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(HARMLESS)])
def test_harmless_value_of_unimplemented_field_is_accepted(
    tinystories_server: LiveServer, field: str, value: Any
) -> None:
    r = httpx.post(
        f"{tinystories_server.url}/v1/completions", json={"prompt": "Once", "max_tokens": 2, field: value}
    )
    assert r.status_code == 200, r.text


def test_unknown_fields_are_ignored_with_one_warning(
    tinystories_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = tinystories_server.url
    with caplog.at_level(logging.WARNING, logger="actserve.server.api.protocol"):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once", "max_tokens": 2, "frobnicate": 1,
                                                      "zzz_extra": {"a": [1]}})  # fmt: skip
        assert r.status_code == 200, r.text
        chat = {"messages": [{"role": "user", "content": "hi"}], "frobnicate": True}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 400  # no template
        assert httpx.post(f"{url}/tokenize", json={"prompt": "x", "frobnicate": 1}).status_code == 200
    warnings = [rec.getMessage() for rec in caplog.records if "ignored" in rec.getMessage()]
    assert warnings[0] == "fields were present in the request but ignored: 'frobnicate', 'zzz_extra'"
    assert len(warnings) == 3, warnings


@pytest.mark.parametrize(("route", "body", "param", "words"), CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_invalid_request_is_a_400_naming_the_field(
    tinystories_server: LiveServer, route: str, body: Any, param: str | None, words: list[str]
) -> None:
    url = tinystories_server.url
    if isinstance(body, str):
        r = httpx.post(f"{url}{route}", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{url}{route}", json=body)
    err = assert_openai_error(r, 400, param)
    assert err["type"] == "BadRequestError"
    for w in words:
        assert w in err["message"], err["message"]
    assert_still_serving(url)


def test_streaming_request_errors_before_the_stream(tinystories_server: LiveServer) -> None:
    body = {"prompt": "x", "stream": True, "interventions": steering({"9": vec()})}
    with httpx.stream("POST", f"{tinystories_server.url}/v1/completions", json=body) as r:
        r.read()
        assert_openai_error(r, 400, f"{STEER}.directions.9")
    assert_still_serving(tinystories_server.url)


def test_sdk_raises_typed_errors(tinystories_server: LiveServer) -> None:
    client = OpenAI(base_url=f"{tinystories_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    assert info.value.status_code == 400
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", stream=True, temperature=-1)
    assert info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    assert info.value.code == "model_not_found"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens == 1


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_unknown_model_is_404(tinystories_server: LiveServer, route: str) -> None:
    body: dict[str, Any] = {"model": "no-such-model", "prompt": "x"}
    if route == "/v1/chat/completions":
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{tinystories_server.url}{route}", json=body)
    err = assert_openai_error(r, 404, "model")
    assert err["code"] == "model_not_found"
    assert MODEL in err["message"]
    assert_openai_error(httpx.get(f"{tinystories_server.url}/v1/models/no-such-model"), 404, "model")


def test_unknown_route_and_method(tinystories_server: LiveServer) -> None:
    err = assert_openai_error(httpx.get(f"{tinystories_server.url}/v1/nothing-here"), 404)
    assert err["type"] == "NotFoundError"
    assert_openai_error(httpx.post(f"{tinystories_server.url}/v2/completions", json={}), 404)
    assert_openai_error(httpx.get(f"{tinystories_server.url}/v1/completions"), 405)
    assert_still_serving(tinystories_server.url)


# ------------------------------------------------------------------------------------------ API key


@pytest.fixture(scope="module")
def keyed_server(tinystories_dir: Path) -> Iterator[LiveServer]:
    server = start_server(tinystories_dir, api_key="s3cret-key", num_kv_blocks=32)
    yield server
    server.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}])
def test_missing_or_wrong_key_is_401(keyed_server: LiveServer, headers: dict[str, str]) -> None:
    for method, route in [("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/tokenize")]:
        r = httpx.request(method, f"{keyed_server.url}{route}", json={"prompt": "x"}, headers=headers)
        err = assert_openai_error(r, 401)
        assert err["type"] == "AuthenticationError"


def test_right_key_works_and_probes_stay_open(keyed_server: LiveServer) -> None:
    good = OpenAI(base_url=f"{keyed_server.url}/v1", api_key="s3cret-key", max_retries=0)
    assert good.completions.create(model=MODEL, prompt="Once", max_tokens=2).usage.completion_tokens == 2
    assert [m.id for m in good.models.list().data] == [MODEL]
    bad = OpenAI(base_url=f"{keyed_server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="Once", max_tokens=2)
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200
    metrics = httpx.get(f"{keyed_server.url}/metrics")
    assert metrics.status_code == 200 and "actserve_prompt_tokens" in metrics.text
    assert httpx.get(f"{keyed_server.url}/version").status_code == 200


@pytest.fixture(scope="module")
def two_key_server(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Keys as `actserve serve --api-key k1 --api-key k2 --api-key-file FILE` gives them."""
    from actserve.server.cli import api_keys, build_parser

    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# team keys\n\nfile-key-1\n  file-key-2  \n#not-a-key\n")
    args = build_parser().parse_args(
        ["serve", "--api-key", "k1", "--api-key", "k2", "--api-key-file", str(key_file)]
    )
    keys = api_keys(args)
    assert keys == ["k1", "k2", "file-key-1", "file-key-2"]
    server = start_server(tinystories_dir, api_key=keys, num_kv_blocks=32)  # type: ignore[arg-type]
    yield server
    server.stop()


def test_every_listed_key_is_accepted(two_key_server: LiveServer) -> None:
    url = two_key_server.url
    for key in ["k1", "k2", "file-key-1", "file-key-2"]:
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, (key, r.text)
    for key in ["k3", "#not-a-key", "k1k2", "file-key-1x", "K1"]:
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert assert_openai_error(r, 401)["code"] == "invalid_api_key"


def test_docs_redoc_and_schema_are_open_like_metrics(two_key_server: LiveServer) -> None:
    """/docs, /redoc and /openapi.json describe the API and need no key (before, /redoc did)."""
    url = two_key_server.url
    for route in ["/docs", "/redoc", "/openapi.json", "/metrics", "/health", "/version"]:
        assert httpx.get(f"{url}{route}").status_code == 200, route
    assert "/v1/completions" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_api_key_file_without_keys_is_refused(tmp_path: Path) -> None:
    from actserve.server.cli import api_keys, build_parser

    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(SystemExit, match="no keys"):
        api_keys(build_parser().parse_args(["serve", "--api-key-file", str(empty)]))
    with pytest.raises(SystemExit, match="api-key-file"):
        api_keys(build_parser().parse_args(["serve", "--api-key-file", str(tmp_path / "missing")]))
    assert api_keys(build_parser().parse_args(["serve"])) == []
    assert build_parser().parse_args(["serve"]).max_request_bytes == 16 * 2**20
    assert build_parser().parse_args(["serve", "--max-request-bytes", "1024"]).max_request_bytes == 1024


def test_unexpected_error_is_an_openai_shaped_500(caplog: pytest.LogCaptureFixture) -> None:
    """A bug anywhere gives OpenAI's error body (never Starlette's plain text) and a logged traceback."""
    from fastapi.testclient import TestClient

    from actserve.server.api.app import create_app

    app = create_app()

    @app.get("/boom")
    async def boom() -> None:
        raise ZeroDivisionError("a bug")

    with TestClient(app, raise_server_exceptions=False) as tc, caplog.at_level(logging.ERROR):
        r = tc.get("/boom")
        err = assert_openai_error(r, 500)
        assert err["type"] == "InternalServerError" and "ZeroDivisionError" in err["message"]
        assert r.headers["content-type"] == "application/json"
    assert any("unhandled error" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_loading_and_failed_load_answer_503() -> None:
    """/health is 503 while the model loads and after a failed load; requests get a 503 error body."""
    from fastapi.testclient import TestClient

    from actserve.server.api.app import create_app

    gate = threading.Event()

    def load() -> Any:
        gate.wait(10)
        raise RuntimeError("weights are corrupt")

    with TestClient(create_app(load=load)) as tc:
        health = tc.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        loading = tc.post("/v1/completions", json={"prompt": "x"})
        err = assert_openai_error(loading, 503)
        assert "loading" in err["message"]
        assert loading.headers["retry-after"] == "1"
        assert tc.get("/metrics").status_code == 200
        gate.set()
        deadline = time.monotonic() + 10
        while tc.get("/health").json().get("status") == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tc.get("/health").status_code == 503
        err = assert_openai_error(tc.post("/v1/completions", json={"prompt": "x"}), 503)
        assert "weights are corrupt" in err["message"]
        assert_openai_error(tc.get("/v1/models"), 503)
