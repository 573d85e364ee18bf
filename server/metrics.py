"""Prometheus collectors with vLLM's names (prefix `actserve_`) and buckets, so its dashboards work."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]  # fmt: skip
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


class EngineMetrics:
    """All collectors of one served model, in their own registry (several engines can share a process)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r, lbl = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(f"actserve_{name}", doc, lbl, buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS)
        self.prefill = hist(
            "request_prefill_time_seconds", "First scheduled to first token.", REQUEST_BUCKETS
        )
        self.decode = hist("request_decode_time_seconds", "First token to last token.", REQUEST_BUCKETS)
        self.running = Gauge(
            "actserve_num_requests_running", "Sequences in the running batch.", lbl, registry=r
        )
        self.waiting = Gauge("actserve_num_requests_waiting", "Sequences waiting to run.", lbl, registry=r)
        self.kv_usage = Gauge(
            "actserve_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", lbl, registry=r
        )
        self.prompt_tokens = Counter("actserve_prompt_tokens", "Prompt tokens processed.", lbl, registry=r)
        self.generation_tokens = Counter("actserve_generation_tokens", "Tokens generated.", lbl, registry=r)
        self.success = Counter(
            "actserve_request_success", "Finished requests by reason.", lbl + ["finished_reason"], registry=r
        )
        # vLLM's names: prompt tokens looked up in the prefix cache, and of them those found (reused)
        self.prefix_queries = Counter(
            "actserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", lbl, registry=r
        )
        self.prefix_hits = Counter(
            "actserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", lbl, registry=r
        )
        self.preemptions = Counter(
            "actserve_num_preemptions", "Sequences preempted (recompute).", lbl, registry=r
        )
        self.gpu_memory = Gauge(
            "actserve_gpu_memory_bytes", "GPU memory by kind.", lbl + ["kind"], registry=r
        )
        self.cpu_memory = Gauge(
            "actserve_cpu_memory_bytes", "CPU memory by kind.", lbl + ["kind"], registry=r
        )
        # admitted sequences carrying each plugin's plan; `value`: the plugin's label of the plan
        # (InterventionPlugin.metric_label, e.g. which weights the request runs on), "" when it gives none
        self.interventions = Counter(
            "actserve_intervention_requests",
            "Sequences admitted with an intervention, by plugin and the plugin's label of the plan.",
            lbl + ["intervention", "value"],
            registry=r,
        )
        # the model's parameters by how they are stored (wherever they live; on CUDA they sum to
        # actserve_gpu_memory_bytes{kind="weights"}): a dtype for dense tensors, an FP4 kind for packed ones
        self.weight_bytes = Gauge(
            "actserve_weight_bytes", "Weight bytes by storage format.", lbl + ["format"], registry=r
        )
        # the paged KV cache by tier (docs/architecture.md §3, "KV tiers"): blocks some sequence holds, and
        # the bytes moved between the GPU and the host tier
        self.kv_blocks = Gauge(
            "actserve_kv_blocks",
            "KV blocks held by sequences, by tier (gpu, cpu).",
            lbl + ["tier"],
            registry=r,
        )
        self.kv_transfer = Counter(
            "actserve_kv_transfer_bytes",
            "KV bytes copied between the GPU and the host tier, by direction (to_host, to_device).",
            lbl + ["direction"],
            registry=r,
        )
        # plugins' own cumulative counters (InterventionPlugin.stats), e.g. KV blocks retrieved
        self.plugin_stats = Counter(
            "actserve_intervention_stat", "Plugins' own counters.", lbl + ["intervention", "stat"], registry=r
        )
        # plugins' own levels (InterventionPlugin.gauges), e.g. steering slots in use
        self.plugin_gauges = Gauge(
            "actserve_intervention_gauge", "Plugins' own levels.", lbl + ["intervention", "gauge"], registry=r
        )
        self._transfer = {"to_host": 0, "to_device": 0}
        self._stats: dict[tuple[str, str], float] = {}
        for tier in ("gpu", "cpu"):
            self.kv_blocks.labels(model_name, tier)
        for direction in self._transfer:
            self.kv_transfer.labels(model_name, direction)
        for reason in ("stop", "length", "abort", "error"):
            self.success.labels(model_name, reason)
        # every series exists from the start (at zero), as vLLM exports them, so rate() has a baseline
        hists = (self.ttft, self.itl, self.e2e, self.queue, self.prefill, self.decode)
        others = (
            self.running,
            self.waiting,
            self.kv_usage,
            self.prompt_tokens,
            self.generation_tokens,
            self.preemptions,
        )
        for metric in (*hists, *others):
            metric.labels(model_name)
        self._weights_bytes = 0
        self._kv_bytes = 0
        self.pinned_bytes = 0  # the KV host tier's (pinned on CUDA)
        self._on_gpu = False
        # plugins' per-request histograms (`add_plugin_histograms`), by their name without the prefix
        self.plugin_histograms: dict[str, tuple[Histogram, int]] = {}
        self._pinned = 0
        self._model_series: dict[str, Any] = {}
        self._model_totals: dict[str, float] = {}

    def add_plugin_histograms(self, specs: Sequence[Any]) -> None:
        """Create plugins' per-request histograms (`PluginHistogram`: name, doc, labels, buckets) as
        `actserve_<name>{model_name, *labels}`."""
        for h in specs:
            hist = Histogram(
                f"actserve_{h.name}", h.doc, ["model_name", *h.labels], buckets=list(h.buckets),
                registry=self.registry,
            )  # fmt: skip
            self.plugin_histograms[h.name] = (hist, len(h.labels))

    def observe_plugin(self, name: str, labels: Sequence[str], value: float) -> None:
        """One plugin observation (`Observation`); an undeclared name or wrong labels are ignored."""
        found = self.plugin_histograms.get(name)
        if found is not None and len(labels) == found[1]:
            found[0].labels(self.model_name, *labels).observe(value)

    def add_model_series(self, series: Iterable[Any]) -> None:
        """Series a part of the model declares (objects with `name`, `kind` counter / gauge / histogram,
        `doc`, `buckets`: server/layers/telemetry.py), registered as `actserve_<name>` at zero."""
        r, lbl = self.registry, ["model_name"]
        for s in series:
            name = f"actserve_{s.name}"
            if s.kind == "counter":
                metric: Any = Counter(name, s.doc, lbl, registry=r)
            elif s.kind == "gauge":
                metric = Gauge(name, s.doc, lbl, registry=r)
            else:
                metric = Histogram(name, s.doc, lbl, buckets=list(s.buckets), registry=r)
            metric.labels(self.model_name)
            self._model_series[s.name] = metric
            self._model_totals[s.name] = 0.0

    def update_model_series(
        self, counters: Mapping[str, float], gauges: Mapping[str, float], samples: Mapping[str, list[float]]
    ) -> None:
        """The model's numbers as they are now: counter totals (the increase since the last call is added),
        gauge values, and new histogram samples."""
        m = self.model_name
        for name, total in counters.items():
            grown = total - self._model_totals.get(name, 0.0)
            if grown > 0:
                self._model_series[name].labels(m).inc(grown)
            self._model_totals[name] = total
        for name, value in gauges.items():
            self._model_series[name].labels(m).set(value)
        for name, values in samples.items():
            for v in values:
                self._model_series[name].labels(m).observe(v)

    def set_kv_transfer(self, to_host: int, to_device: int) -> None:
        """The host tier's byte totals so far (counted by the tier; the counters follow)."""
        for direction, total in (("to_host", to_host), ("to_device", to_device)):
            if total > self._transfer[direction]:
                self.kv_transfer.labels(self.model_name, direction).inc(total - self._transfer[direction])
                self._transfer[direction] = total

    def set_plugin_stats(self, stats: Mapping[tuple[str, str], float]) -> None:
        """Plugins' cumulative counters ((plugin, name) -> total so far); the counters follow."""
        for (plugin, name), total in stats.items():
            seen = self._stats.get((plugin, name), 0.0)
            if total > seen:
                self.plugin_stats.labels(self.model_name, plugin, name).inc(total - seen)
                self._stats[(plugin, name)] = total

    def set_plugin_gauges(self, gauges: Mapping[tuple[str, str], float]) -> None:
        """Plugins' levels as they are now ((plugin, name) -> value)."""
        for (plugin, name), value in gauges.items():
            self.plugin_gauges.labels(self.model_name, plugin, name).set(value)

    def set_static_memory(
        self, weights_by_format: Mapping[str, int], kv_bytes: int, on_gpu: bool, pinned_bytes: int = 0
    ) -> None:
        """Weights and KV sizes are fixed after start-up; where they live decides which gauge holds them.
        `weights_by_format`: bytes by storage format (their sum is the weights' total); `pinned_bytes`:
        page-locked host memory the model holds (offloaded experts on CUDA)."""
        for fmt, size in weights_by_format.items():
            self.weight_bytes.labels(self.model_name, fmt).set(size)
        self._weights_bytes, self._kv_bytes = sum(weights_by_format.values()), kv_bytes
        self._on_gpu, self._pinned = on_gpu, pinned_bytes
        self.refresh_memory()

    def set_rank_memory(self, ranks: list[dict[str, int]]) -> None:
        """Tensor parallelism: each rank's weights and KV cache bytes (fixed after start-up), as
        `actserve_tp_rank_memory_bytes{rank, kind}`; the other memory gauges are rank 0's."""
        gauge = Gauge(
            "actserve_tp_rank_memory_bytes",
            "Tensor parallelism: each rank's weights and KV cache bytes.",
            ["model_name", "rank", "kind"],
            registry=self.registry,
        )
        for r in ranks:
            for kind in ("weights", "kv_cache"):
                gauge.labels(self.model_name, str(r["rank"]), kind).set(r[kind])

    def refresh_memory(self) -> None:
        m = self.model_name
        self.cpu_memory.labels(m, "rss").set(psutil.Process().memory_info().rss)
        self.cpu_memory.labels(m, "pinned").set(self._pinned + self.pinned_bytes)
        gpu = self.gpu_memory
        if self._on_gpu and torch.cuda.is_available():
            gpu.labels(m, "weights").set(self._weights_bytes)
            gpu.labels(m, "kv_cache").set(self._kv_bytes)
            gpu.labels(m, "allocated").set(torch.cuda.memory_allocated())
            gpu.labels(m, "reserved").set(torch.cuda.memory_reserved())
        else:
            for kind in ("weights", "kv_cache", "allocated", "reserved"):
                gpu.labels(m, kind).set(0)
