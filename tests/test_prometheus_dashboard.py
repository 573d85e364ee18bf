"""A real Prometheus (Debian's binary, unpacked by scripts/setup.sh into .venv/bin) scrapes two live servers
every second while they serve every intervention the CPU runs, and the PromQL of every panel of
deploy/grafana-dashboard.json must then return data: a finite value for each of its queries.

Server A is TinyStories-656K with steering, FP4 precision copies, a sparsity calibration, KV retrieval and
a host KV tier; server B a random-init Qwen3-MoE with offloaded experts (expert cache, prefetch, CPU
experts). Both run on the CPU, so the panels that show only device metrics still get series (zeros)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import LiveServer, free_port, save_random_model, start_server
from tests.test_moe_models import FAMILIES, VOCAB

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
PROMETHEUS = Path(os.environ.get("ACTSERVE_PROMETHEUS", Path(sys.prefix) / "bin" / "prometheus"))

# Panels whose queries may return nothing on these CPU servers, each with why. Every other panel must
# return data; an excused panel must return none (so a stale excuse fails too). None are excused today:
# the CPU serves every intervention, and the device-memory series exist at zero.
EXCUSED: dict[str, str] = {}
# panels the load below must move above zero (the others may rightly read 0: idle queues, device memory
# on the CPU, experts the cost model did not run on the host)
ACTIVE = [
    "Tokens / s",
    "Intervention requests by kind",
    "Prefix cache hit rate",
    "Steering slots in use",
    "Precision mix",
    "Achieved sparsity",
    "Expert cache hit rate",
    "Expert prefetch precision / recall",
    "Expert bytes moved",
    "KV blocks retrieved per layer and step",
    "KV host tier traffic",
]


def panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text())["panels"]


def promql(expr: str) -> str:
    """A panel's query as Grafana would send it: all models, a one-minute rate window."""
    return expr.replace("$__rate_interval", "1m").replace("$model_name", ".*")


def test_dashboard_is_well_formed() -> None:
    """Unique ids and refIds, whole-number grid positions, every query on an actserve_ metric, and the
    excused titles are panels."""
    ps = panels()
    assert len({p["id"] for p in ps}) == len(ps)
    titles = {p["title"] for p in ps}
    assert set(EXCUSED) <= titles and set(ACTIVE) <= titles and not set(EXCUSED) & set(ACTIVE)
    for p in ps:
        assert all(isinstance(p["gridPos"][k], int) for k in ("x", "y", "w", "h")), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(refs)) == len(refs), p["title"]
        assert all("actserve_" in t["expr"] for t in p["targets"]), p["title"]


@pytest.fixture(scope="module")
def prometheus_bin() -> Path:
    if not PROMETHEUS.is_file():
        msg = f"no Prometheus binary at {PROMETHEUS}: scripts/setup.sh unpacks Debian's package there"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return PROMETHEUS


@pytest.fixture(scope="module")
def servers(
    tinystories_dir: Path, sparsity_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer]]:
    options = {
        "steering": {"vectors_dir": str(tmp_path_factory.mktemp("vectors"))},
        "precision": {"precisions": ["nvfp4"]},
        "sparsity": {"calibration": str(sparsity_calibration)},
        "kv_retrieval": {"slots": 4, "max_budget_tokens": 256, "methods": "actqkv,infllm,quest"},
    }
    dense = start_server(tinystories_dir, num_kv_blocks=256, block_size=8, kv_offload_gb=0.001,
                         engine_process="off", plugin_options=options)  # fmt: skip
    moe_dir = save_random_model(
        FAMILIES["qwen3moe-normtopk-headdim"](), tmp_path_factory.mktemp("moe") / "q3"
    )
    try:
        moe = start_server(moe_dir, num_kv_blocks=64, block_size=8, max_model_len=256, resident_experts=0.25,
                           expert_prefetch_depth=1, engine_process="off")  # fmt: skip
    except BaseException:
        dense.stop()
        raise
    yield dense, moe
    moe.stop()
    dense.stop()


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bin: Path, servers: tuple[LiveServer, LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    work = tmp_path_factory.mktemp("prometheus")
    targets = [s.url.removeprefix("http://") for s in servers]
    (work / "prometheus.yml").write_text(
        json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "actserve", "static_configs": [{"targets": targets}]}],
        })
    )  # fmt: skip
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [str(prometheus_bin), f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready in 30 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(url: str, expr: str) -> list[float]:
    """The values of an instant query (raises on a PromQL error)."""
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return [float(s["value"][1]) for s in body["data"]["result"]]


def send_load(dense: LiveServer, moe: LiveServer) -> None:
    """Every intervention the CPU serves, plus shared prompts (prefix-cache hits), concurrently."""
    g = torch.Generator().manual_seed(int(time.time()))
    directions = {"1": torch.randn(128, generator=g).tolist()}
    r = httpx.post(f"{dense.url}/v1/steering/vectors", json={"name": "calm", "directions": directions})
    assert r.status_code in (200, 201), r.text
    shared = torch.randint(3, 2000, (48,), generator=g).tolist()
    long = [torch.randint(3, 2000, (90,), generator=g).tolist() for _ in range(4)]
    kinds: list[tuple[str, Any, Any]] = [
        (dense.url, shared, None),
        (dense.url, shared + [5], None),
        (dense.url, "Once upon a time", {"steering": {"vectors": [{"name": "calm", "scale": 2.0}]}}),
        (dense.url, "The cat", {"steering": {"vectors": [{"directions": directions, "scale": 1.0}]}}),
        (dense.url, "The dog", {"precision": {"weights": "nvfp4"}}),
        (dense.url, "A girl", {"sparsity": {"method": "teal", "level": 0.5}}),
        *[(dense.url, p, {"kv_retrieval": {"method": m, "budget_tokens": 32, "sink_tokens": 8,
                                           "window_tokens": 8}})
          for p, m in zip(long, ["quest", "actqkv", "infllm", "quest"], strict=True)],
        *[(moe.url, torch.randint(3, VOCAB, (12,), generator=g).tolist(), None) for _ in range(3)],
    ]  # fmt: skip

    def one(item: tuple[str, Any, Any]) -> None:
        url, prompt, interventions = item
        body = {"prompt": prompt, "max_tokens": 8, "min_tokens": 8, "temperature": 0}
        if interventions is not None:
            body["interventions"] = interventions
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, (interventions, resp.text)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):  # rounds over several scrapes
            list(pool.map(one, kinds))
            time.sleep(1.5)


def test_every_panel_returns_data(prometheus: str, servers: tuple[LiveServer, LiveServer]) -> None:
    dense, moe = servers
    deadline = time.monotonic() + 30
    while query(prometheus, 'up{job="actserve"}') != [1.0, 1.0]:  # scraped before the load starts
        assert time.monotonic() < deadline, "Prometheus did not scrape both servers in 30 s"
        time.sleep(0.2)
    send_load(dense, moe)
    ps = panels()
    expected = {(p["title"], t["refId"]): promql(t["expr"]) for p in ps if p["title"] not in EXCUSED
                for t in p["targets"]}  # fmt: skip
    missing: dict[tuple[str, str], list[float]] = {}
    deadline = time.monotonic() + 30
    while True:  # the last scrapes land within a few seconds
        missing = {}
        for key, expr in expected.items():
            values = query(prometheus, expr)
            if not any(math.isfinite(v) for v in values):
                missing[key] = values
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not missing, f"panels without data: {missing}"
    for title in ACTIVE:  # the load moved these: a zero would mean the metric is not fed
        exprs = [promql(t["expr"]) for p in ps if p["title"] == title for t in p["targets"]]
        assert exprs and max(v for e in exprs for v in query(prometheus, e)) > 0, title
    for p in ps:
        if p["title"] in EXCUSED:
            for t in p["targets"]:
                assert query(prometheus, promql(t["expr"])) == [], (p["title"], "has data: drop its excuse")
