"""The affinity keys the Ray Serve ingress computes (server/replicas/routing.py) and `actserve serve-ray`'s
flags (server/cli_ray.py), without a Ray cluster (tests/test_ray_replicas.py runs one)."""

from __future__ import annotations

import json
import random
import string

import pytest

from actserve.server.cli import app_options, build_parser, engine_config
from actserve.server.cli_ray import deployment
from actserve.server.replicas.routing import CHARS_PER_KEY, MAX_KEYS, TOKENS_PER_KEY, affinity_keys


def keys(body: dict, path: str = "/v1/completions") -> tuple[str, ...]:
    return affinity_keys(path, json.dumps(body).encode())


def prefix(ks: tuple[str, ...]) -> list[str]:
    return [k for k in ks if k.startswith("p:")]


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def test_prompts_share_keys_as_deep_as_they_agree() -> None:
    shared = text(3 * CHARS_PER_KEY, 0)
    a = prefix(keys({"prompt": shared + text(CHARS_PER_KEY, 1)}))
    b = prefix(keys({"prompt": shared + text(CHARS_PER_KEY, 2)}))
    assert len(a) == len(b) == 4  # deepest first
    assert a[1:] == b[1:] and a[0] != b[0]  # three whole chunks in common, the fourth differs
    short = prefix(keys({"prompt": shared[: CHARS_PER_KEY - 1]}))
    assert len(short) == 1 and short[0] not in a  # a prompt shorter than a chunk: one key of its own
    huge = prefix(keys({"prompt": text(CHARS_PER_KEY * (MAX_KEYS + 5), 3)}))
    assert len(huge) == MAX_KEYS


def test_token_prompts_chat_and_interventions() -> None:
    ids = list(range(3 * TOKENS_PER_KEY))
    assert (
        prefix(keys({"prompt": ids}))[1:]
        == prefix(keys({"prompt": ids[: 2 * TOKENS_PER_KEY] + [7] * 64}))[1:]
    )
    chat = {"messages": [{"role": "system", "content": text(600, 4)}, {"role": "user", "content": "hi"}]}
    assert prefix(keys(chat, "/v1/chat/completions"))
    # the same prompt under other interventions (another prompt KV in the prefix cache) shares nothing
    steer = {"steering": {"vectors": [{"name": "calm", "scale": 2.0}]}}
    plain, steered = keys({"prompt": text(600, 5)}), keys({"prompt": text(600, 5), "interventions": steer})
    assert not set(prefix(plain)) & set(prefix(steered))
    assert steered[-1] == "v:calm" and not any(k.startswith("v:") for k in plain)


def test_other_routes_and_bodies_have_no_keys() -> None:
    assert affinity_keys("/v1/models", b"") == ()
    assert affinity_keys("/v1/steering/vectors", b'{"name": "x"}') == ()
    assert affinity_keys("/v1/completions", b"not json") == ()
    assert affinity_keys("/v1/completions", b"[1, 2]") == ()


def test_serve_ray_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve-ray", "--model", "m", "--device", "cpu", "--replicas", "3",
                              "--steering-vectors", "/shared/v", "--api-key", "k"])  # fmt: skip
    dep = deployment(args, engine_config(args), app_options(args))
    assert (dep.replicas.min_replicas, dep.replicas.max_replicas) == (3, 3)
    assert dep.engine.plugin_options["steering"] == {"vectors_dir": "/shared/v"} and dep.api["api_key"] == [
        "k"
    ]
    assert dep.replicas.gpus_per_replica(dep.engine) == 0  # CPU replicas hold no GPU
    args = parser.parse_args(["serve-ray", "--device", "cuda", "--min-replicas", "1", "--max-replicas", "4",
                              "--tensor-parallel-size", "2"])  # fmt: skip
    dep = deployment(args, engine_config(args), app_options(args))
    assert dep.replicas.gpus_per_replica(dep.engine) == 2 and dep.replicas.max_replicas == 4
    for argv, word in [(["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas"),
                       (["--disable-uvicorn-access-log"], "--disable-uvicorn-access-log")]:  # fmt: skip
        args = parser.parse_args(["serve-ray", *argv])
        with pytest.raises(SystemExit, match=word):
            deployment(args, engine_config(args), app_options(args))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve-ray", "--replicas", "0"])
