"""GET /metrics on a live server: the names, labels and buckets of docs/api.md "Metrics", counters that
move by
exactly what the responses report, aborts on client disconnect, and preemption under a tiny KV cache."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import Request
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from actserve.server.api.generation import watch_disconnect
from tests.conftest import LiveServer, start_server
from tests.engine_utils import wait_for

MODEL = "tinystories-656k"
HISTOGRAMS = [
    "actserve_time_to_first_token_seconds",
    "actserve_inter_token_latency_seconds",
    "actserve_e2e_request_latency_seconds",
    "actserve_request_queue_time_seconds",
    "actserve_request_prefill_time_seconds",
    "actserve_request_decode_time_seconds",
]
GAUGES = ["actserve_num_requests_running", "actserve_num_requests_waiting", "actserve_kv_cache_usage_perc"]
COUNTERS = [
    "actserve_prompt_tokens_total",
    "actserve_generation_tokens_total",
    "actserve_num_preemptions_total",
]
LABELLED = {
    "actserve_request_success_total": ("finished_reason", {"stop", "length", "abort"}),
    "actserve_gpu_memory_bytes": ("kind", {"weights", "kv_cache", "allocated", "reserved"}),
    "actserve_cpu_memory_bytes": ("kind", {"rss", "pinned"}),
    "actserve_intervention_requests_total": ("intervention", {"steering"}),
    "actserve_weight_bytes": ("format", {"float32"}),
}
REQUEST_BUCKETS = {0.3, 7680.0}
BUCKETS = {
    "actserve_time_to_first_token_seconds": {0.001, 2560.0},
    "actserve_inter_token_latency_seconds": {0.01, 80.0},
    "actserve_e2e_request_latency_seconds": REQUEST_BUCKETS,
    "actserve_request_queue_time_seconds": REQUEST_BUCKETS,
    "actserve_request_prefill_time_seconds": REQUEST_BUCKETS,
    "actserve_request_decode_time_seconds": REQUEST_BUCKETS,
}


def scrape(url: str) -> list[Sample]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    labels = {"model_name": MODEL, **labels}
    found = [
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


@pytest.fixture(scope="module")
def url(tinystories_server: LiveServer) -> str:
    return tinystories_server.url


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[OpenAI]:
    c = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def steering(scale: float) -> dict[str, Any]:
    return {"steering": {"vectors": [{"directions": {"1": torch.ones(128).tolist()}, "scale": scale}]}}


# ------------------------------------------------------------------------------------------ contract


def test_names_labels_and_buckets(url: str, client: OpenAI) -> None:
    client.completions.create(
        model=MODEL, prompt="Once", max_tokens=3, extra_body={"interventions": steering(0.5)}
    )
    samples = scrape(url)
    assert samples
    assert all(s.labels.get("model_name") == MODEL for s in samples), "label model_name on everything"
    names = {s.name for s in samples}
    for h in HISTOGRAMS:
        assert {f"{h}_bucket", f"{h}_count", f"{h}_sum"} <= names, h
    for g in GAUGES:
        assert g in names, g
    for c in COUNTERS[:2]:
        assert c in names, c
    for name, (label, values) in LABELLED.items():
        assert values <= {s.labels[label] for s in samples if s.name == name}, name
    text = httpx.get(f"{url}/metrics").text
    assert "# TYPE actserve_num_preemptions_total counter" in text
    for name, wanted in BUCKETS.items():
        les = {float(s.labels["le"]) for s in samples if s.name == f"{name}_bucket"}
        assert wanted <= les, (name, sorted(les))
        assert float("inf") in les
    assert 0.0 <= value(samples, "actserve_kv_cache_usage_perc") <= 1.0
    assert value(samples, "actserve_cpu_memory_bytes", kind="rss") > 0


def test_counters_move_by_the_usage_counts(url: str, client: OpenAI) -> None:
    before = scrape(url)
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time there was a cat", max_tokens=7, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("actserve_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("actserve_generation_tokens_total") == r.usage.completion_tokens == 7
    assert delta("actserve_request_success_total", finished_reason="length") == 1
    assert delta("actserve_request_success_total", finished_reason="stop") == 0
    assert delta("actserve_request_success_total", finished_reason="abort") == 0
    for h in ("actserve_time_to_first_token_seconds", "actserve_e2e_request_latency_seconds",
              "actserve_request_queue_time_seconds", "actserve_request_prefill_time_seconds",
              "actserve_request_decode_time_seconds"):  # fmt: skip
        assert delta(f"{h}_count") == 1, h
    assert delta("actserve_inter_token_latency_seconds_count") == 6  # 7 tokens, 6 gaps
    assert delta("actserve_e2e_request_latency_seconds_sum") > 0
    assert value(after, "actserve_num_requests_running") == 0
    assert value(after, "actserve_kv_cache_usage_perc") == 0


def test_streamed_n_and_chat_count_too(url: str, client: OpenAI) -> None:
    before = scrape(url)
    stream = client.completions.create(
        model=MODEL, prompt="The dog", max_tokens=5, temperature=0.7, seed=1, n=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [ch.usage for ch in stream if ch.usage is not None][-1]
    stopped = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0,
                                        stop=[" a"])  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # the prompt of an n=2 request is processed and counted once, both choices' tokens count
    assert delta("actserve_prompt_tokens_total") == usage.prompt_tokens + stopped.usage.prompt_tokens
    assert (
        delta("actserve_generation_tokens_total") == usage.completion_tokens + stopped.usage.completion_tokens
    )
    assert delta("actserve_request_success_total", finished_reason="stop") == 1


def test_intervention_counter(url: str, client: OpenAI) -> None:
    """Steering declares no label of its plans: its sequences count under value="" (per-kind labels:
    tests/test_precision.py)."""
    labels = {"intervention": "steering", "value": ""}
    before = value(scrape(url), "actserve_intervention_requests_total", **labels)
    client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=2, extra_body={"interventions": steering(1.0)}
    )
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    after = value(scrape(url), "actserve_intervention_requests_total", **labels)
    assert after - before == 1


# -------------------------------------------------------------------------------------- disconnect


def test_client_disconnect_aborts_while_others_complete(url: str, client: OpenAI) -> None:
    # long enough to still be running when the scrape below looks (in process mode a scrape is an RPC
    # to the engine core, so on a loaded machine 120 tokens could finish before it was ever seen)
    other = {"model": MODEL, "prompt": "Tom had a big red ball. He", "max_tokens": 400, "temperature": 0,
             "ignore_eos": True}  # fmt: skip
    solo = httpx.post(f"{url}/v1/completions", json=other, timeout=60).json()["choices"][0]["text"]
    aborts0 = value(scrape(url), "actserve_request_success_total", finished_reason="abort")
    result: dict[str, Any] = {}

    def run_other() -> None:
        result["body"] = httpx.post(f"{url}/v1/completions", json=other, timeout=60).json()

    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    worker = threading.Thread(target=run_other)
    worker.start()
    assert wait_for(lambda: value(scrape(url), "actserve_num_requests_running") == 1)
    with httpx.Client(timeout=60) as hc, hc.stream("POST", f"{url}/v1/completions", json=long) as r:
        assert r.status_code == 200
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        next(events), next(events)
        # leaving the block closes the connection mid-stream, while the other request still runs
    assert wait_for(
        lambda: value(scrape(url), "actserve_request_success_total", finished_reason="abort") == aborts0 + 1
    ), "the disconnected stream's sequence was not aborted"
    worker.join(timeout=60)
    assert result["body"]["choices"][0]["text"] == solo
    assert result["body"]["choices"][0]["finish_reason"] == "length"
    assert wait_for(lambda: value(scrape(url), "actserve_num_requests_running") == 0)
    samples = scrape(url)
    assert value(samples, "actserve_kv_cache_usage_perc") == 0
    assert value(samples, "actserve_request_success_total", finished_reason="abort") == aborts0 + 1


def test_non_streamed_request_is_aborted_when_the_client_goes(url: str) -> None:
    """Hang up on a non-streamed completion while its sequence runs: the sequence is aborted. (It used to
    be seen only by a 0.25 s poll, after which a short request, 480 tokens in 0.4 s in process mode, had
    often finished already: this test then failed, or passed when the machine was slow.)"""
    samples = scrape(url)
    aborts0 = value(samples, "actserve_request_success_total", finished_reason="abort")
    prompts0 = value(samples, "actserve_prompt_tokens_total")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}
    data = json.dumps(body).encode()
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.encode() + data)
        # hang up once the sequence has its first token (its prompt is counted then)
        assert wait_for(lambda: value(scrape(url), "actserve_prompt_tokens_total") > prompts0, timeout=30)
    assert wait_for(
        lambda: value(scrape(url), "actserve_request_success_total", finished_reason="abort") == aborts0 + 1,
        timeout=30.0,
    ), "the sequence of a client that hung up was not aborted"
    # the server goes on serving
    ok = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_watch_disconnect_reacts_to_the_disconnect_message_itself() -> None:
    """No poll period: the watcher returns as soon as the server delivers `http.disconnect`."""

    async def main() -> bool:
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        seen = asyncio.Event()
        request = Request({"type": "http", "method": "POST", "headers": []}, receive)
        watcher = asyncio.create_task(watch_disconnect(request, seen.set))
        await asyncio.sleep(0)
        gone.set()
        for _ in range(5):  # a few event-loop turns, no wall-clock wait
            await asyncio.sleep(0)
        watcher.cancel()
        return seen.is_set()

    assert asyncio.run(main())


def test_many_client_disconnects_abort_their_sequences(url: str) -> None:
    """130 streamed clients (more than --max-num-seqs: some still queued) hang up together: every
    sequence is aborted, none is left running or waiting, and the KV cache is empty."""
    n = 130
    samples = scrape(url)
    aborts0 = value(samples, "actserve_request_success_total", finished_reason="abort")
    done0 = value(samples, "actserve_request_success_total", finished_reason="length")
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True,
            "stream": True}  # fmt: skip

    async def main() -> None:
        accepted, hang_up = [0], asyncio.Event()
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as ac:

            async def one() -> None:
                async with ac.stream("POST", f"{url}/v1/completions", json=long) as r:
                    assert r.status_code == 200
                    accepted[0] += 1
                    await hang_up.wait()  # leaving the block closes the connection mid-stream

            tasks = [asyncio.create_task(one()) for _ in range(n)]
            while accepted[0] < n and not any(t.done() for t in tasks):
                await asyncio.sleep(0.05)
            hang_up.set()
            await asyncio.gather(*tasks)

    asyncio.run(main())

    def settled() -> bool:
        s = scrape(url)
        aborted = value(s, "actserve_request_success_total", finished_reason="abort") - aborts0
        finished = value(s, "actserve_request_success_total", finished_reason="length") - done0
        return aborted + finished == n

    assert wait_for(settled, timeout=60)
    samples = scrape(url)
    assert value(samples, "actserve_request_success_total", finished_reason="abort") - aborts0 == n
    assert value(samples, "actserve_num_requests_running") == 0
    assert value(samples, "actserve_num_requests_waiting") == 0
    assert value(samples, "actserve_kv_cache_usage_perc") == 0


# --------------------------------------------------------------------------------------- preemption


@pytest.fixture(scope="module")
def small_kv_server(tinystories_dir: Path) -> Iterator[LiveServer]:
    server = start_server(tinystories_dir, max_model_len=64, num_kv_blocks=4)  # 64 tokens of KV in all
    yield server
    server.stop()


def test_every_series_is_exported_from_startup(small_kv_server: LiveServer) -> None:
    samples = scrape(small_kv_server.url)  # nothing has been sent to this server yet
    assert value(samples, "actserve_request_success_total", finished_reason="abort") == 0
    assert value(samples, "actserve_num_requests_running") == 0
    assert value(samples, "actserve_prompt_tokens_total") == 0
    assert value(samples, "actserve_num_preemptions_total") == 0
    assert value(samples, "actserve_weight_bytes", format="float32") > 0
    for h in HISTOGRAMS:
        assert value(samples, f"{h}_count") == 0, h


def test_preemption_is_counted_and_output_unchanged(small_kv_server: LiveServer) -> None:
    prompts = ["Once upon a time", "The little dog was"]

    async def main() -> tuple[list[str], list[str]]:
        ac = AsyncOpenAI(base_url=f"{small_kv_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        try:

            async def one(p: str) -> str:
                r = await ac.completions.create(
                    model=MODEL, prompt=p, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
                )
                assert r.usage.completion_tokens == 40
                return r.choices[0].text

            solo = [await one(p) for p in prompts]
            together = await asyncio.gather(*(one(p) for p in prompts))
            return solo, list(together)
        finally:
            await ac.close()

    solo, together = asyncio.run(main())
    assert together == solo
    samples = scrape(small_kv_server.url)
    assert value(samples, "actserve_num_preemptions_total") >= 1
    assert value(samples, "actserve_num_requests_running") == 0
    assert value(samples, "actserve_kv_cache_usage_perc") == 0


# ------------------------------------------------------- last: leaves the gauges stale when it fails


def test_gauges_return_to_zero_after_the_last_request_is_aborted(url: str) -> None:
    aborts0 = value(scrape(url), "actserve_request_success_total", finished_reason="abort")
    long = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 480,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as hc, hc.stream("POST", f"{url}/v1/completions", json=long) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        next(lines), next(lines)
    assert wait_for(
        lambda: value(scrape(url), "actserve_request_success_total", finished_reason="abort") == aborts0 + 1
    )
    assert wait_for(lambda: value(scrape(url), "actserve_num_requests_running") == 0, timeout=2)
    assert value(scrape(url), "actserve_kv_cache_usage_perc") == 0
