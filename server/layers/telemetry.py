"""Counters, gauges and histogram samples that a part of the model keeps for the engine to export.

The layers and models sit below the engine and never import the metrics module (docs/architecture.md §1,
§8): a part that has something to report (the expert cache) declares its series here and updates plain
numbers; the engine registers each declared series under `actserve_<name>` and copies the numbers over
after every step (`EngineMetrics.add_model_series` / `update_model_series`), naming none of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Series:
    """One declared series: `kind` is "counter", "gauge" or "histogram" (`buckets` for the last)."""

    name: str
    kind: str
    doc: str
    buckets: tuple[float, ...] = ()


class Telemetry:
    """The numbers behind a set of declared series: counter totals, gauge values, histogram samples not
    yet exported. Plain Python numbers, updated on the engine thread."""

    def __init__(self, series: list[Series]) -> None:
        for s in series:
            if s.kind not in ("counter", "gauge", "histogram"):
                raise ValueError(f"series {s.name}: kind must be counter, gauge or histogram, got {s.kind!r}")
        self.series = list(series)
        self._kinds = {s.name: s.kind for s in series}
        # the owner's way to bring the numbers up to date before they are read (e.g. statistics the device
        # counted, read back without waiting); None: they always are
        self.on_read: Callable[[], None] | None = None
        self.reset()

    def refresh(self) -> None:
        """Bring the numbers up to date (the engine calls it before it copies them over)."""
        if self.on_read is not None:
            self.on_read()

    def reset(self) -> None:
        """Zero every counter and drop pending samples (gauges keep their values): the engine calls it once
        start-up forwards (profiling, calibration) are done, so the counters count served work only."""
        self.counters = {s.name: 0.0 for s in self.series if s.kind == "counter"}
        self.gauges = getattr(self, "gauges", None) or {s.name: 0.0 for s in self.series if s.kind == "gauge"}
        self.samples: dict[str, list[float]] = {s.name: [] for s in self.series if s.kind == "histogram"}

    def _check(self, name: str, kind: str) -> None:
        if self._kinds.get(name) != kind:
            raise KeyError(f"no {kind} series {name!r} declared")

    def add(self, name: str, amount: float = 1.0) -> None:
        self._check(name, "counter")
        self.counters[name] += amount

    def set(self, name: str, value: float) -> None:
        self._check(name, "gauge")
        self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        self._check(name, "histogram")
        self.samples[name].append(value)

    def drain(self) -> dict[str, list[float]]:
        """The histogram samples since the last drain (then forgotten)."""
        out = {k: v for k, v in self.samples.items() if v}
        self.samples = {k: [] for k in self.samples}
        return out
