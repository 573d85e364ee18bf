"""The vector library over HTTP on a live TinyStories-656K server started with --steering-vectors DIR."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save

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
    for name, data in hostile_files(hidden).items():
        (folder / f"hostile-{name}").write_bytes(data)
    return folder


def hostile_files(hidden: int) -> dict[str, bytes]:
    """Files the parsers must refuse without a 5xx or a failed start (name -> bytes)."""
    ones = torch.ones(hidden)
    deep = b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    good = write_safetensors({1: ones}, "llama", "g", 2)
    return {
        "superscript.safetensors": save({"direction.²": ones}),
        "deep.safetensors": struct.pack("<Q", len(deep)) + deep,
        "truncated.safetensors": good[:-5],
        "ints.safetensors": save({"direction.1": torch.ones(hidden, dtype=torch.int16)}),
        "nan.safetensors": save({"direction.1": torch.full((hidden,), float("nan"))}),
        "count.safetensors": save({"direction.1": ones}, metadata={"layer_count": "30"}),
        "meta.safetensors": write_safetensors({1: ones}, "llama", "m", 2, {"k": "v" * 70_000}),
    }


@pytest.fixture(scope="module")
def server(tinystories_dir: Path, vector_dir: Path, engine_mode: str) -> Iterator[LiveServer]:
    live = start_server(
        tinystories_dir,
        num_kv_blocks=256,
        plugin_options={"steering": {"vectors_dir": str(vector_dir)}},
        engine_process=engine_mode,
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
    assert not [n for n in names if n.startswith("hostile-")]
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
    assert engine_config(args).plugin_options["steering"]["vectors_dir"] == "/srv/vectors"


UNREADABLE = {
    "superscript.safetensors": "unexpected tensor 'direction.²'",
    "deep.safetensors": "recursion limit",
    "truncated.safetensors": "not a valid safetensors file",
    "ints.safetensors": "not a float type",
    "nan.safetensors": "NaN",
    "count.safetensors": "layer_count: the header says 30 direction tensors, the file has 1",
    "meta.safetensors": "metadata: ",
}


def test_unreadable_uploads_are_400s_naming_the_problem(http: httpx.Client, hidden: int) -> None:
    raw = {"Content-Type": "application/octet-stream"}
    files = hostile_files(hidden)
    assert files.keys() == UNREADABLE.keys()
    for name, data in files.items():
        r = _post(http, content=data, params={"name": "e"}, headers=raw)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == "file" and UNREADABLE[name] in err["message"], (name, err)
    gguf_count = gguf_with_layer_count(hidden, 30)
    r = _post(http, content=gguf_count, params={"name": "e"}, headers=raw)
    assert r.status_code == 400 and "the header says 30 direction tensors, the file has 2" in r.text
    assert http.get("/health").status_code == 200


def gguf_with_layer_count(hidden: int, layer_count: int) -> bytes:
    return write_gguf_raw({1: np.ones(hidden, np.float32), 2: np.ones(hidden, np.float32)}, layer_count)


def write_gguf_raw(directions: dict[int, np.ndarray], layer_count: int, hint: str = "llama") -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.gguf"
        w = gguf.GGUFWriter(path, "controlvector")
        w.add_string("controlvector.model_hint", hint)
        w.add_uint32("controlvector.layer_count", layer_count)
        for layer, d in directions.items():
            w.add_tensor(f"direction.{layer}", d)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def test_other_model_hint_is_accepted_with_warnings(http: httpx.Client, hidden: int) -> None:
    data = write_gguf_raw({1: direction(hidden, 50).numpy()}, 1, hint="qwen2")
    r = _post(http, content=data, params={"name": "from-qwen", "replace": "true"},
              headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 200, r.text
    (warning,) = r.json()["warnings"]
    assert "'qwen2'" in warning
    listed = {v["name"]: v for v in http.get(URL, params={"limit": 1000}).json()["data"]}
    assert listed["from-qwen"]["warnings"] == [warning] and listed["repeng-sad"]["warnings"] == []
    r = _post(http, json={"name": "same", "directions": {"1": direction(hidden, 51).tolist()},
                          "model_hint": "llama", "replace": True})  # fmt: skip
    assert r.status_code == 200 and r.json()["warnings"] == []


def test_list_pages_and_leaves_out_metadata(http: httpx.Client, client: ActServeClient, hidden: int) -> None:
    for i in range(3):
        body = {"name": f"page-{i}", "directions": {"1": direction(hidden, 60 + i).tolist()},
                "metadata": {"notes": "n" * 60_000}, "replace": True}  # fmt: skip
        assert _post(http, json=body).status_code == 200
    everything = [v["name"] for v in client.steering_vectors()]  # the client follows every page
    assert everything == sorted(everything) and {"page-0", "page-1", "page-2"} <= set(everything)
    first = http.get(URL, params={"limit": 1, "after": "page-"})
    page = first.json()
    assert first.status_code == 200 and len(first.content) < 2000
    assert [v["name"] for v in page["data"]] == ["page-0"] and page["has_more"]
    assert (page["first_id"], page["last_id"]) == ("page-0", "page-0") and "metadata" not in page["data"][0]
    nxt = http.get(URL, params={"limit": 2, "after": page["last_id"]}).json()
    assert [v["name"] for v in nxt["data"]] == ["page-1", "page-2"]
    assert http.get(f"{URL}/page-1").json()["metadata"]["notes"] == "n" * 60_000  # GET one: full
    for bad in ("0", "1001", "x", "-1", "1" * 50):
        r = http.get(URL, params={"limit": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit", r.text


def test_json_body_caps(http: httpx.Client, hidden: int) -> None:
    good = direction(hidden, 70).tolist()
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"directions": {"1": good}, "metadata": {"k": "v" * 70_000}}, "metadata", "at most 65536"),
        ({"directions": {"1": good}, "model_hint": "h" * 300}, "model_hint", "at most 256"),
        ({"directions": {str(i): [] for i in range(200_000)}}, "directions", "200000 layer keys"),
        ({"directions": {"1": [0.0] * 1_000_000}}, "directions.1", "length 1000000, expected hidden_size"),
        ({"directions": {"٣": good}}, "directions.٣", "layer keys are integers"),
    ]
    for body, param, match in cases:
        r = _post(http, json={"name": "capped", **body})
        assert r.status_code == 400, r.text[:300]
        err = r.json()["error"]
        assert err["param"] == param and match in err["message"], err
        assert len(r.content) < 1000
    assert http.get(f"{URL}/capped").status_code == 404
