"""Training steering vectors: against independent references (transformers forward hooks, numpy SVD),
validation, the HTTP endpoint, and scale 0 with a trained vector changing nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from actserve.interventions.steering.train import TrainingError, train_vector
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import ENGINE_MODES, LiveServer, start_server
from tests.engine_utils import capture_logits, greedy, run

POS = [
    "Lily got a new doll. She was so happy and smiled.",
    "Tom played in the park and laughed with his friends.",
    "The sun was shining and Sue danced with joy.",
    "Ben found his puppy and hugged it. He was glad.",
    "Mia and her dad baked a cake and had fun.",
    "The bird sang a happy song in the sky.",
]
NEG = [
    "Lily lost her doll. She was so sad and cried.",
    "Tom sat alone in the park. Nobody played with him.",
    "The rain would not stop and Sue cried at home.",
    "Ben could not find his puppy. He was sad.",
    "Mia dropped the cake on the floor and cried.",
    "The bird hurt its wing and felt alone.",
]


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=128))


def hooked(ref: Any, tok: Any, texts: list[str], layer: int, position: str) -> np.ndarray:
    """float64 [len(texts), hidden]: what a forward hook on transformers' model.layers[layer] sees."""
    seen: list[torch.Tensor] = []
    handle = ref.model.layers[layer].register_forward_hook(
        lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out)[0].double())
    )
    try:
        with torch.no_grad():
            for text in texts:
                ref(torch.tensor([tok.encode(text)]))
    finally:
        handle.remove()
    return np.stack([(h[-1] if position == "last" else h.mean(0)).numpy() for h in seen])


@pytest.mark.parametrize("position", ["last", "mean"])
def test_mean_diff_equals_hooked_reference(eng: LLMEngine, ref: Any, position: str) -> None:
    pos, neg = POS, NEG[:4]  # unpaired lists of different lengths
    vec = train_vector(eng.runner, eng.tokenizer, pos, neg, position=position, paired=False, batch_tokens=40)
    assert sorted(vec.directions) == [0, 1] and (vec.num_positive, vec.num_negative) == (6, 4)
    for layer in (0, 1):
        want = hooked(ref, eng.tokenizer, pos, layer, position).mean(0)
        want = want - hooked(ref, eng.tokenizer, neg, layer, position).mean(0)
        got = vec.directions[layer]
        assert got.dtype == torch.float32 and got.shape == (128,)
        assert np.abs(got.numpy() - want).max() < 1e-4 * max(1.0, np.abs(want).max())
        assert vec.stats[layer].norm == pytest.approx(float(np.linalg.norm(want)), rel=1e-5)  # natural norm


def test_pca_diff_equals_numpy_svd(eng: LLMEngine, ref: Any) -> None:
    vec = train_vector(eng.runner, eng.tokenizer, POS, NEG, layers=[1], method="pca_diff")
    assert list(vec.directions) == [1]
    diffs = hooked(ref, eng.tokenizer, POS, 1, "last") - hooked(ref, eng.tokenizer, NEG, 1, "last")
    _, s, vh = np.linalg.svd(diffs, full_matrices=False)  # uncentered, as documented in train.py
    want = vh[0] if diffs.mean(0) @ vh[0] > 0 else -vh[0]
    got = vec.directions[1].double().numpy()
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
    assert np.abs(got - want).max() < 1e-4
    assert diffs.mean(0) @ got > 0  # positives project higher on average
    assert vec.stats[1].explained_variance == pytest.approx(s[0] ** 2 / (s**2).sum(), rel=1e-4)


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff"])
def test_positives_project_higher(eng: LLMEngine, ref: Any, method: str) -> None:
    vec = train_vector(eng.runner, eng.tokenizer, POS, NEG, method=method)  # type: ignore[arg-type]
    for layer, d in vec.directions.items():
        p = hooked(ref, eng.tokenizer, POS, layer, "last") @ d.double().numpy()
        n = hooked(ref, eng.tokenizer, NEG, layer, "last") @ d.double().numpy()
        assert p.mean() > n.mean()
        st = vec.stats[layer]
        assert st.projection_gap > 0 and st.separation is not None and st.separation > 0
        assert st.pair_accuracy == pytest.approx(float((p > n).mean()))


def test_rejects_model_without_native_spec(eng: LLMEngine) -> None:
    with pytest.raises(TrainingError) as e:
        train_vector(torch.nn.Linear(2, 2), eng.tokenizer, POS, NEG)
    assert e.value.param == "model"


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"positive": []}, "positive"),
        ({"negative": []}, "negative"),
        ({"negative": [*NEG[:5], "  "]}, "negative[5]"),
        ({"positive": ["", *POS[1:]]}, "positive[0]"),
        ({"negative": NEG[:5]}, "negative"),  # paired by default: lengths differ
        ({"method": "pca_diff", "paired": False}, "paired"),
        ({"layers": [2]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": []}, "layers"),
        ({"method": "median"}, "method"),
        ({"position": "first"}, "position"),
        ({"max_tokens": 8}, "positive[0]"),
    ],
)
def test_validation_names_the_field(eng: LLMEngine, kw: dict[str, Any], param: str) -> None:
    args = {"positive": POS, "negative": NEG, **kw}
    with pytest.raises(TrainingError) as e:
        train_vector(eng.runner, eng.tokenizer, **args)
    assert e.value.param == param
    assert str(e.value).startswith(param)


def test_scale_zero_with_trained_vector_changes_nothing(eng: LLMEngine) -> None:
    vec = train_vector(eng.runner, eng.tokenizer, POS, NEG)
    directions = {str(k): v.tolist() for k, v in vec.directions.items()}
    prompts = [eng.tokenizer.encode(t) for t in ("Once upon a time, there was a ", "The dog ran to the ")]

    def spec(scale: float) -> dict[str, Any]:
        return {"steering": {"vectors": [{"directions": directions, "scale": scale}]}}

    with capture_logits() as seen:
        plain = run(eng, prompts, greedy(12), tag="p")
        zero = run(eng, prompts, greedy(12), [spec(0.0)] * 2, tag="z")
        sad = run(eng, prompts, greedy(12), [spec(-1.0)] * 2, tag="s")
    assert zero == plain
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(seen[f"p{i}"], seen[f"z{i}"], strict=True))
    assert sad != plain  # the vector does act at a non-zero scale


# -- HTTP: POST /v1/steering/vectors/train -------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tinystories_dir: Path) -> Iterator[LiveServer]:
    s = start_server(tinystories_dir, num_kv_blocks=64)
    yield s
    s.stop()


URL = "/v1/steering/vectors"


def test_http_train_stores_and_returns(server: LiveServer, eng: LLMEngine) -> None:
    pairs = [{"positive": p, "negative": n} for p, n in zip(POS, NEG, strict=True)]
    body = {"name": "happy", "pairs": pairs, "layers": [1], "method": "pca_diff"}
    r = httpx.post(server.url + URL + "/train", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    want = train_vector(eng.runner, eng.tokenizer, POS, NEG, layers=[1], method="pca_diff")
    assert out["name"] == "happy" and out["layers"] == [1] and out["training"]["method"] == "pca_diff"
    assert np.abs(np.array(out["directions"]["1"]) - want.directions[1].numpy()).max() < 1e-5
    stored = httpx.get(server.url + URL + "/happy").json()
    assert stored["directions"] == out["directions"] and stored["metadata"]["method"] == "pca_diff"
    again = httpx.post(server.url + URL + "/train", json=body, timeout=60)
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"
    lists = {"name": "happy", "positive": POS, "negative": NEG[:3], "paired": False, "replace": True}
    r = httpx.post(server.url + URL + "/train", json=lists, timeout=60)
    assert r.status_code == 200 and r.json()["training"]["num_negative"] == 3
    assert r.json()["layers"] == [0, 1]  # all layers by default


@pytest.mark.parametrize(
    ("body", "param", "cap"),
    [
        ({"pairs": []}, "pairs", None),
        ({"pairs": [{"positive": "a", "negative": " "}]}, "pairs[0].negative", None),
        ({"positive": POS, "negative": NEG[:2]}, "negative", None),
        ({"positive": POS}, None, None),
        ({"pairs": [{"positive": "a", "negative": "b"}], "layers": [7]}, "layers", None),
        ({"pairs": [{"positive": "a", "negative": "b"}], "method": "median"}, "method", None),
        ({"positive": ["a"] * 513, "negative": ["b"] * 513}, "positive", "512"),
        ({"pairs": [{"positive": "a", "negative": "b"}] * 513}, "pairs", "512"),
        (
            {"pairs": [{"positive": "a", "negative": "b"}, {"positive": "a" * 4001, "negative": "b"}]},
            "pairs[1].positive",
            "4000",
        ),  # fmt: skip
        ({"positive": ["a", "b" * 4001], "negative": ["c", "d"]}, "positive[1]", "4000"),
        ({"pairs": [{"positive": "a", "negative": "b"}], "layers": [0] * 1025}, "layers", "1024"),
        ({"pairs": [{"positive": "word " * 600, "negative": "b"}]}, "pairs[0].positive", None),
        ({"name": "no spaces allowed", "pairs": [{"positive": "a", "negative": "b"}]}, "name", None),
    ],
)
def test_http_bad_input_is_400_and_stores_nothing(
    server: LiveServer, body: dict[str, Any], param: str | None, cap: str | None
) -> None:
    r = httpx.post(server.url + URL + "/train", json={"name": "bad", **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert cap is None or cap in error["message"], error  # a cap is named in the message
    names = [v["name"] for v in httpx.get(server.url + URL).json()["data"]]
    assert "bad" not in names and "no spaces allowed" not in names
    done = {"prompt": "Once upon a time", "max_tokens": 3}
    assert httpx.post(server.url + "/v1/completions", json=done, timeout=60).status_code == 200


@pytest.mark.parametrize("mode", list(ENGINE_MODES))
def test_training_is_time_sliced_and_streams_keep_flowing(tinystories_dir: Path, mode: str) -> None:
    """Training runs in engine calls of a few examples: a concurrent stream keeps receiving tokens, its
    largest gap bounded by a multiple of one call's time, not by the whole training (before chunking,
    the stream stopped for the whole training: 3.4 s of 3.5 s for 512 such pairs on 2 CPU cores)."""
    server = start_server(tinystories_dir, num_kv_blocks=128, engine_process=ENGINE_MODES[mode])
    arrivals: list[float] = []
    stop = threading.Event()

    def stream() -> None:  # one stream after another until told to stop
        body = {"prompt": "Once upon a time", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=120) as c:
            while not stop.is_set():
                with c.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.perf_counter())
                        if stop.is_set():
                            break

    pairs = [{"positive": (p + " ") * 20, "negative": (n + " ") * 20} for p, n in zip(POS, NEG, strict=True)]
    thread = threading.Thread(target=stream)
    try:
        thread.start()
        while len(arrivals) < 20:  # the stream is running
            time.sleep(0.01)
        t0 = time.perf_counter()
        body = {"name": "sliced", "pairs": pairs * 43, "layers": [1]}  # 258 pairs, ~100k tokens
        r = httpx.post(server.url + URL + "/train", json=body, timeout=300)
        t1 = time.perf_counter()
    finally:
        stop.set()
        thread.join()
        server.stop()
    assert r.status_code == 200, r.text
    calls = r.json()["training"]["engine_calls"]
    train_s, per_call = t1 - t0, (t1 - t0) / calls
    during = [t for t in arrivals if t0 <= t <= t1]
    gaps = [b - a for a, b in zip([t0, *during], [*during, t1], strict=True)]
    assert calls >= 50 and len(during) >= calls // 4, (calls, len(during))
    assert max(gaps) < 25 * per_call + 0.25, (max(gaps), per_call, train_s)
    assert max(gaps) < train_s / 3, (max(gaps), train_s)
