"""API parity items of issue 12 on live TinyStories servers: `X-Request-Id`, several
`--served-model-name` aliases, optional CORS (`--allowed-origins`), and the access log without probe
scrapes. Generated text is checked against transformers' greedy generate on the same folder; the
aliased / CORS server is built from `actserve serve` flags exactly as the CLI builds it."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actserve.server import access_log
from actserve.server.api.request_id import MAX_LENGTH
from actserve.server.cli import build_app, build_parser
from tests.conftest import LiveServer
from tests.test_api_chat import MESSAGES, copy_with_chat_template
from tests.test_api_completions import Reference

ORIGIN = "https://good.example"
KEY = "parity-key"
ALIASES = ["tiny-a", "tiny-b", "tiny-c"]
PROMPT = "Once upon a time"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ref(tinystories_dir: Path) -> Reference:
    return Reference(tinystories_dir)


@pytest.fixture(scope="module")
def chat_dir(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_with_chat_template(tinystories_dir, tmp_path_factory.mktemp("parity-chat"))


def serve_flags(model_dir: Path, *flags: str) -> Any:
    return build_parser().parse_args(
        ["serve", "--model", str(model_dir), "--num-kv-blocks", "256", "--engine-process", "off", *flags]
    )


@pytest.fixture(scope="module")
def parity_server(chat_dir: Path) -> Iterator[LiveServer]:
    """Three aliases (one repeated on the command line), CORS for one origin, an API key."""
    args = serve_flags(chat_dir, "--served-model-name", *ALIASES, "tiny-b", "--allowed-origins", ORIGIN,
                       "--api-key", KEY)  # fmt: skip
    server = LiveServer(build_app(args))
    yield server
    server.stop()


def greedy_text(ref: Reference, prompt: str, n: int) -> str:
    ids = ref.encode(prompt)
    return ref.text_after(ids, ref.greedy(ids, n))


def completion(url: str, headers: dict[str, Any] | None = None, **body: Any) -> httpx.Response:
    payload = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=60)


def sse_chunks(r: httpx.Response) -> list[dict[str, Any]]:
    lines = [ln.removeprefix("data: ") for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


# --- X-Request-Id ---------------------------------------------------------------------------------


def test_request_id_is_echoed_and_names_the_completion(
    tinystories_server: LiveServer, ref: Reference
) -> None:
    rid = f"client.{uuid.uuid4().hex[:12]}:A/b_~"
    r = completion(tinystories_server.url, {"X-Request-Id": rid})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == rid
    assert r.json()["id"] == f"cmpl-{rid}"
    assert r.json()["choices"][0]["text"] == greedy_text(ref, PROMPT, 8)


def test_request_id_generated_when_absent(tinystories_server: LiveServer) -> None:
    ids = []
    for _ in range(2):
        r = completion(tinystories_server.url)
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]
        assert r.json()["id"] == f"cmpl-{rid}"
        uuid.UUID(hex=rid)  # a fresh UUID4, in hex
        ids.append(rid)
    assert ids[0] != ids[1]


def test_request_id_on_every_response(tinystories_server: LiveServer) -> None:
    """Routes without a completion (and errors) carry the header too: a client can always quote it."""
    url = tinystories_server.url
    for r in (httpx.get(f"{url}/health"), httpx.get(f"{url}/v1/models"), httpx.get(f"{url}/no/such/route"),
              completion(url, {"X-Request-Id": "err-1"}, max_tokens=-1)):  # fmt: skip
        assert r.headers.get("x-request-id"), (r.request.url, r.headers)
    assert r.status_code == 400 and r.headers["x-request-id"] == "err-1"


def test_request_id_on_streams(tinystories_server: LiveServer, ref: Reference) -> None:
    r = completion(tinystories_server.url, {"X-Request-Id": "stream-7"}, stream=True)
    assert r.status_code == 200 and r.headers["x-request-id"] == "stream-7"
    chunks = sse_chunks(r)
    assert {c["id"] for c in chunks} == {"cmpl-stream-7"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_text(ref, PROMPT, 8)
    r = completion(tinystories_server.url, stream=True)  # generated: the same id in header and chunks
    assert {c["id"] for c in sse_chunks(r)} == {f"cmpl-{r.headers['x-request-id']}"}


def test_request_id_on_chat(parity_server: LiveServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    url = f"{parity_server.url}/v1/chat/completions"
    r = httpx.post(url, json=body, headers={**AUTH, "X-Request-Id": "chat-1"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "chat-1" and r.json()["id"] == "chatcmpl-chat-1"
    r = httpx.post(url, json={**body, "stream": True}, headers={**AUTH, "X-Request-Id": "chat-2"}, timeout=60)
    assert r.headers["x-request-id"] == "chat-2"
    assert {c["id"] for c in sse_chunks(r)} == {"chatcmpl-chat-2"}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("x" * (MAX_LENGTH + 1), f"at most {MAX_LENGTH} characters; got {MAX_LENGTH + 1}"),
        ("has space", "visible ASCII"),
        ("tab\there", "visible ASCII"),
        ("caf\xe9".encode("latin-1"), "visible ASCII"),
        ("", "must not be empty"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_request_id_is_a_400_naming_the_header(
    tinystories_server: LiveServer, ref: Reference, value: str | bytes, why: str, stream: bool
) -> None:
    r = completion(tinystories_server.url, {"X-Request-Id": value}, stream=stream)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "X-Request-Id" and err["message"].startswith("X-Request-Id: ")
    assert why in err["message"]
    assert r.headers["x-request-id"] != value  # a fresh id, not the refused one
    ok = completion(tinystories_server.url)  # the server is unharmed
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == greedy_text(ref, PROMPT, 8)


def test_longest_request_id_is_accepted(tinystories_server: LiveServer) -> None:
    rid = "".join(chr(0x21 + i % 94) for i in range(MAX_LENGTH))  # every visible character
    r = completion(tinystories_server.url, {"X-Request-Id": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid and r.json()["id"] == f"cmpl-{rid}"


def test_two_request_id_headers_are_refused(tinystories_server: LiveServer) -> None:
    headers = httpx.Headers([("X-Request-Id", "a"), ("X-Request-Id", "b")])
    r = completion(tinystories_server.url, headers)  # type: ignore[arg-type]
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"
    assert "one value" in r.json()["error"]["message"]


def test_reused_request_id_in_flight_does_not_mix_requests(
    tinystories_server: LiveServer, ref: Reference
) -> None:
    """Clients reuse ids (retries, fan-out): concurrent requests with one id, n > 1 and a stream among
    them, each get their own complete greedy output."""
    prompts = ["Once upon a time", "Tom and his dog went to the park. They", "The sun was", "Lily saw a"]
    want = {p: greedy_text(ref, p, 12) for p in prompts}

    async def main() -> list[tuple[str, list[str]]]:
        async with httpx.AsyncClient(base_url=tinystories_server.url, timeout=120) as client:

            async def one(i: int, p: str) -> tuple[str, list[str]]:
                body = {"prompt": p, "max_tokens": 12, "temperature": 0, "n": 2, "stream": i % 2 == 1}
                r = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "same"})
                assert r.status_code == 200, r.text
                if not body["stream"]:
                    assert r.json()["id"] == "cmpl-same"
                    return p, [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
                texts = ["", ""]
                for c in sse_chunks(r):
                    assert c["id"] == "cmpl-same"
                    for ch in c["choices"]:
                        texts[ch["index"]] += ch["text"]
                return p, texts

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    for p, texts in asyncio.run(main()):
        assert texts == [want[p], want[p]], p


# --- --served-model-name aliases ------------------------------------------------------------------


def test_models_lists_every_alias_in_order(parity_server: LiveServer, chat_dir: Path) -> None:
    data = httpx.get(f"{parity_server.url}/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in data] == ALIASES  # the repeated tiny-b listed once
    assert {m["root"] for m in data} == {str(chat_dir)}
    for name in ALIASES:
        card = httpx.get(f"{parity_server.url}/v1/models/{name}", headers=AUTH)
        assert card.status_code == 200 and card.json()["id"] == name


@pytest.mark.parametrize("stream", [False, True])
def test_response_reports_the_alias_the_request_used(
    parity_server: LiveServer, ref: Reference, stream: bool
) -> None:
    want = greedy_text(ref, PROMPT, 8)
    for model, reported in [(None, ALIASES[0]), *((a, a) for a in ALIASES)]:
        extra = {"model": model} if model else {}
        r = completion(parity_server.url, AUTH, stream=stream, **extra)
        assert r.status_code == 200, r.text
        if stream:
            chunks = sse_chunks(r)
            assert {c["model"] for c in chunks} == {reported}
            assert "".join(c["choices"][0]["text"] for c in chunks) == want
        else:
            assert r.json()["model"] == reported and r.json()["choices"][0]["text"] == want


def test_chat_reports_the_alias(parity_server: LiveServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2, "model": "tiny-c"}
    r = httpx.post(f"{parity_server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny-c"


def test_unknown_model_is_a_404_listing_the_aliases(parity_server: LiveServer) -> None:
    for r in (completion(parity_server.url, AUTH, model="tiny-d"),
              httpx.get(f"{parity_server.url}/v1/models/tiny-d", headers=AUTH)):  # fmt: skip
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["param"] == "model" and err["code"] == "model_not_found"
        assert all(repr(a) in err["message"] for a in ALIASES)


def test_served_model_name_flag_checks(chat_dir: Path) -> None:
    from actserve.server.cli import engine_config
    from actserve.server.cli_http import served_names

    args = serve_flags(chat_dir, "--served-model-name", "b", "a", "b")
    assert served_names(args) == ["b", "a"] and engine_config(args).served_model_name == "b"
    assert engine_config(serve_flags(chat_dir)).served_model_name is None
    with pytest.raises(SystemExit):
        serve_flags(chat_dir, "--served-model-name", " ")


# --- CORS -----------------------------------------------------------------------------------------


def preflight(url: str, origin: str, method: str = "POST") -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": method,
               "Access-Control-Request-Headers": "authorization,content-type,x-request-id"}  # fmt: skip
    return httpx.options(f"{url}/v1/completions", headers=headers)


def test_cors_preflight_answered_before_the_api_key(parity_server: LiveServer) -> None:
    r = preflight(parity_server.url, ORIGIN)  # a browser's preflight carries no Authorization
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_cors_preflight_from_another_origin_is_refused(parity_server: LiveServer) -> None:
    r = preflight(parity_server.url, "https://evil.example")
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


def test_cors_headers_on_answers_and_errors(parity_server: LiveServer) -> None:
    origin = {"Origin": ORIGIN}
    ok = completion(parity_server.url, {**AUTH, **origin})
    unauthorized = completion(parity_server.url, origin)
    assert (ok.status_code, unauthorized.status_code) == (200, 401)
    for r in (ok, unauthorized):  # a page can read the answer, the error and the request id
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    other = completion(parity_server.url, {**AUTH, "Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(tinystories_server: LiveServer) -> None:
    r = preflight(tinystories_server.url, ORIGIN)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = completion(tinystories_server.url, {"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_flags(chat_dir: Path) -> None:
    from actserve.server.cli_http import cors_config

    assert cors_config(serve_flags(chat_dir)) is None
    c = cors_config(serve_flags(chat_dir, "--allowed-origins", '["https://a.example", "https://b.example"]',
                                "--allowed-methods", "GET,POST", "--allow-credentials"))  # fmt: skip
    assert c is not None and c.origins == ["https://a.example", "https://b.example"]
    assert c.methods == ["GET", "POST"] and c.headers == ["*"] and c.credentials
    with pytest.raises(SystemExit, match="--allowed-methods: needs --allowed-origins"):
        cors_config(serve_flags(chat_dir, "--allowed-methods", "GET"))
    for bad in ("[1]", "[", ","):
        with pytest.raises(SystemExit):
            serve_flags(chat_dir, "--allowed-origins", bad)


# --- access log -----------------------------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        assert isinstance(record.args, tuple)
        self.paths.append(str(record.args[2]))


PATHS = ["/health", "/metrics", "/metrics?name=x", "/v1/models", "/version?x=1"]


@pytest.mark.parametrize(("flags", "logged"), [
    ((), ["/v1/models", "/version?x=1"]),
    (("--disable-access-log-for-endpoints", ""), PATHS),
    (("--disable-access-log-for-endpoints", "/version,/health"), PATHS[1:4]),
])  # fmt: skip
def test_access_log_leaves_out_probe_paths(
    tinystories_server: LiveServer, chat_dir: Path, flags: tuple[str, ...], logged: list[str]
) -> None:
    """The filter `actserve serve` installs, on uvicorn's real access records of a live server."""
    logger = logging.getLogger(access_log.ACCESS_LOGGER)
    level, handler = logger.level, Collect()
    installed = access_log.install(serve_flags(chat_dir, *flags).disable_access_log_for_endpoints)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for path in PATHS:
            assert httpx.get(f"{tinystories_server.url}{path}").status_code == 200
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        if installed is not None:
            logger.removeFilter(installed)
    assert handler.paths == logged
