"""Replicas on Ray Serve (server/replicas/): a local Ray cluster, two CPU replicas of TinyStories-656K behind
one endpoint. Concurrent requests spread over both; a prompt prefix sticks to its replica; a vector
uploaded through the endpoint steers requests on both (tokens equal to the inline directions) and its
deletion reaches both; a replica killed under load answers its requests with a clear 503, Ray Serve
replaces it, and every request after that succeeds."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from actserve.server.engine.config import EngineConfig
from actserve.server.replicas.options import Deployment, ReplicaOptions
from tests.conftest import free_port

# the replicas' names and response header (server/replicas/app.py, which imports Ray: imported by the
# fixture, so collecting this file costs nothing)
APP_NAME, ENGINE, REPLICA_HEADER = "actserve", "EngineReplica", "x-actserve-replica"

HIDDEN, LAYERS = 128, 2
TIMEOUT = 120  # per request: a hang fails the test instead of blocking it


@pytest.fixture(scope="module")
def endpoint(tinystories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray
    from ray import serve

    from actserve.server.replicas import app

    assert (app.APP_NAME, app.ENGINE, app.REPLICA_HEADER) == (APP_NAME, ENGINE, REPLICA_HEADER)
    vectors = tmp_path_factory.mktemp("shared-vectors")  # the replicas' shared folder
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # loopback only (tests/conftest.py)
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        steering = {"steering": {"vectors_dir": str(vectors)}}
        config = EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=512, cpu_threads=1,
                              engine_process="off", plugin_options=steering)  # fmt: skip
        options = ReplicaOptions(min_replicas=2, max_replicas=2, cpus_per_replica=1, affinity_slack=2)
        serve.run(app.build(Deployment(engine=config, replicas=options)), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, body: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)


def complete(url: str, prompt: str, interventions: Any = None, tokens: int = 8) -> httpx.Response:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    if interventions is not None:
        body["interventions"] = interventions
    return post(url, body)


def many(fn: Any, items: list[Any], workers: int = 64) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def replaced(victim: str) -> bool:
    """Two engine replicas alive, the victim not among them, both running and the deployment healthy."""
    import ray
    from ray import serve

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    replicas = {n for n in names if n.startswith(f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#")}
    status = serve.status().applications[APP_NAME].deployments[ENGINE]
    running = int(status.replica_states.get("RUNNING", 0))
    return len(replicas) == 2 and victim not in replicas and running == 2 and status.status == "HEALTHY"


def test_concurrent_requests_spread_over_both_replicas(endpoint: str) -> None:
    prompts = [f"Story {i}: once upon a time there was a" for i in range(64)]
    answers = many(lambda p: complete(endpoint, p), prompts)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    served = Counter(r.headers[REPLICA_HEADER] for r in answers)
    assert len(served) == 2 and min(served.values()) >= 16, served
    # an SSE stream passes through the ingress as a stream
    body = {"prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{endpoint}/v1/completions", json=body, timeout=TIMEOUT) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and len(events) >= 3


def test_a_shared_prompt_prefix_stays_on_its_replica(endpoint: str) -> None:
    """Requests sharing a long prompt prefix (past the router's first key) go where it is warm."""
    system = "You are a storyteller. " * 24  # 552 characters: two whole prefix keys
    first = complete(endpoint, system + "Tell me about a cat.")
    assert first.status_code == 200
    rest = [complete(endpoint, system + f"Tell me about animal {i}.") for i in range(6)]
    assert {r.headers[REPLICA_HEADER] for r in rest} == {first.headers[REPLICA_HEADER]}


def test_vector_uploaded_through_the_endpoint_steers_on_both_replicas(endpoint: str) -> None:
    g = torch.Generator().manual_seed(7)
    directions = {str(layer): (8 * torch.randn(HIDDEN, generator=g)).tolist() for layer in range(LAYERS)}
    r = post(endpoint, {"name": "calm", "directions": directions}, "/v1/steering/vectors")
    assert r.status_code in (200, 201), r.text
    prompts = [f"Tale {i}: the little dog" for i in range(16)]
    named = many(
        lambda p: complete(endpoint, p, {"steering": {"vectors": [{"name": "calm", "scale": 1.0}]}}), prompts
    )
    inline = many(
        lambda p: complete(endpoint, p, {"steering": {"vectors": [{"directions": directions}]}}), prompts
    )
    plain = many(lambda p: complete(endpoint, p), prompts)
    assert all(x.status_code == 200 for x in named + inline + plain), [
        x.text for x in named if x.status_code != 200
    ]
    assert {x.headers[REPLICA_HEADER] for x in named} == {x.headers[REPLICA_HEADER] for x in plain}  # both
    text = [[x.json()["choices"][0]["text"] for x in rs] for rs in (named, inline, plain)]
    assert text[0] == text[1]  # the stored vector is the inline one, on whichever replica answered
    assert text[0] != text[2]  # and it steers
    # deleted through the endpoint: both replicas refuse the name
    assert httpx.delete(f"{endpoint}/v1/steering/vectors/calm", timeout=TIMEOUT).status_code == 200
    gone = many(lambda p: complete(endpoint, p, {"steering": {"vectors": [{"name": "calm"}]}}), prompts)
    assert all(x.status_code == 400 and "calm" in x.json()["error"]["message"] for x in gone)
    assert len({x.headers[REPLICA_HEADER] for x in gone}) == 2


def test_killed_replica_is_replaced_and_its_requests_get_503(endpoint: str) -> None:
    import ray

    probe = complete(endpoint, "Once upon a time")
    victim = probe.headers[REPLICA_HEADER]
    prompts = [f"Long story {i}: once upon a time" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        started = time.monotonic()
        futures = [pool.submit(complete, endpoint, p, None, 480) for p in prompts]
        time.sleep(1.0)  # the requests are spread over both replicas, generating for 2 s or more
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result() for f in futures]
    assert time.monotonic() - started < TIMEOUT  # nothing hung
    codes = Counter(r.status_code for r in results)
    assert set(codes) <= {200, 503} and codes[503] >= 1, codes
    for r in results:
        if r.status_code == 503:
            assert "replica serving this request stopped" in r.json()["error"]["message"]
            assert r.headers.get("retry-after") == "1"
        else:
            assert r.headers[REPLICA_HEADER] != victim
    deadline = time.monotonic() + 90
    while not replaced(victim):
        assert time.monotonic() < deadline, "Ray Serve did not replace the killed replica in 90 s"
        time.sleep(0.5)
    after = many(lambda p: complete(endpoint, p), [f"After {i}: a small bird" for i in range(24)])
    assert all(r.status_code == 200 for r in after), [r.text for r in after if r.status_code != 200]
    served = {r.headers[REPLICA_HEADER] for r in after}
    assert victim not in served and len(served) == 2


def test_app_builder_args_and_refusals() -> None:
    """Ray Serve config `args` (deploy/ray/serve_config.yaml, KubeRay): unknown keys are refused by name."""
    from actserve.server.replicas.options import from_builder_args

    args = {"engine": {"device": "cpu", "max_num_seqs": 8}, "min_replicas": 1, "max_replicas": 3,
            "api_key": ["k"], "cors": {"origins": ["*"]}}  # fmt: skip
    dep = from_builder_args(args)
    assert (
        dep.engine.max_num_seqs == 8 and dep.replicas.max_replicas == 3 and dep.api["cors"].origins == ["*"]
    )
    assert dep.replicas.gpus_per_replica(dep.engine) == 0
    for bad, word in [({"replicas": 2}, "replicas"), ({"engine": {"gpus": 1}}, "gpus"),
                      ({"min_replicas": 3, "max_replicas": 2}, "max_replicas")]:  # fmt: skip
        with pytest.raises(ValueError, match=word):
            from_builder_args(bad)
    assert json.dumps(ReplicaOptions().__dict__)  # plain values, as a config file holds them
