"""`test_perturbed_weights`: a request's rows use a perturbed copy W' = W + scale · std(W) · noise of one
projection's weight (linear-weights hook point, with a weight format of its own).

The noise comes from a CPU `torch.Generator` seeded by (layer, projection), so `perturbed_weight` rebuilds
the same W' from the same W anywhere (the tests swap it into transformers). Options (`configure`):
`layers` (default [0, 1], those the model has: a small default, as the copies cost memory on every
engine that loads this package), `projections` (default all four), `scale` (default 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from actserve.interventions.base import (
    PROJECTIONS,
    FormatRequest,
    InterventionError,
    InterventionPlugin,
    LinearWeightsHook,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
    Shard,
    WeightFormat,
)

KEY = "perturbed"
DEFAULT_LAYERS = (0, 1)
DEFAULT_SCALE = 0.5


def perturbed_weight(weight: torch.Tensor, layer: int, projection: str, scale: float) -> torch.Tensor:
    """W + scale · std(W) · noise in float32 on the CPU, noise ~ N(0, 1) seeded by (layer, projection);
    for a packed projection W is the packed [q; k; v] or [gate; up] matrix."""
    w = weight.detach().float().cpu()
    gen = torch.Generator().manual_seed(1000 * layer + PROJECTIONS.index(projection))
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float32)
    return w + scale * w.std() * noise


class PerturbedFormat(WeightFormat):
    """A dense perturbed copy of the layer's primary weight (derived after loading from
    `layer.dense_weight()`, so also over an FP4 primary; the bias is shared)."""

    from_checkpoint = False

    def __init__(self, layer: int, projection: str, scale: float) -> None:
        super().__init__()
        self.layer, self.projection, self.scale = layer, projection, scale

    def create(self, layer: Any, params_dtype: torch.dtype | None) -> None:
        weight = torch.empty(layer.output_size, layer.input_size, dtype=params_dtype)
        layer.register_parameter(self.prefix + "weight", nn.Parameter(weight, requires_grad=False))

    def load_shard(
        self, layer: Any, name: str, param: nn.Parameter, loaded: torch.Tensor, shard: Shard | None
    ) -> None:
        raise ValueError("the perturbed copy is not in the checkpoint")

    def after_loading(self, layer: Any) -> None:
        dest = getattr(layer, self.prefix + "weight")
        with torch.no_grad():
            dest.copy_(perturbed_weight(layer.dense_weight(), self.layer, self.projection, self.scale))

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, getattr(layer, self.prefix + "weight"), layer.bias)


class PerturbedSpec(BaseModel):
    layer: int
    projection: Literal["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def site_code(layer: int, projection: str) -> int:
    return layer * len(PROJECTIONS) + PROJECTIONS.index(projection)


class _Hook:
    """Rows whose `site` input names this (layer, projection) take the perturbed copy there."""

    def __init__(self, sites: set[tuple[int, str]]) -> None:
        self._sites = sites

    def sites(self) -> dict[tuple[int, str], tuple[str, ...]]:
        return dict.fromkeys(self._sites, (KEY,))

    def select(self, layer: int, proj: str, key: str, inputs: RowInputs) -> torch.Tensor:
        return inputs["site"][:, 0] == site_code(layer, proj)


class PerturbedWeightsPlugin(InterventionPlugin):
    name = "test_perturbed_weights"
    description = "Test plugin: this request's rows use a perturbed copy of `projection` in `layer`."
    hook_points = ("linear_weights",)
    spec_model = PerturbedSpec
    row_inputs = (RowInput("site", torch.int32, 1, -1),)
    graph_safe = True

    def configure(self, options: Mapping[str, Any]) -> None:
        n = self.model_info.num_layers
        layers = options.get("layers", [i for i in DEFAULT_LAYERS if i < n])
        projections = options.get("projections", PROJECTIONS)
        self.scale = float(options.get("scale", DEFAULT_SCALE))
        wanted = {(int(layer), str(p)) for layer in layers for p in projections}
        moe = set(self.model_info.moe.layers) if self.model_info.moe is not None else set()
        mlp = ("gate_up_proj", "down_proj")  # a MoE layer's experts are not projections
        self.sites = {(layer, p) for layer, p in wanted if not (layer in moe and p in mlp)}

    def weight_formats(self) -> list[FormatRequest]:
        # one request per site: each copy's noise is seeded by its own (layer, projection)
        return [
            FormatRequest(KEY, frozenset({site}), partial(PerturbedFormat, *site, self.scale))
            for site in sorted(self.sites)
        ]

    def prepare(self, spec: BaseModel, param: str) -> Any:
        assert isinstance(spec, PerturbedSpec)
        if self.model_info.implementation != "native":  # weight formats exist in native models only
            raise InterventionError("needs the native model implementation", param)
        if not 0 <= spec.layer < self.model_info.num_layers:
            raise InterventionError(f"layer {spec.layer} out of range", f"{param}.layer")
        if (spec.layer, spec.projection) not in self.sites:
            where = f"layer {spec.layer} {spec.projection}"
            raise InterventionError(f"no perturbed copy at {where} (option `layers`)", f"{param}.layer")
        return spec

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            arrays["site"][s.start : s.start + s.count, 0] = site_code(s.plan.layer, s.plan.projection)

    def weights_hook(self, spans: list[RowSpan], num_rows: int) -> LinearWeightsHook:
        return _Hook({(s.plan.layer, s.plan.projection) for s in spans})

    def graph_hooks(self) -> PluginHooks:
        return PluginHooks(weights=_Hook(set(self.sites)))

    def prefix_key(self, plan: Any) -> Any:
        return (plan.layer, plan.projection)
