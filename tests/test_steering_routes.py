"""The vector library over HTTP on a live TinyStories-656K server started with --steering-vectors DIR."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest
import torch

from actserve.clients import ActServeClient, ActServeError, SteeringVector
from actserve.interventions.steering.formats import write_safetensors
from actserve.server.api.steering_routes import MAX_UPLOAD_BYTES
from tests.conftest import ENGINE_MODES, LiveServer, start_server
from tests.test_vector_formats import repeng_gguf

PROMPT = "Once upon a time"
GREEDY = {"max_tokens": 16, "temperature": 0.0}
URL = "/v1/steering/vectors"


def direction(hidden: int, seed: int) -> torch.Tensor:
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hidden(tinystories_dir: Path) -> int:
    return json.loads((tinystories_dir / "config.json").read_text())["hidden_size"]


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def engine_mode(request: pytest.FixtureRequest) -> str:
    """Both engine modes: in process mode the library lives in the engine process, reached by RPC."""
    return ENGINE_MODES[request.param]


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory: pytest.TempPathFactory, hidden: int, engine_mode: str) -> Path:
    """What a user drops in the folder: a repeng export, one vector for a wider model, and junk
    (a fresh folder per engine mode: the tests add and delete vectors)."""
    folder = tmp_path_factory.mktemp("vectors")
    repeng_gguf(folder / "repeng-sad.gguf", {1: direction(hidden, 1).numpy() * 4})
    wide = {1: torch.ones(hidden * 2)}
    (folder / "too-wide.safetensors").write_bytes(write_safetensors(wide, "llama", "too-wide", 2))
    (folder / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 40)
    return folder


@pytest.fixture(scope="module")
def server(tinystories_dir: Path, vector_dir: Path, engine_mode: str) -> Iterator[LiveServer]:
    live = start_server(
        tinystories_dir, num_kv_blocks=256, steering_vectors_dir=str(vector_dir), engine_process=engine_mode
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[ActServeClient]:
    with ActServeClient(server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def text(client: ActServeClient, *vectors: SteeringVector) -> str:
    return client.completions(PROMPT, steering=list(vectors) or None, **GREEDY).text


def test_preloaded_folder(client: ActServeClient, hidden: int) -> None:
    names = {v["name"]: v for v in client.steering_vectors()}
    assert set(names) >= {"repeng-sad"} and not {"too-wide", "broken"} & set(names)
    v = names["repeng-sad"]
    assert v["layers"] == [1] and v["hidden_size"] == hidden and v["model_hint"] == "llama"
    assert v["norms"]["1"] == pytest.approx(float(direction(hidden, 1).norm() * 4), rel=1e-5)


def test_repeng_file_steers_and_scale_zero_does_not(client: ActServeClient) -> None:
    plain = text(client)
    assert text(client, SteeringVector(name="repeng-sad", scale=0.0)) == plain
    assert text(client, SteeringVector(name="repeng-sad", scale=-6.0)) != plain


def test_named_equals_inline_over_http(client: ActServeClient, hidden: int) -> None:
    d = {0: direction(hidden, 7), 1: direction(hidden, 8)}
    client.create_steering_vector("pair", directions=d, replace=True)
    kw = {"scale": 3.0, "phases": ["generation"], "window": (1, None)}
    named = client.completions(PROMPT, steering=SteeringVector(name="pair", **kw), **GREEDY).text
    inline = client.completions(PROMPT, steering=SteeringVector(directions=d, **kw), **GREEDY).text
    assert named == inline != text(client)
    got = client.steering_vector("pair")
    assert got["layers"] == [0, 1] and torch.equal(torch.tensor(got["directions"]["1"]), d[1])


def test_download_upload_round_trip(client: ActServeClient, tmp_path: Path) -> None:
    stored = client.steering_vector("repeng-sad")
    for fmt in ("gguf", "safetensors"):
        data = client.download_steering_vector("repeng-sad", fmt)
        (tmp_path / f"v.{fmt}").write_bytes(data)
        client.upload_steering_vector(tmp_path / f"v.{fmt}", name=f"copy-{fmt}", replace=True)
        again = client.steering_vector(f"copy-{fmt}")
        assert again["directions"] == stored["directions"]
    reader = gguf.GGUFReader(tmp_path / "v.gguf")  # what llama.cpp / repeng would read
    (t,) = reader.tensors
    assert t.name == "direction.1" and np.array_equal(
        np.asarray(t.data), np.array(stored["directions"]["1"], "f")
    )
    assert text(client, SteeringVector(name="copy-gguf", scale=-6)) == text(
        client, SteeringVector(name="repeng-sad", scale=-6)
    )


def test_combine(client: ActServeClient, hidden: int) -> None:
    client.create_steering_vector("a", directions={1: direction(hidden, 20)}, replace=True)
    client.create_steering_vector("b", directions={0: direction(hidden, 21)}, replace=True)
    out = client.create_steering_vector("a-minus-2b", combine={"a": 1.0, "b": -2.0}, replace=True)
    assert out["layers"] == [0, 1] and out["metadata"]["combine"] == "1*a + -2*b"
    got = client.steering_vector("a-minus-2b")["directions"]
    assert torch.allclose(torch.tensor(got["0"]), -2 * direction(hidden, 21))


def test_delete_then_use_is_400(client: ActServeClient, http: httpx.Client, hidden: int) -> None:
    client.create_steering_vector("temp", directions={1: direction(hidden, 30)}, replace=True)
    text(client, SteeringVector(name="temp"))
    client.delete_steering_vector("temp")
    with pytest.raises(ActServeError) as e:
        client.completions(PROMPT, steering=SteeringVector(name="temp"), **GREEDY)
    assert e.value.status == 400 and e.value.param == "interventions.steering.vectors[0].name"
    assert http.delete(f"{URL}/temp").status_code == 404
    assert http.get(f"{URL}/temp").status_code == 404


def _post(http: httpx.Client, **kw: Any) -> httpx.Response:
    return http.post(URL, **kw)


def test_bad_input_is_4xx_and_server_keeps_serving(
    http: httpx.Client, client: ActServeClient, hidden: int, vector_dir: Path
) -> None:
    good = direction(hidden, 40).tolist()
    raw = {"headers": {"Content-Type": "application/octet-stream"}}
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"json": {"name": "e", "directions": {}}}, 400, "directions"),
        ({"json": {"name": "e", "directions": {"2": good}}}, 400, "directions.2"),
        ({"json": {"name": "e", "directions": {"x": good}}}, 400, "directions.x"),
        ({"json": {"name": "e", "directions": {"1": good[:7]}}}, 400, "directions.1"),
        ({"json": {"name": "repeng-sad", "directions": {"1": good}}}, 409, "name"),
        ({"json": {"name": "../up", "directions": {"1": good}}}, 400, "name"),
        ({"json": {"name": "e"}}, 400, None),
        ({"json": {"name": "e", "combine": [{"name": "nope"}]}}, 404, "combine[0].name"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, None),
        ({"content": b"plain text", "headers": {"Content-Type": "text/plain"}}, 415, None),
        ({"content": b"not a vector at all", "params": {"name": "e"}, **raw}, 400, "file"),
        ({"content": b"", "params": {"name": "e"}, **raw}, 400, "file"),
        ({"content": (vector_dir / "broken.gguf").read_bytes(), "params": {"name": "e"}, **raw}, 400, "file"),
        (
            {"content": (vector_dir / "too-wide.safetensors").read_bytes(), "params": {"name": "e"}, **raw},
            400,
            "directions.1",
        ),  # fmt: skip
        ({"content": b"x" * (MAX_UPLOAD_BYTES + 1), "params": {"name": "e"}, **raw}, 413, None),
    ]
    before = {v["name"] for v in client.steering_vectors()}
    for kw, status, param in cases:
        r = _post(http, **kw)
        assert r.status_code == status, (kw.get("json"), r.text)
        err = r.json()["error"]
        assert err["message"] and (param is None or err["param"] == param), err
    assert {v["name"] for v in client.steering_vectors()} == before
    assert not (vector_dir / "e.safetensors").exists()
    assert http.get("/health").status_code == 200 and text(client)


def test_client_window_is_checked() -> None:
    assert SteeringVector(name="x", window=(2, None)).to_dict()["window"] == [2, None]
    with pytest.raises(ValueError, match="window"):
        SteeringVector(name="x", window=(3, 1)).to_dict()


def test_cli_flag() -> None:
    from actserve.server.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "--steering-vectors", "/srv/vectors"])
    assert engine_config(args).steering_vectors_dir == "/srv/vectors"
