"""`test_zero_channels`: zero chosen input channels of one projection of one layer for the request's
rows (linear-input hook)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from actserve.interventions.base import (
    PROJECTIONS,
    InterventionError,
    InterventionPlugin,
    LinearInputHook,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
)

MAX_CHANNELS = 8


class ZeroChannelsSpec(BaseModel):
    layer: int
    projection: Literal["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    channels: list[int] = Field(min_length=1, max_length=MAX_CHANNELS)


def site_code(layer: int, projection: str) -> int:
    return layer * len(PROJECTIONS) + PROJECTIONS.index(projection)


class _Hook:
    def __init__(self, sites: set[tuple[int, str]]) -> None:
        self._sites = sites

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        here = inputs["site"][:, 0] == site_code(layer, proj)  # [rows]
        ch = inputs["channels"]
        valid = (ch >= 0) & (ch < x.shape[1]) & here.unsqueeze(1)  # channels past this input: ignored
        hits = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
        hits.scatter_add_(1, ch.clamp(0, x.shape[1] - 1), valid.to(torch.int32))
        zero = hits > 0
        return torch.where(zero, torch.zeros((), dtype=x.dtype, device=x.device), x)


class ZeroChannelsPlugin(InterventionPlugin):
    name = "test_zero_channels"
    description = "Test plugin: zeroes `channels` of the input of `projection` in `layer` for this request."
    hook_points = ("linear_input",)
    spec_model = ZeroChannelsSpec
    row_inputs = (
        RowInput("site", torch.int32, 1, -1),
        RowInput("channels", torch.int64, MAX_CHANNELS, -1),
    )
    graph_safe = True

    def prepare(self, spec: BaseModel, param: str) -> Any:
        assert isinstance(spec, ZeroChannelsSpec)
        if self.model_info.implementation != "native":  # linear-input hooks exist in native models only
            raise InterventionError("needs the native model implementation", param)
        if not 0 <= spec.layer < self.model_info.num_layers:
            raise InterventionError(f"layer {spec.layer} out of range", f"{param}.layer")
        if (spec.layer, spec.projection) not in self.model_info.projection_sites():
            raise InterventionError(f"layer {spec.layer} has no {spec.projection}", f"{param}.projection")
        if any(c < 0 for c in spec.channels):
            raise InterventionError("channels must be >= 0", f"{param}.channels")
        return spec

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            rows = slice(s.start, s.start + s.count)
            arrays["site"][rows, 0] = site_code(s.plan.layer, s.plan.projection)
            arrays["channels"][rows, : len(s.plan.channels)] = s.plan.channels

    def linear_hook(self, spans: list[RowSpan], num_rows: int) -> LinearInputHook:
        return _Hook({(s.plan.layer, s.plan.projection) for s in spans})

    def graph_hooks(self) -> PluginHooks:
        """Every projection of every layer (the site input picks one per row)."""
        return PluginHooks(linear=_Hook(set(self.model_info.projection_sites())))

    def prefix_key(self, plan: Any) -> Any:
        return (plan.layer, plan.projection, tuple(plan.channels))
