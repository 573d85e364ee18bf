"""Hook points the native layers expose to interventions (DESIGN.md §4), as plain per-step objects.

No Python forward hooks: the model calls `StepHooks` at fixed places, and a step without interventions
passes `None`, so plain batches pay one `is None` check per layer.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ResidualHook(Protocol):
    """Acts on the residual stream after decoder layer L, for all packed rows at once."""

    def layers(self) -> set[int]: ...

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...


class StepHooks:
    """The hooks active in one step, indexed by layer so untouched layers cost a dict lookup."""

    def __init__(self, residual: list[ResidualHook]) -> None:
        self.residual: dict[int, list[ResidualHook]] = {}
        for hook in residual:
            for layer in hook.layers():
                self.residual.setdefault(layer, []).append(hook)

    def __bool__(self) -> bool:
        return bool(self.residual)

    def after_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        for hook in self.residual.get(layer, ()):
            hidden = hook.apply(layer, hidden)
        return hidden
