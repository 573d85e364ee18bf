"""Hook points the native layers expose to interventions (docs/architecture.md §6), as plain per-step objects.

No Python forward hooks: the model calls `StepHooks` at fixed places, and a step without interventions
passes `None`, so plain batches pay one `is None` check per layer. Steering (the common case) is not a
Python callback at all: its per-row tensors go into the fused add + steering + norm between layers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from actserve.kernels.steer_rmsnorm_ref import SteeringTensors, apply_steering_ref


class ResidualHook(Protocol):
    """Acts on the residual stream after decoder layer L, for all packed rows at once."""

    def layers(self) -> set[int]: ...

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...


class StepHooks:
    """The hooks of one step: at most one fused steering table, plus generic residual callbacks."""

    def __init__(self, residual: list[ResidualHook], steer: SteeringTensors | None = None) -> None:
        self.steer = steer
        self.residual: dict[int, list[ResidualHook]] = {}
        for hook in residual:
            tensors = getattr(hook, "tensors", None)
            if isinstance(tensors, SteeringTensors) and self.steer is None:
                self.steer = tensors
                continue
            for layer in hook.layers():
                self.residual.setdefault(layer, []).append(hook)

    def __bool__(self) -> bool:
        return bool(self.residual) or self.steer is not None

    def after_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The generic hooks only (the native model has already applied steering, fused)."""
        for hook in self.residual.get(layer, ()):
            hidden = hook.apply(layer, hidden)
        return hidden

    def apply_all(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Steering, then the generic hooks: for models without the fused path (transformers fallback)."""
        if self.steer is not None:
            hidden = apply_steering_ref(hidden, layer, self.steer)
        return self.after_layer(layer, hidden)
