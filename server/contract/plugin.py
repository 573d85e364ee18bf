"""The intervention plugin contract (docs/architecture.md §6); `actserve.interventions.base` is its public
name for third-party plugins.

A plugin owns one key of a request's `interventions` object. The API thread validates and prepares
(`spec_model`, `prepare`); the engine thread activates a plan when its sequence first runs, asks the
plugin for a per-step hook over the packed rows, and releases the plan when the sequence ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ValidationError

from actserve.server.contract.hooks import ResidualHook
from actserve.server.contract.model_info import ModelInfo


class InterventionError(ValueError):
    """A spec that does not fit the loaded model; becomes a 400 naming `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class InterventionCapacityError(RuntimeError):
    """Server-side resources for plans are exhausted right now; becomes a 503."""


@dataclass
class RowSpan:
    """One sequence's rows in a packed step: rows [start, start+count) hold positions [pos0, pos0+count)."""

    plan: Any
    start: int
    count: int
    pos0: int
    prompt_len: int


def plugin_key(name: str) -> str:
    """Where each plugin of a registry is found in the shared context (plugins that build on another)."""
    return f"plugin.{name}"


class InterventionPlugin(ABC):
    """One intervention kind. Instances are created once per loaded model."""

    name: ClassVar[str]
    description: ClassVar[str]
    hook_points: ClassVar[tuple[str, ...]]
    spec_model: ClassVar[type[BaseModel]]
    # plans are SteeringPlans over the steering plugin's resident table: their rows join the steering
    # rows of a step (one fused kernel, one set of CUDA-graph inputs) instead of a hook of their own
    shares_steering_table: ClassVar[bool] = False

    def __init__(self, model_info: ModelInfo) -> None:
        self.model_info = model_info
        # shared by all plugins of one registry (e.g. the steering vector library); the registry sets it
        self.context: dict[str, Any] = {}

    def parse(self, value: Any, param: str) -> BaseModel:
        """The request's raw spec validated into `spec_model`; the first error becomes an
        InterventionError naming the field under `param`. Plugins override it to refuse oversized input
        cheaply before the schema walks every element."""
        try:
            return self.spec_model.model_validate(value)
        except ValidationError as e:
            err = e.errors()[0]
            loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"])
            where = f"{param}{loc}"
            raise InterventionError(f"{where}: {err['msg']}", where) from None

    @abstractmethod
    def prepare(self, spec: BaseModel, param: str) -> Any:
        """Check `spec` against the model and return a plan; raise InterventionError(param=...) if invalid.

        Runs on the API thread, so it must not touch engine-owned device state."""

    def activate(self, plan: Any) -> None:  # noqa: B027 - optional
        """Engine thread, before the plan's first step: make its data resident."""

    def release(self, plan: Any) -> None:  # noqa: B027 - optional
        """Engine thread, when the sequence finishes, aborts or is preempted: free resident data."""

    @abstractmethod
    def residual_hook(self, spans: list[RowSpan], num_rows: int) -> ResidualHook | None:
        """Per-step hook for the rows whose sequences carry a plan of this plugin (None: nothing to do)."""

    def json_schema(self) -> dict[str, Any]:
        return self.spec_model.model_json_schema()


def device_table(rows: int, shape: tuple[int, ...], info: ModelInfo) -> torch.Tensor:
    """A zeroed resident table in the model's dtype and device (one way to allocate plugin storage)."""
    return torch.zeros(rows, *shape, dtype=info.dtype, device=info.device)
