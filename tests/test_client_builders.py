"""The Python client's typed builders (clients/interventions.py, clients/training.py) and `actserve chat`.

Every builder's JSON validates against the server's own request schema (each plugin's `spec_model`, the
training route's `TrainRequest`), and bad values fail in the client with the field named. Live, on
TinyStories-656K (a copy with a chat template), each builder the CPU serves gives exactly the answer of
the hand-written JSON of docs/api.md: steering, precision (an nvfp4 copy), sparsity, KV retrieval,
structured output, logit bias, and training; experts per token on a random-init Qwen3-MoE.
CoT compression is checked against its schema only: its artifact exists for the embedded default model
alone (SmolLM2-135M), whose live behaviour tests/test_cot_compression.py covers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from actserve.clients import (
    ActServeClient,
    CoTCompression,
    ExpertsPerToken,
    KVRetrieval,
    LogitBias,
    Precision,
    Sparsity,
    Steering,
    SteeringVector,
    StructuredOutput,
    TrainVector,
)
from actserve.interventions.cot_compression.schema import CoTCompressionSpec
from actserve.interventions.kv_retrieval.schema import KVRetrievalSpec
from actserve.interventions.logit_bias.plugin import LogitBiasSpec
from actserve.interventions.moe.plugin import MoESpec
from actserve.interventions.precision.plugin import PrecisionSpec
from actserve.interventions.sparsity.plugin import SparsitySpec
from actserve.interventions.steering.schema import SteeringSpec
from actserve.interventions.structured_output.schema import StructuredSpec
from actserve.server.api.steering_train_route import TrainRequest
from tests.conftest import LiveServer, save_random_model, start_server
from tests.test_moe_models import FAMILIES, VOCAB

SCHEMAS = {
    "steering": SteeringSpec, "cot_compression": CoTCompressionSpec, "precision": PrecisionSpec,
    "sparsity": SparsitySpec, "moe": MoESpec, "kv_retrieval": KVRetrievalSpec,
    "structured_output": StructuredSpec, "logit_bias": LogitBiasSpec,
}  # fmt: skip
HIDDEN = 128
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
DIRECTION = {"1": [2.0 * ((i % 7) - 3) for i in range(HIDDEN)]}

# (builder, the JSON docs/api.md documents for it)
CASES: list[tuple[Any, dict[str, Any]]] = [
    (Steering(SteeringVector({1: DIRECTION["1"]}, scale=4.0)),
     {"steering": {"vectors": [{"directions": DIRECTION, "scale": 4.0, "phases": ["prompt", "generation"],
                                "normalize": False}]}}),
    (Steering(SteeringVector(name="calm", scale=2.0, phases=["generation"])),
     {"steering": {"vectors": [{"name": "calm", "scale": 2.0, "phases": ["generation"],
                                "normalize": False}]}}),
    (Precision("nvfp4"), {"precision": {"weights": "nvfp4"}}),
    (Sparsity("teal", 0.5), {"sparsity": {"method": "teal", "level": 0.5}}),
    (KVRetrieval("quest", budget_tokens=32, sink_tokens=8, window_tokens=8),
     {"kv_retrieval": {"method": "quest", "budget_tokens": 32, "sink_tokens": 8, "window_tokens": 8}}),
    (StructuredOutput(choice=["yes", "no"]), {"structured_output": {"choice": ["yes", "no"]}}),
    (StructuredOutput(regex="[a-z]{3}"), {"structured_output": {"regex": "[a-z]{3}"}}),
    (LogitBias({42: 100.0}), {"logit_bias": {"bias": {"42": 100.0}}}),
]  # fmt: skip
SCHEMA_ONLY: list[tuple[Any, dict[str, Any]]] = [
    (CoTCompression(kl_budget=0.1), {"cot_compression": {"kl_budget": 0.1}}),
    (CoTCompression(strength=-2.0), {"cot_compression": {"strength": -2.0}}),
    (ExpertsPerToken(2), {"moe": {"top_k": 2}}),
    (KVRetrieval(), {"kv_retrieval": {}}),
    (StructuredOutput(json_object=True), {"structured_output": {"json_object": True}}),
    (StructuredOutput(json_schema={"type": "object"}),
     {"structured_output": {"json_schema": {"type": "object"}}}),
    (StructuredOutput(grammar='root ::= "a"'), {"structured_output": {"grammar": 'root ::= "a"'}}),
]  # fmt: skip


@pytest.mark.parametrize(("builder", "documented"), CASES + SCHEMA_ONLY, ids=lambda x: type(x).__name__)
def test_builder_json_is_the_documented_json_and_valid(builder: Any, documented: dict[str, Any]) -> None:
    out = builder.to_dict()
    assert out == documented
    ((key, spec),) = out.items()
    SCHEMAS[key].model_validate(spec)


def test_bad_values_fail_in_the_client_naming_the_field() -> None:
    bad = [
        (Sparsity("teal", 0.95), "Sparsity.level"), (Sparsity("teal", 0.555), "multiple of 0.01"),
        (Sparsity("magic", 0.5), "Sparsity.method"), (Precision("fp8"), "Precision.weights"),  # type: ignore[arg-type]
        (ExpertsPerToken(0), "ExpertsPerToken.top_k"),
        (KVRetrieval(budget_tokens=-1), "KVRetrieval.budget_tokens"),
        (KVRetrieval(method="knn"), "KVRetrieval.method"),  # type: ignore[arg-type]
        (CoTCompression(), "exactly one"), (CoTCompression(strength=9.0), "CoTCompression.strength"),
        (StructuredOutput(), "exactly one"), (StructuredOutput(regex="a", choice=["a"]), "exactly one"),
        (LogitBias({}), "LogitBias.bias"), (LogitBias({1: 101}), "LogitBias.bias[1]"),
        (TrainVector("v", positive=["a"]), "both positive and negative"),
        (TrainVector("v", pairs=[("a", "b")], positive=["a"], negative=["b"]), "either pairs"),
        (TrainVector("v", pairs=[("a", "b")], method="median"), "TrainVector.method"),  # type: ignore[arg-type]
    ]  # fmt: skip
    for builder, words in bad:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            builder.to_dict()


def test_train_vector_validates_against_the_route_schema() -> None:
    specs = [
        TrainVector("v", pairs=[("good", "bad")], layers=[0, 1], method="pca_diff"),
        TrainVector("v", positive=["a", "b"], negative=["c"], paired=False, layers="all", position="mean"),
    ]
    for spec in specs:
        TrainRequest.model_validate(spec.to_dict())


@pytest.fixture(scope="module")
def server(
    tinystories_dir: Path, sparsity_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    chat_dir = tmp_path_factory.mktemp("chat") / "tinystories-chat"
    shutil.copytree(tinystories_dir, chat_dir)
    config = json.loads((chat_dir / "tokenizer_config.json").read_text())
    (chat_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    options = {"precision": {"precisions": ["nvfp4"]}, "sparsity": {"calibration": str(sparsity_calibration)}}
    live = start_server(
        chat_dir, num_kv_blocks=512, block_size=8, engine_process="off", plugin_options=options
    )
    yield live
    live.stop()


def raw(url: str, body: dict[str, Any]) -> str:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_each_builder_gives_the_answer_of_its_documented_json(server: LiveServer) -> None:
    client = ActServeClient(server.url)
    client.create_steering_vector("calm", directions={1: DIRECTION["1"]}, replace=True)
    prompt = list(torch.randint(3, 2000, (60,), generator=torch.Generator().manual_seed(3)).tolist())
    plain = raw(server.url, {"prompt": prompt, "max_tokens": 6, "temperature": 0})
    for builder, documented in CASES:
        ours = client.completions(prompt, max_tokens=6, temperature=0, interventions=builder).text
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "interventions": documented}
        assert ours == raw(server.url, body), builder
        # each acts, but an FP4 copy may well give the same six greedy tokens: counted by the server instead
        assert (ours != plain) or isinstance(builder, Precision), builder
    counted = client.metrics()
    assert any("precision" in k and "nvfp4" in k and v >= 2 for k, v in counted.items()), counted
    text = client.completions(
        prompt, max_tokens=4, temperature=0, interventions=StructuredOutput(choice=["yes", "no"])
    ).text
    assert text in ("yes", "no")
    tok = client.completions("Once", max_tokens=3, temperature=0, interventions=LogitBias({42: 100.0}))
    assert tok.text == client.detokenize([42, 42, 42])


def test_train_builder_equals_raw_training(server: LiveServer) -> None:
    client = ActServeClient(server.url)
    pairs = [
        ("Lily was happy and laughed.", "Lily was sad and cried."),
        ("The sun was bright.", "The sky was dark."),
    ]
    summary = client.train(TrainVector("typed", pairs=pairs, layers=[1], replace=True))
    assert summary["layers"] == [1]
    body = {"name": "untyped", "pairs": [{"positive": p, "negative": n} for p, n in pairs], "layers": [1],
            "replace": True}  # fmt: skip
    assert httpx.post(f"{server.url}/v1/steering/vectors/train", json=body, timeout=60).status_code in (
        200,
        201,
    )
    assert client.steering_vector("typed")["directions"] == client.steering_vector("untyped")["directions"]


def test_experts_per_token_on_a_moe_model(tmp_path: Path) -> None:
    moe_dir = save_random_model(FAMILIES["qwen3moe-normtopk-headdim"](), tmp_path / "q3")
    live = start_server(moe_dir, num_kv_blocks=64, block_size=8, max_model_len=256, engine_process="off")
    try:
        client = ActServeClient(live.url)
        prompt = list(torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(5)).tolist())
        one = client.completions(prompt, max_tokens=6, temperature=0, interventions=ExpertsPerToken(1)).text
        assert one == raw(live.url, {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                     "interventions": {"moe": {"top_k": 1}}})  # fmt: skip
    finally:
        live.stop()


def test_chat_cli_over_piped_stdin(server: LiveServer) -> None:
    """`actserve chat` with a steering flag: each piped line is a turn; the replies are the server's for
    the same conversation and interventions; /reset starts over."""
    client = ActServeClient(server.url)
    client.create_steering_vector("calm", directions={1: DIRECTION["1"]}, replace=True)
    argv = [sys.executable, "-m", "actserve.server.cli", "chat", "--url", f"{server.url}/v1",
            "--max-tokens", "6", "--temperature", "0", "--steer", "calm:3",
            "--system-prompt", "Tell stories."]  # fmt: skip
    out = subprocess.run(argv, input="Hello there\nAnd then?\n/reset\nHello there\n", capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    replies = out.stdout.split("\n")[:3]
    steer = Steering(SteeringVector(name="calm", scale=3.0))
    history = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "Hello there"}]
    first = client.chat(history, max_tokens=6, temperature=0, steering=steer).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = client.chat(history, max_tokens=6, temperature=0, steering=steer).text
    assert replies == [first, second, first]
    unsteered = client.chat(history[:2], max_tokens=6, temperature=0).text
    assert unsteered != first  # the flag reached the server
    bad = subprocess.run(
        [*argv[:6], "--sparsity", "teal:2"], input="", capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "--sparsity" in bad.stderr
