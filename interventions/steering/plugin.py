"""Steering: h <- h + scale * d_L at the output of decoder layer L, per row of the packed batch.

Vectors live in one resident table [slots, num_layers, hidden]; each step gets fixed-shape per-row
tensors (slot index, -1 = none; scale; normalize flag), so mixed batches need no per-request code on
the hot path and the same tensors can be static inputs of a captured graph. A vector's `window` and
`phases` only choose which rows get its slot index in a step (`row_ranges`); named vectors are copied
out of the VectorLibrary at `prepare`, so a plan never depends on the library afterwards.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from actserve.interventions.base import (
    FusedColumns,
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    RowSpan,
    device_table,
)
from actserve.interventions.steering.formats import preview
from actserve.interventions.steering.library import VectorLibrary, VectorNotFound
from actserve.interventions.steering.schema import (
    MAX_VECTORS_PER_REQUEST,
    SteeringSpec,
    SteeringVectorSpec,
    check_spec_size,
    layer_index,
)
from actserve.kernels.steer_rmsnorm_ref import SteeringTensors, apply_steering_ref
from actserve.server.contract import ModelInfo

DEFAULT_SLOTS = 256
T = TypeVar("T")


FLOAT32_MAX = float(np.finfo(np.float32).max)  # per-row scales travel as float32


@dataclass
class PreparedVector:
    data: torch.Tensor  # [num_layers, hidden] on the CPU, zero on layers not named
    layers: list[int]
    scale: float
    prompt: bool
    generation: bool
    normalize: bool
    window: tuple[int, int | None] | None = None
    slot: int = -1


@dataclass
class SteeringPlan:
    vectors: list[PreparedVector]
    active: bool = False
    released: bool = False
    layers: set[int] = field(default_factory=set)
    # a generated-token row's columns when no vector has a window (the same every decode step)
    decode_row: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def cached_decode_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if self.decode_row is None and all(v.window is None for v in self.vectors):
            on = [v.generation for v in self.vectors]
            self.decode_row = (
                np.array(
                    [v.slot if g else -1 for v, g in zip(self.vectors, on, strict=True)], dtype=np.int64
                ),
                np.array([v.scale for v in self.vectors], dtype=np.float32),
                np.array([v.normalize for v in self.vectors], dtype=np.bool_),
            )
        return self.decode_row


@dataclass
class RowColumns:
    index: np.ndarray  # int64 [rows, K], -1 = none
    scale: np.ndarray  # float32 [rows, K]
    normalize: np.ndarray  # bool [rows, K]
    used: dict[int, list[int]]  # layer -> columns active there


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
        # the model feeds these to the fused add + steering + norm between layers
        self.tensors = SteeringTensors(table, layer_mask, index, scale, normalize, columns=used)

    def layers(self) -> set[int]:
        return set(self.tensors.columns or ())

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return apply_steering_ref(hidden, layer, self.tensors)


def row_ranges(span: RowSpan, vec: PreparedVector) -> list[tuple[int, int]]:
    """The packed rows [lo, hi) of `span` that `vec` steers: its phases, cut to its window.

    A row holds position p (pos0 <= p < pos0 + count). Prompt rows (p < prompt_len) have window index p;
    generation rows have index p - prompt_len, the generated token's index. Each part is contiguous."""
    start, end = vec.window if vec.window is not None else (0, None)
    n_prompt = min(span.count, max(0, span.prompt_len - span.pos0))  # rows that are prompt positions
    parts = []
    if vec.prompt:  # positions [pos0, pos0 + n_prompt), window over p
        parts.append((span.pos0, span.pos0 + n_prompt, 0))
    if vec.generation:  # positions [pos0 + n_prompt, pos0 + count), window over p - prompt_len
        parts.append((span.pos0 + n_prompt, span.pos0 + span.count, span.prompt_len))
    out = []
    for p_lo, p_hi, origin in parts:
        lo = max(p_lo, origin + start)
        hi = p_hi if end is None else min(p_hi, origin + end)
        if lo < hi:
            out.append((span.start + lo - span.pos0, span.start + hi - span.pos0))
    return out


def prompt_key(plan: SteeringPlan) -> tuple | None:
    """The prefix-cache key of a plan (`InterventionPlugin.prefix_key`): its vectors that steer prompt
    positions, by content (a digest of the direction data), layers, scale, normalize and window; None
    when no vector steers the prompt (a generation-only plan leaves the prompt's KV plain)."""
    parts = []
    for v in plan.vectors:
        if v.prompt:
            digest = hashlib.sha256(v.data.float().contiguous().numpy().tobytes()).hexdigest()
            parts.append((digest, tuple(v.layers), v.scale, v.normalize, v.window))
    return tuple(parts) or None


class SteeringPlugin(InterventionPlugin):
    name = "steering"
    description = "Add per-layer direction vectors (inline or stored by name) to the residual stream."
    hook_points = ("residual",)
    spec_model = SteeringSpec
    graph_columns = MAX_VECTORS_PER_REQUEST  # a request's own vectors
    tp_mode = "replicated"  # tensor parallelism: every rank adds to the replicated residual

    def __init__(self, model_info: ModelInfo, slots: int = DEFAULT_SLOTS) -> None:
        super().__init__(model_info)
        self.table = device_table(slots, (model_info.num_layers, model_info.hidden_size), model_info)
        self.layer_mask = torch.zeros(
            slots, model_info.num_layers, dtype=torch.bool, device=model_info.device
        )
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def gauges(self) -> dict[str, float]:
        """Resident slots held by running requests' vectors, and how many there are (when all are held, new
        steered requests are refused with a retryable error: `InterventionCapacityError`)."""
        with self._lock:
            free = len(self._free)
        return {"slots_in_use": float(self.table.shape[0] - free), "slots": float(self.table.shape[0])}

    def configure(self, options: Mapping[str, Any]) -> None:
        """Option `vectors_dir` (`--steering-vectors DIR`): named vectors preloaded from there, and new
        ones saved there; without it the library is in memory only."""
        self.service = VectorLibrary(self.model_info, options.get("vectors_dir"))

    @property
    def library(self) -> VectorLibrary:
        """The server's named vectors: this plugin's service (in memory when not configured)."""
        if self.service is None:
            self.service = VectorLibrary(self.model_info)
        return self.service

    def fused_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table, self.layer_mask

    def fused_columns(self, spans: list[RowSpan], num_rows: int) -> FusedColumns | None:
        cols = self.row_columns(spans, num_rows, need_used=False) if spans else None
        return None if cols is None else (cols.index, cols.scale, cols.normalize)

    def parse(self, value: Any, param: str) -> SteeringSpec:  # type: ignore[override]
        """Size caps first (cheap, O(allowed spec)), then the schema (O(input), now bounded)."""
        check_spec_size(value, param, self.model_info.num_layers, self.model_info.hidden_size)
        return super().parse(value, param)  # type: ignore[return-value]

    def _named(self, name: str, where: str) -> tuple[torch.Tensor, list[int]]:
        """A copy of a stored vector's data: deleting or replacing it later leaves this plan intact."""
        try:
            stored = self.library.get(name)
        except VectorNotFound:
            raise InterventionError(
                f"{where}: no stored steering vector named {preview(name)} (GET /v1/steering/vectors lists "
                "them)",
                where,
            ) from None
        data = torch.zeros(self.model_info.num_layers, self.model_info.hidden_size, dtype=torch.float32)
        for layer, d in stored.directions.items():
            data[layer] = d
        return data, stored.layers

    def prepare(self, spec: SteeringSpec, param: str) -> SteeringPlan:  # type: ignore[override]
        n_layers, hidden = self.model_info.num_layers, self.model_info.hidden_size
        vectors: list[PreparedVector] = []
        for i, v in enumerate(spec.vectors):
            where = f"{param}.vectors[{i}]"
            if not math.isfinite(v.scale) or abs(v.scale) > FLOAT32_MAX:
                raise InterventionError(
                    f"{where}.scale: must be finite in float32 (|scale| < 3.4e38)", f"{where}.scale"
                )
            if v.name is not None:
                data, layers = self._named(v.name, f"{where}.name")
                self._check_product(data, v.scale, where)
                vectors.append(self._prepared(v, data, layers))
                continue
            assert v.directions is not None
            if not v.directions:
                raise InterventionError(f"{where}.directions: give at least one layer", f"{where}.directions")
            data = torch.zeros(n_layers, hidden, dtype=torch.float32)
            layers: list[int] = []
            for key, values in v.directions.items():
                p = f"{where}.directions.{key}"
                layer = layer_index(key)
                if layer is None:
                    raise InterventionError(f"{p}: layer keys are integers in [0, {n_layers - 1}]", p)
                if not 0 <= layer < n_layers:
                    raise InterventionError(f"{p}: layer {layer} out of range [0, {n_layers - 1}]", p)
                if len(values) != hidden:
                    raise InterventionError(f"{p}: length {len(values)}, expected hidden_size = {hidden}", p)
                row = torch.tensor(values, dtype=torch.float64).to(self.model_info.dtype)
                if not bool(torch.isfinite(row).all()):
                    raise InterventionError(
                        f"{p}: values must be finite numbers in the model's dtype ({self.model_info.dtype})",
                        p,
                    )
                data[layer] = row.float()
                layers.append(layer)
            self._check_product(data, v.scale, where)
            vectors.append(self._prepared(v, data, sorted(layers)))
        with self._lock:
            if len(self._free) < len(vectors):
                raise InterventionCapacityError(
                    f"all {self.table.shape[0]} resident steering slots are in use; retry shortly"
                )
            for vec in vectors:
                vec.slot = self._free.pop()
        return SteeringPlan(vectors=vectors, layers={layer for v in vectors for layer in v.layers})

    def _check_product(self, data: torch.Tensor, scale: float, where: str) -> None:
        """scale * direction must stay finite in the model's dtype: a float64-finite request (scale 1e308,
        or 1e30 * 1e30) would otherwise turn the residual into inf and the answer into garbage."""
        peak = float(data.abs().max()) * abs(scale)
        if not torch.isfinite(torch.tensor(peak, dtype=torch.float64).to(self.model_info.dtype)):
            raise InterventionError(
                f"{where}: scale x direction reaches {peak:.3g}, not finite in {self.model_info.dtype}",
                f"{where}.scale",
            )

    @staticmethod
    def _prepared(v: SteeringVectorSpec, data: torch.Tensor, layers: list[int]) -> PreparedVector:
        return PreparedVector(
            data=data,
            layers=layers,
            scale=v.scale,
            prompt="prompt" in v.phases,
            generation="generation" in v.phases,
            normalize=v.normalize,
            window=v.window,
        )

    def activate(self, plan: SteeringPlan) -> None:  # type: ignore[override]
        if plan.active:
            return
        for vec in plan.vectors:
            self.table[vec.slot] = vec.data.to(self.table.device, self.table.dtype)
            self.layer_mask[vec.slot] = False
            self.layer_mask[vec.slot, vec.layers] = True
        plan.active = True

    def reserve_slot(self) -> int:
        """A table slot taken out of the request pool for good (a direction resident for the server's
        lifetime, e.g. CoT compression's), so its rows share this table and its fused kernel."""
        with self._lock:
            if not self._free:
                raise InterventionCapacityError("no steering slot left to reserve")
            return self._free.pop()

    def release(self, plan: SteeringPlan) -> None:  # type: ignore[override]
        if plan.released:
            return
        plan.released = True
        with self._lock:
            self._free.extend(v.slot for v in plan.vectors)

    def row_columns(self, spans: list[RowSpan], num_rows: int, need_used: bool = True) -> RowColumns | None:
        """Per-row (slot index, scale, normalize) columns on the host; None when no row is steered here.
        CUDA-graph steps copy these straight into the graph's static inputs and skip `used` (the kernel
        reads the layer mask), which keeps the per-step host cost to a row copy per steered decode row."""
        # a row may carry several plans (steering + CoT compression): each takes the next free columns
        per_row = np.zeros(num_rows, dtype=np.int64)
        for span in spans:
            per_row[span.start : span.start + span.count] += len(span.plan.vectors)
        width = max(1, int(per_row.max()))
        next_col = np.zeros(num_rows, dtype=np.int64)
        index = np.full((num_rows, width), -1, dtype=np.int64)
        scale = np.zeros((num_rows, width), dtype=np.float32)
        normalize = np.zeros((num_rows, width), dtype=np.bool_)
        used: dict[int, list[int]] = {}
        any_row = False
        for span in spans:
            c0 = int(next_col[span.start : span.start + span.count].max())
            next_col[span.start : span.start + span.count] = c0 + len(span.plan.vectors)
            fast = span.plan.cached_decode_row() if span.count == 1 and span.pos0 >= span.prompt_len else None
            if fast is not None and not need_used:
                c1 = c0 + len(fast[0])
                index[span.start, c0:c1], scale[span.start, c0:c1], normalize[span.start, c0:c1] = fast
                any_row = any_row or bool((fast[0] >= 0).any())
                continue
            for k0, vec in enumerate(span.plan.vectors):
                k = c0 + k0
                ranges = row_ranges(span, vec)
                if not ranges:
                    continue
                for lo, hi in ranges:
                    index[lo:hi, k], scale[lo:hi, k], normalize[lo:hi, k] = vec.slot, vec.scale, vec.normalize
                any_row = True
                for layer in vec.layers:
                    if k not in used.setdefault(layer, []):
                        used[layer].append(k)
        if not any_row:
            return None
        used = {layer: sorted(cols) for layer, cols in used.items()}  # each row's vectors apply in order
        return RowColumns(index, scale, normalize, used)

    def prefix_key(self, plan: SteeringPlan) -> tuple | None:  # type: ignore[override]
        return prompt_key(plan)

    def residual_hook(self, spans: list[RowSpan], num_rows: int) -> SteeringHook | None:
        cols = self.row_columns(spans, num_rows)
        if cols is None:
            return None
        dev = self.table.device
        return SteeringHook(
            self.table,
            self.layer_mask,
            torch.from_numpy(cols.index).to(dev),
            torch.from_numpy(cols.scale).to(dev),
            torch.from_numpy(cols.normalize).to(dev),
            cols.used,
        )


def library_call(plugin: SteeringPlugin, fn: Callable[..., T], *args: Any) -> T:
    """fn(library, *args) on the steering plugin's vector library (its service), for
    `EngineClient.plugin_call("steering", library_call, fn, ...)`: runs where the plugin lives."""
    return fn(plugin.library, *args)
