"""Discovers plugins through the `actserve.interventions` entry-point group and routes request specs."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from actserve.interventions.base import InterventionError, InterventionPlugin, RowSpan, plugin_key
from actserve.server.contract import ModelInfo
from actserve.server.contract.hooks import StepHooks

log = logging.getLogger(__name__)
GROUP = "actserve.interventions"


def discover() -> dict[str, type[InterventionPlugin]]:
    found: dict[str, type[InterventionPlugin]] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception:  # noqa: BLE001 - one broken plugin must not stop the server
            log.exception("intervention plugin %s failed to load", ep.name)
            continue
        found[cls.name] = cls
    if "steering" not in found:  # running from a source tree without installed metadata
        from actserve.interventions.steering.plugin import SteeringPlugin

        found["steering"] = SteeringPlugin
    if "cot_compression" not in found:
        from actserve.interventions.cot_compression.plugin import CoTCompressionPlugin

        found["cot_compression"] = CoTCompressionPlugin
    return found


class InterventionRegistry:
    """The plugins of one loaded model; turns request specs into plans and plans into step hooks."""

    def __init__(
        self,
        model_info: ModelInfo,
        plugins: dict[str, type[InterventionPlugin]] | None = None,
        context: dict[str, Any] | None = None,
    ):
        """`context`: server-wide objects the plugins share (e.g. "steering.library": VectorLibrary)."""
        classes = plugins if plugins is not None else discover()
        self.context: dict[str, Any] = context if context is not None else {}
        self.plugins: dict[str, InterventionPlugin] = {n: c(model_info) for n, c in sorted(classes.items())}
        for name, plugin in self.plugins.items():
            plugin.context = self.context
            self.context[plugin_key(name)] = plugin

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
        for key, value in spec.items():
            plugin = self.plugins.get(key)
            if plugin is None:
                raise InterventionError(
                    f"unknown intervention {key!r}; available: {sorted(self.plugins)}", f"interventions.{key}"
                )
            parsed = plugin.parse(value, f"interventions.{key}")
            plans[key] = plugin.prepare(parsed, f"interventions.{key}")
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

    def activate(self, plans: dict[str, Any]) -> None:
        for key, plan in plans.items():
            self.plugins[key].activate(plan)

    def release(self, plans: dict[str, Any]) -> None:
        for key, plan in plans.items():
            self.plugins[key].release(plan)

    def steering_spans(self, spans: dict[str, list[RowSpan]]) -> tuple[list[RowSpan], list[str]]:
        """The rows that go through the steering table (steering's own and those of plugins sharing it),
        and the keys of the other plugins in the step."""
        shared: list[RowSpan] = []
        others: list[str] = []
        for key, rows in spans.items():
            if key == "steering" or (self.plugins[key].shares_steering_table and "steering" in self.plugins):
                shared.extend(rows)
            else:
                others.append(key)
        return shared, others

    def step_hooks(self, spans: dict[str, list[RowSpan]], num_rows: int) -> StepHooks | None:
        """Hooks for one packed step; None when no row carries an intervention (the plain fast path)."""
        shared, others = self.steering_spans(spans)
        hooks = []
        if shared:
            hook = self.plugins["steering"].residual_hook(shared, num_rows)
            if hook is not None:
                hooks.append(hook)
        for key in others:
            hook = self.plugins[key].residual_hook(spans[key], num_rows)
            if hook is not None:
                hooks.append(hook)
        return StepHooks(hooks) if hooks else None
