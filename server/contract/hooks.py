"""Hook points the native layers expose to interventions (docs/architecture.md §6), as plain per-step objects.

No Python forward hooks: the model calls `StepHooks` at fixed places, and a step without interventions
passes `None`, so plain batches pay one `is None` check per layer. Steering (the common case) is not a
Python callback at all: its per-row tensors go into the fused add + steering + norm between layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from actserve.kernels.steer_rmsnorm_ref import SteeringTensors, apply_steering_ref


class ResidualHook(Protocol):
    """Acts on the residual stream after decoder layer L, for all packed rows at once."""

    def layers(self) -> set[int]: ...

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RowInput:
    """A fixed-shape per-row input a plugin declares: per packed row `width` values of `dtype`; rows the
    plugin does not own hold `none` (docs/architecture.md §6)."""

    name: str
    dtype: torch.dtype
    width: int
    none: Any


# a plugin's per-row inputs of one step: name -> tensor [rows, width] on the model's device
RowInputs = dict[str, torch.Tensor]

# the projections of a decoder layer a linear-input hook may act on
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LogitsHook(Protocol):
    """Acts on logits after the model and before sampling; must leave rows whose inputs are `none` as
    they are (bit-identical)."""

    def apply(self, logits: torch.Tensor, inputs: RowInputs) -> torch.Tensor: ...


class LinearInputHook(Protocol):
    """Acts on a projection's input [rows, in] before its matmul, per row through its inputs."""

    def sites(self) -> set[tuple[int, str]]: ...

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor: ...


class LinearInput:
    """The linear-input hooks of one projection in one step, as the layers call them: `row_mask` [rows]
    bool says which rows some hook may change (the others must stay on the fast path)."""

    def __init__(self, layer: int, proj: str, hooks: list[tuple[LinearInputHook, RowInputs, torch.Tensor]]):
        self.layer, self.proj, self.hooks = layer, proj, hooks
        masks = [m for _, _, m in hooks]
        self.row_mask = masks[0] if len(masks) == 1 else torch.stack(masks).any(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for hook, inputs, _ in self.hooks:
            x = hook.apply(self.layer, self.proj, x, inputs)
        return x


class StepHooks:
    """The hooks of one step: at most one fused steering table, generic residual callbacks, and the
    logits and linear-input hooks with their plugins' per-row inputs."""

    def __init__(
        self,
        residual: list[ResidualHook],
        steer: SteeringTensors | None = None,
        logits: list[tuple[LogitsHook, RowInputs]] | None = None,
        linear: list[tuple[LinearInputHook, RowInputs, torch.Tensor]] | None = None,
    ) -> None:
        """`linear`: (hook, its inputs, row mask [rows] bool of the rows its plugin owns)."""
        self.steer = steer
        self.logits = logits or []
        self.linear: dict[int, dict[str, LinearInput]] = {}
        sites: dict[tuple[int, str], list[tuple[LinearInputHook, RowInputs, torch.Tensor]]] = {}
        for entry in linear or ():
            for site in entry[0].sites():
                sites.setdefault(site, []).append(entry)
        for (layer, proj), entries in sites.items():
            self.linear.setdefault(layer, {})[proj] = LinearInput(layer, proj, entries)
        self.residual: dict[int, list[ResidualHook]] = {}
        for hook in residual:
            tensors = getattr(hook, "tensors", None)
            if isinstance(tensors, SteeringTensors) and self.steer is None:
                self.steer = tensors
                continue
            for layer in hook.layers():
                self.residual.setdefault(layer, []).append(hook)

    def __bool__(self) -> bool:
        return bool(self.residual) or self.steer is not None or bool(self.logits) or bool(self.linear)

    def linear_at(self, layer: int) -> dict[str, LinearInput] | None:
        """Layer `layer`'s projections with linear-input hooks (None: none, the plain path)."""
        return self.linear.get(layer)

    def apply_logits(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The logits hooks over logits of packed rows `rows` (None: all rows, in order)."""
        for hook, inputs in self.logits:
            cut = inputs if rows is None else {k: v[rows] for k, v in inputs.items()}
            logits = hook.apply(logits, cut)
        return logits

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
