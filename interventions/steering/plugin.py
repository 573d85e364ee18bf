"""Steering: h <- h + scale * d_L at the output of decoder layer L, per row of the packed batch.

Vectors live in one resident table [slots, num_layers, hidden]; each step gets fixed-shape per-row
tensors (slot index, -1 = none; scale; normalize flag), so mixed batches need no per-request code on
the hot path and the same tensors can be static inputs of a captured graph.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from actserve.interventions.base import (
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    RowSpan,
    device_table,
)
from actserve.interventions.steering.schema import MAX_VECTORS_PER_REQUEST, SteeringSpec
from actserve.server.models.loader import ModelInfo

DEFAULT_SLOTS = 256


@dataclass
class PreparedVector:
    data: torch.Tensor  # [num_layers, hidden] on the CPU, zero on layers not named
    layers: list[int]
    scale: float
    prompt: bool
    generation: bool
    normalize: bool
    slot: int = -1


@dataclass
class SteeringPlan:
    vectors: list[PreparedVector]
    active: bool = False
    released: bool = False
    layers: set[int] = field(default_factory=set)


class SteeringHook:
    """Adds each row's vectors at the layers they name; rows with index -1 are left bit-identical."""

    def __init__(
        self,
        table: torch.Tensor,
        layer_mask: torch.Tensor,
        index: torch.Tensor,
        scale: torch.Tensor,
        normalize: torch.Tensor,
        used: dict[int, list[int]],
    ) -> None:
        self.table, self.layer_mask = table, layer_mask
        self.index, self.scale, self.normalize = index, scale, normalize
        self.used = used  # layer -> vector columns with at least one active row there
        self.any_normalize = bool(normalize.any())

    def layers(self) -> set[int]:
        return set(self.used)

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        for k in self.used.get(layer, ()):
            idx = self.index[:, k]
            safe = idx.clamp(min=0)
            active = (idx >= 0) & self.layer_mask[safe, layer]
            vec = self.table[safe, layer]
            stepped = hidden + self.scale[:, k : k + 1].to(hidden.dtype) * vec
            if self.any_normalize:
                before = hidden.float().norm(dim=-1, keepdim=True)
                after = stepped.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
                rescaled = (stepped.float() * (before / after)).to(hidden.dtype)
                stepped = torch.where(self.normalize[:, k : k + 1], rescaled, stepped)
            hidden = torch.where(active.unsqueeze(1), stepped, hidden)
        return hidden


class SteeringPlugin(InterventionPlugin):
    name = "steering"
    description = "Add per-layer direction vectors to the residual stream (inline directions)."
    hook_points = ("residual",)
    spec_model = SteeringSpec

    def __init__(self, model_info: ModelInfo, slots: int = DEFAULT_SLOTS) -> None:
        super().__init__(model_info)
        self.table = device_table(slots, (model_info.num_layers, model_info.hidden_size), model_info)
        self.layer_mask = torch.zeros(
            slots, model_info.num_layers, dtype=torch.bool, device=model_info.device
        )
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def prepare(self, spec: SteeringSpec, param: str) -> SteeringPlan:  # type: ignore[override]
        n_layers, hidden = self.model_info.num_layers, self.model_info.hidden_size
        vectors: list[PreparedVector] = []
        for i, v in enumerate(spec.vectors):
            where = f"{param}.vectors[{i}]"
            if v.name is not None:
                raise InterventionError(
                    f"{where}.name: named steering vectors are not available yet; send inline 'directions'",
                    f"{where}.name",
                )
            assert v.directions is not None
            if not v.directions:
                raise InterventionError(f"{where}.directions: give at least one layer", f"{where}.directions")
            data = torch.zeros(n_layers, hidden, dtype=torch.float32)
            layers: list[int] = []
            for key, values in v.directions.items():
                p = f"{where}.directions.{key}"
                try:
                    layer = int(key)
                except ValueError:
                    raise InterventionError(
                        f"{p}: layer keys are integers in [0, {n_layers - 1}]", p
                    ) from None
                if not 0 <= layer < n_layers:
                    raise InterventionError(f"{p}: layer {layer} out of range [0, {n_layers - 1}]", p)
                if len(values) != hidden:
                    raise InterventionError(f"{p}: length {len(values)}, expected hidden_size = {hidden}", p)
                row = torch.tensor(values, dtype=torch.float64)
                if not bool(torch.isfinite(row).all()):
                    raise InterventionError(f"{p}: values must be finite numbers", p)
                data[layer] = row.float()
                layers.append(layer)
            if not math.isfinite(v.scale):
                raise InterventionError(f"{where}.scale: must be finite", f"{where}.scale")
            vectors.append(
                PreparedVector(
                    data=data,
                    layers=sorted(layers),
                    scale=v.scale,
                    prompt="prompt" in v.phases,
                    generation="generation" in v.phases,
                    normalize=v.normalize,
                )
            )
        with self._lock:
            if len(self._free) < len(vectors):
                raise InterventionCapacityError(
                    f"all {self.table.shape[0]} resident steering slots are in use; retry shortly"
                )
            for vec in vectors:
                vec.slot = self._free.pop()
        return SteeringPlan(vectors=vectors, layers={layer for v in vectors for layer in v.layers})

    def activate(self, plan: SteeringPlan) -> None:  # type: ignore[override]
        if plan.active:
            return
        for vec in plan.vectors:
            self.table[vec.slot] = vec.data.to(self.table.device, self.table.dtype)
            self.layer_mask[vec.slot] = False
            self.layer_mask[vec.slot, vec.layers] = True
        plan.active = True

    def release(self, plan: SteeringPlan) -> None:  # type: ignore[override]
        if plan.released:
            return
        plan.released = True
        with self._lock:
            self._free.extend(v.slot for v in plan.vectors)

    def residual_hook(self, spans: list[RowSpan], num_rows: int) -> SteeringHook | None:
        width = min(MAX_VECTORS_PER_REQUEST, max(len(s.plan.vectors) for s in spans))
        index = torch.full((num_rows, width), -1, dtype=torch.long)
        scale = torch.zeros(num_rows, width, dtype=torch.float32)
        normalize = torch.zeros(num_rows, width, dtype=torch.bool)
        used: dict[int, list[int]] = {}
        for span in spans:
            n_prompt = min(span.count, max(0, span.prompt_len - span.pos0))  # rows that are prompt positions
            for k, vec in enumerate(span.plan.vectors):
                lo = span.start if vec.prompt else span.start + n_prompt
                hi = span.start + (span.count if vec.generation else n_prompt)
                if lo >= hi:
                    continue
                index[lo:hi, k], scale[lo:hi, k], normalize[lo:hi, k] = vec.slot, vec.scale, vec.normalize
                for layer in vec.layers:
                    if k not in used.setdefault(layer, []):
                        used[layer].append(k)
        if not used:
            return None
        used = {layer: sorted(cols) for layer, cols in used.items()}  # each row's vectors apply in order
        dev = self.table.device
        return SteeringHook(
            self.table,
            self.layer_mask,
            index.to(dev, non_blocking=True),
            scale.to(dev, non_blocking=True),
            normalize.to(dev, non_blocking=True),
            used,
        )
