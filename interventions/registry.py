"""Discovers plugins through the `actserve.interventions` entry-point group and routes request specs."""

from __future__ import annotations

import importlib
import logging
import pickle
from collections.abc import Hashable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch

from actserve.interventions.base import (
    InterventionError,
    InterventionPlugin,
    Observation,
    PluginHistogram,
    RowSpan,
)
from actserve.server.contract import ModelInfo
from actserve.server.contract.hooks import BoundHooks, StepHooks
from actserve.server.contract.kv_space import KVResidency, KVSpace, KVTier
from actserve.server.contract.weights import FormatRequest

log = logging.getLogger(__name__)
GROUP = "actserve.interventions"
TP_MODES = ("replicated", "rank0")  # `InterventionPlugin.tp_mode` values that run under tensor parallelism


def source_tree_plugins() -> dict[str, str]:
    """The plugins this source tree's pyproject.toml declares (name -> "module:Class"), for running from a
    checkout whose package metadata is not installed (the GPU machine links the tree into its path)."""
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.exists():  # an installed wheel: its metadata has the entry points
        return {}
    project = tomllib.loads(path.read_text()).get("project", {})
    return dict(project.get("entry-points", {}).get(GROUP, {}))


def discover() -> dict[str, type[InterventionPlugin]]:
    found: dict[str, type[InterventionPlugin]] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception:  # noqa: BLE001 - one broken plugin must not stop the server
            log.exception("intervention plugin %s failed to load", ep.name)
            continue
        found[cls.name] = cls
    for name, target in source_tree_plugins().items():  # a source tree without installed metadata
        if name not in found:
            module, _, attr = target.partition(":")
            found[name] = getattr(importlib.import_module(module), attr)
    return found


def check_tp_options(
    classes: Mapping[str, type[InterventionPlugin]] | None, options: Mapping[str, Any], tp: int
) -> None:
    """ValueError when options were given to a plugin that does not run with `tp` > 1 tensor-parallel
    ranks (its flags would be ignored otherwise). `classes`: None = the installed plugins."""
    if tp <= 1:
        return
    classes = discover() if classes is None else classes
    for name, opts in sorted(options.items()):
        cls = classes.get(name)
        if opts and cls is not None and cls.tp_mode not in TP_MODES:
            raise ValueError(
                f"options {sorted(opts)} of the {name} intervention were given, but {name} does not run "
                f"with --tensor-parallel-size {tp}; drop its flags or serve with --tensor-parallel-size 1"
            )


class InterventionRegistry:
    """The plugins of one loaded model; turns request specs into plans and plans into step hooks.

    It names no plugin: plugins get their options from `options[name]` (`configure`), find each other
    through `plugin(name)` / `InterventionPlugin.peer`, and a plugin that declares `contributes_to`
    has its rows grouped with the named plugin's rows (one hook, one fused kernel)."""

    def __init__(
        self,
        model_info: ModelInfo,
        plugins: dict[str, type[InterventionPlugin]] | None = None,
        options: Mapping[str, Any] | None = None,
    ):
        """`options`: plugin name -> that plugin's options (`EngineConfig.plugin_options`)."""
        classes = plugins if plugins is not None else discover()
        self.device = model_info.device
        options = options or {}
        # tensor parallelism (docs/architecture.md §12): plugins that do not declare how they run over
        # several ranks are not loaded; their requests get a 400 saying why, their options stop the server
        tp = model_info.tensor_parallel_size
        self.refused: dict[str, str] = {}
        if tp > 1:
            check_tp_options(classes, options, tp)
            for name in sorted(n for n, c in classes.items() if c.tp_mode not in TP_MODES):
                self.refused[name] = (
                    f"{name} does not run with tensor parallelism (this server splits the model over "
                    f"--tensor-parallel-size {tp} ranks); serve it with --tensor-parallel-size 1"
                )
            classes = {n: c for n, c in classes.items() if n not in self.refused}
            if self.refused:
                log.info(
                    "tensor parallelism: interventions %s are not available (they refuse requests)",
                    sorted(self.refused),
                )
        self.plugins: dict[str, InterventionPlugin] = {n: c(model_info) for n, c in sorted(classes.items())}
        # tensor parallelism on rank 0: the activations and releases of "replicated" plugins' plans since
        # the runner last sent a step to the other ranks (None: not recorded)
        self.journal: list[tuple[str, str, bytes]] | None = None
        for plugin in self.plugins.values():
            plugin.bind(self.plugins)
        for name, plugin in self.plugins.items():
            plugin.configure(options.get(name) or {})
        # the plugin (at most one) whose rows go through the fused residual-add + table + norm kernel
        self.fused: InterventionPlugin | None = next(
            (p for p in self.plugins.values() if p.fused_table() is not None), None
        )

    def plugin(self, name: str) -> InterventionPlugin | None:
        return self.plugins.get(name)

    def service(self, name: str) -> Any:
        """The service plugin `name` owns (e.g. steering's vector library); None if none or not loaded."""
        plugin = self.plugins.get(name)
        return None if plugin is None else plugin.service

    def graph_width(self) -> int:
        """Per-row columns of a fused CUDA-graph step: the fused plugin's plus its contributors'."""
        if self.fused is None:
            return 0
        name = self.fused.name
        return self.fused.graph_columns + sum(
            p.graph_columns for p in self.plugins.values() if p.contributes_to == name
        )

    def owner(self, name: str) -> str:
        """The plugin whose hook takes `name`'s rows: the one it contributes to, if loaded, else itself."""
        target = self.plugins[name].contributes_to
        return target if target is not None and target in self.plugins else name

    def group_spans(self, spans: dict[str, list[RowSpan]]) -> dict[str, list[RowSpan]]:
        """A step's rows by the plugin whose hook runs them (contributors' rows join their owner's)."""
        groups: dict[str, list[RowSpan]] = {}
        for key, rows in spans.items():
            groups.setdefault(self.owner(key), []).extend(rows)
        return groups

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "description": p.description,
                "hook_points": list(p.hook_points),
                "schema": p.json_schema(),
            }
            for p in self.plugins.values()
        ]

    def prepare(self, spec: dict[str, Any] | None) -> dict[str, Any]:
        """Validate a request's `interventions` object; returns plugin name -> plan."""
        if not spec:
            return {}
        if not isinstance(spec, dict):
            raise InterventionError("interventions must be an object", "interventions")
        plans: dict[str, Any] = {}
        try:
            for key, value in spec.items():
                plugin = self.plugins.get(key)
                if key in self.refused:
                    raise InterventionError(self.refused[key], f"interventions.{key}")
                if plugin is None:
                    raise InterventionError(
                        f"unknown intervention {key!r}; available: {sorted(self.plugins)}",
                        f"interventions.{key}",
                    )
                parsed = plugin.parse(value, f"interventions.{key}")
                plan = plugin.prepare(parsed, f"interventions.{key}")
                if plan is not None:  # None: nothing beyond a plain request (InterventionPlugin.prepare)
                    plans[key] = plan
        except Exception:
            self.release(plans)  # a later key refused: give back what the earlier plans hold (slots)
            raise
        return plans

    def prepare_many(self, spec: dict[str, Any] | None, count: int) -> list[dict[str, Any]]:
        """`count` independent plan sets for one spec (a request's n choices); all or nothing."""
        made: list[dict[str, Any]] = []
        try:
            for _ in range(count):
                made.append(self.prepare(spec))
        except Exception:
            for plans in made:
                self.release(plans)
            raise
        return made

    def needs_output_tokens(self, plans: dict[str, Any]) -> bool:
        """Whether a plugin of these plans reads the sequence's generated tokens on the host each step."""
        return any(self.plugins[key].needs_output_tokens for key in plans)

    def late_logits(self, plans: dict[str, Any]) -> frozenset[str] | None:
        """The plugins of `plans` that read the generated tokens on the host, when all of them hook the
        logits only (their hooks can be bound after the step's forward is launched, before sampling);
        None when one hooks anything else (the step must wait for the previous tokens)."""
        keys = [key for key in plans if self.plugins[key].needs_output_tokens]
        if any(set(self.plugins[key].hook_points) != {"logits"} for key in keys):
            return None
        return frozenset(keys)

    def activate(self, plans: dict[str, Any]) -> None:
        for key, plan in plans.items():
            self._record("activate", key, plan)
            self.plugins[key].activate(plan)

    def release(self, plans: dict[str, Any]) -> None:
        for key, plan in plans.items():
            self._record("release", key, plan)
            self.plugins[key].release(plan)

    def _record(self, what: str, key: str, plan: Any) -> None:
        """Journal a replicated plugin's call with the plan as it is before the call (a plugin may mark
        its plan active or released, and the other ranks must replay the call on the same state)."""
        if self.journal is not None and self.plugins[key].tp_mode == "replicated":
            self.journal.append((what, key, pickle.dumps(plan)))

    def take_journal(self) -> list[tuple[str, str, bytes]]:
        """The recorded activations and releases, in order, and a fresh record (tensor parallelism: rank 0
        sends them with the next step, and the other ranks replay them on their plugins first)."""
        taken, self.journal = self.journal or [], [] if self.journal is not None else None
        return taken

    def replay(self, journal: list[tuple[str, str, bytes]]) -> None:
        """Another rank's activations and releases on these plugins (tensor parallelism's other ranks)."""
        for what, key, data in journal:
            plan = pickle.loads(data)  # noqa: S301 - rank 0's own plans, over the ranks' private channel
            if what == "activate":
                self.plugins[key].activate(plan)
            else:
                self.plugins[key].release(plan)

    def host_row_inputs(
        self, plugin: InterventionPlugin, spans: list[RowSpan], num_rows: int
    ) -> dict[str, np.ndarray]:
        """`plugin`'s declared per-row inputs of one step on the host: arrays [rows, width] pre-filled
        with each input's `none`, then filled by the plugin for its rows."""
        arrays = {}
        for spec in plugin.row_inputs:
            dtype = torch.empty(0, dtype=spec.dtype).numpy().dtype
            arrays[spec.name] = np.full((num_rows, spec.width), spec.none, dtype=dtype)
        if arrays:
            plugin.fill_row_inputs(spans, arrays)
        return arrays

    def row_inputs(self, plugin: InterventionPlugin, spans: list[RowSpan], num_rows: int) -> dict[str, Any]:
        """`host_row_inputs` on the model's device (name -> [rows, width])."""
        arrays = self.host_row_inputs(plugin, spans, num_rows)
        return {k: self._to_device(v) for k, v in arrays.items()}

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the model's device. CUDA: through pinned memory, without waiting: a late logits
        hook's inputs (`LateLogitsStep`) are copied while the step's forward still runs, and a pageable copy
        would hold the host until the forward ends (torch's pinned allocator keeps the staging buffer until
        the copy has read it)."""
        t = torch.from_numpy(array)
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    @staticmethod
    def host_row_mask(spans: list[RowSpan], num_rows: int) -> np.ndarray:
        """[rows] bool on the host: the rows of `spans`."""
        mask = np.zeros(num_rows, dtype=bool)
        for span in spans:
            mask[span.start : span.start + span.count] = True
        return mask

    def row_mask(self, spans: list[RowSpan], num_rows: int) -> torch.Tensor:
        """`host_row_mask` on the model's device."""
        return self._to_device(self.host_row_mask(spans, num_rows))

    def step_hooks(self, spans: dict[str, list[RowSpan]], num_rows: int) -> StepHooks | None:
        """Hooks for one packed step; None when no row carries an intervention (the plain fast path).
        The fused plugin's group runs first, then the others in the order the step met them. Each plugin
        with hooks beyond a residual one also gets its declared per-row inputs and its rows' mask."""
        groups = self.group_spans(spans)
        fused = self.fused.name if self.fused is not None else None
        order = sorted(groups, key=lambda k: k != fused)
        residual: list[Any] = []
        bound: list[BoundHooks] = []
        for key in order:
            plugin = self.plugins[key]
            hooks = plugin.step_hooks(groups[key], num_rows)
            if hooks.residual is not None:
                residual.append(hooks.residual)
                hooks.residual = None
            if not hooks:
                continue
            inputs = self.row_inputs(plugin, groups[key], num_rows)
            bound.append(BoundHooks(hooks, inputs, self.row_mask(groups[key], num_rows)))
        if not (residual or bound):
            return None
        return StepHooks(residual, plugins=bound)

    def prefix_key(self, plans: dict[str, Any]) -> tuple[tuple[str, Hashable], ...]:
        """The part of a request's prefix-cache key its interventions make: (plugin, its key) for each plan
        that changes the prompt's KV, sorted by plugin name; () when none does."""
        keys = ((name, self.plugins[name].prefix_key(plan)) for name, plan in plans.items())
        return tuple(sorted((k for k in keys if k[1] is not None), key=lambda k: k[0]))

    def metric_labels(self, plans: dict[str, Any]) -> list[tuple[str, str]]:
        """(plugin name, its `metric_label` or "") for each plan: the labels under which the engine counts
        the sequence in `actserve_intervention_requests_total` without knowing any plugin."""
        return [(name, self.plugins[name].metric_label(plan) or "") for name, plan in plans.items()]

    def histograms(self) -> list[PluginHistogram]:
        """Every plugin's per-request histograms (`InterventionPlugin.histograms`), for the engine to create;
        ValueError when two plugins declare the same name."""
        seen: dict[str, str] = {}
        out: list[PluginHistogram] = []
        for name, plugin in self.plugins.items():
            for h in plugin.histograms:
                if h.name in seen:
                    raise ValueError(f"plugins {seen[h.name]} and {name} both declare histogram {h.name!r}")
                seen[h.name] = name
                out.append(h)
        return out

    def finish_observations(self, plans: dict[str, Any]) -> list[Observation]:
        """What each plan's plugin observes at the sequence's finish (before `release`); a plugin that
        raises is logged and skipped, so a metric never fails a request."""
        out: list[Observation] = []
        for key, plan in plans.items():
            plugin = self.plugins[key]
            if not plugin.histograms:
                continue
            try:
                out += plugin.finish_observations(plan)
            except Exception:  # noqa: BLE001 - metrics must not take the engine down
                log.exception("plugin %s failed to report its finish observations", key)
        return out

    def weight_formats(self) -> dict[str, list[FormatRequest]]:
        """Each plugin's extra weight formats by plugin name, only plugins that ask for some (the engine
        installs them before the runner is built, naming the plugin in any error)."""
        asked = {name: plugin.weight_formats() for name, plugin in self.plugins.items()}
        return {name: reqs for name, reqs in asked.items() if reqs}

    # -- the KV cache (docs/architecture.md §3, "KV tiers") -----------------------------------------
    def kv_block_bytes(self) -> int:
        """Device bytes every plugin keeps per KV block id, summed (the KV cache is sized with them)."""
        return sum(p.kv_block_bytes() for p in self.plugins.values())

    def reserved_kv_blocks(self) -> int:
        """GPU blocks the plugins ask to set aside when there is a host tier, summed."""
        return sum(p.reserved_kv_blocks() for p in self.plugins.values())

    def bind_kv(
        self, block_size: int, gpu_blocks: int, first_reserved: int, num_ids: int, tier: KVTier | None
    ) -> None:
        """Hand each plugin the sized cache; with a tier, its reserved blocks are consecutive ids from
        `first_reserved`, in plugin order."""
        at = first_reserved
        for plugin in self.plugins.values():
            n = plugin.reserved_kv_blocks() if tier is not None else 0
            plugin.bind_kv(KVSpace(block_size, gpu_blocks, num_ids, range(at, at + n), tier))
            at += n

    def kv_residency(self, plans: dict[str, Any]) -> KVResidency | None:
        """Which blocks of a sequence with these plans stay on the GPU with a host tier: the widest sink
        and window any plan asks for; None when none asks (all blocks stay)."""
        asked = [
            r for name, plan in plans.items() if (r := self.plugins[name].kv_residency(plan)) is not None
        ]
        if not asked:
            return None
        return KVResidency(max(r.sink_blocks for r in asked), max(r.window_blocks for r in asked))

    def blocks_moved(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for plugin in self.plugins.values():
            plugin.blocks_moved(src, dst)

    def stats(self) -> dict[tuple[str, str], float]:
        """(plugin, counter) -> value for every plugin's `stats`."""
        return {(name, k): v for name, p in self.plugins.items() for k, v in p.stats().items()}

    def gauges(self) -> dict[tuple[str, str], float]:
        """(plugin, gauge) -> value for every plugin's `gauges`."""
        return {(name, k): v for name, p in self.plugins.items() for k, v in p.gauges().items()}

    def graph_safe(self) -> list[InterventionPlugin]:
        """Plugins besides the fused one whose rows may replay from decode CUDA graphs (their graph
        hooks); a contributor to the fused plugin rides on its table instead."""
        return [
            p for n, p in self.plugins.items() if p.graph_safe and p is not self.fused and self.owner(n) == n
        ]
