"""`precision`: a request's rows multiply by an FP4 copy of every projection's weight instead of the
checkpoint's (the linear-weights hook point, docs/architecture.md §6). `{"precision": {"weights":
"nvfp4"}}` (or "mxfp4"; "fp4": whichever FP4 copy is loaded, NVFP4 first; "bf16" / "none": the primary
weights, as without the field). Which FP4 copies exist is a server option (`precisions`, `--precisions
bf16,nvfp4`): each one loaded is an `FP4Format` on every projection of every decoder layer (qkv, o,
gate_up, down; the embeddings and lm_head stay as loaded), quantized from the dense weight at start by
round-to-nearest. A request for a copy the server did not load is refused, naming the field and the
loaded precisions.

A request for the primary weights gets no plan (it is a plain request). Rows of other requests keep the
primary format's bits (the layers take an FP4 product only on the rows this hook selects). The FP4
choice travels as a per-row input (the copy's index, -1 = primary), so the hook reads nothing else and
decode steps replay from CUDA graphs (`graph_safe`). A prompt computed with FP4 weights has other K/V
than a bf16 one: the plan, the copy's name, is its prefix-cache key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from actserve.interventions.base import (
    PROJECTIONS,
    FormatRequest,
    FP4Format,
    InterventionError,
    InterventionPlugin,
    LinearWeightsHook,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
)
from actserve.kernels.fp4_ref import Fp4Kind

PRIMARY = ("bf16", "none")  # names of the checkpoint's own weights (whatever --dtype made of them)
FP4_KINDS: tuple[Fp4Kind, ...] = get_args(Fp4Kind)  # ("nvfp4", "mxfp4"): a row input holds the index
Weights = Literal["bf16", "none", "fp4", "nvfp4", "mxfp4"]
ANY_FP4 = "fp4"  # the first loaded kind of FP4_KINDS
INPUT = "fp4"


def parse_precisions(names: str | Iterable[str]) -> tuple[Fp4Kind, ...]:
    """The FP4 copies precision names ask for ("bf16,nvfp4" or a list), in FP4_KINDS order (the primary
    names are accepted and add nothing: the primary weights are always there). ValueError on others."""
    wanted = set()
    for raw in names.split(",") if isinstance(names, str) else names:
        name = raw.strip()
        if name not in PRIMARY + FP4_KINDS:
            raise ValueError(f"unknown precision {name!r}; known: {', '.join(PRIMARY[:1] + FP4_KINDS)}")
        wanted.add(name)
    return tuple(k for k in FP4_KINDS if k in wanted)


class PrecisionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: Weights = Field(
        description="the weights this request's matmuls use: bf16 or none (the checkpoint's), nvfp4 or "
        "mxfp4 (an FP4 copy of every decoder projection; only those the server loaded, --precisions), "
        "or fp4 (the loaded FP4 copy, nvfp4 first)"
    )


class FP4Hook:
    """At every site, rows whose input holds a copy's index take that copy (key = the kind's name)."""

    def __init__(self, sites: dict[tuple[int, str], tuple[str, ...]]) -> None:
        self._sites = sites

    def sites(self) -> dict[tuple[int, str], tuple[str, ...]]:
        return self._sites

    def select(self, layer: int, proj: str, key: str, inputs: RowInputs) -> torch.Tensor:
        return inputs[INPUT][:, 0] == FP4_KINDS.index(key)


class PrecisionPlugin(InterventionPlugin):
    name = "precision"
    description = (
        "Per-request weight precision: 'nvfp4' or 'mxfp4' runs this request's decoder projections on an "
        "FP4 copy of their weights (W4A16, round-to-nearest); 'bf16' the checkpoint's weights."
    )
    hook_points = ("linear_weights",)
    spec_model = PrecisionSpec
    row_inputs = (RowInput(INPUT, torch.int32, 1, -1),)
    graph_safe = True

    def configure(self, options: Mapping[str, Any]) -> None:
        """Option `precisions` ("bf16,nvfp4" or a list of names); none: no FP4 copy, FP4 requests refused."""
        self.loaded = parse_precisions(options.get("precisions", ()))
        if self.loaded and self.model_info.moe is not None:
            raise ValueError(
                "precisions: FP4 copies of a mixture-of-experts model's experts are not built; "
                "serve it without --precisions"
            )
        self.sites = [(layer, p) for layer in range(self.model_info.num_layers) for p in PROJECTIONS]

    def available(self) -> tuple[str, ...]:
        return PRIMARY[:1] + self.loaded

    def weight_formats(self) -> list[FormatRequest]:
        return [FormatRequest(k, frozenset(self.sites), partial(FP4Format, k)) for k in self.loaded]

    def prepare(self, spec: BaseModel, param: str) -> Fp4Kind | None:
        """The FP4 kind asked for (the plan); None for the primary weights: no plan, a plain request."""
        assert isinstance(spec, PrecisionSpec)
        if spec.weights in PRIMARY:
            return None
        where = f"{param}.weights"
        if spec.weights == ANY_FP4 and self.loaded:
            kind = self.loaded[0]
        else:
            kind = cast(Fp4Kind, spec.weights)
        if kind not in self.loaded:
            loaded = ", ".join(self.available())
            raise InterventionError(
                f"{where}: {kind} weights are not loaded on this server; loaded: {loaded} (--precisions)",
                where,
            )
        if self.model_info.implementation != "native":  # weight formats exist in native models only
            raise InterventionError(f"{where}: FP4 weights need the native model implementation", where)
        return kind

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            arrays[INPUT][s.start : s.start + s.count, 0] = FP4_KINDS.index(s.plan)

    def _hook(self, kinds: Iterable[str]) -> LinearWeightsHook | None:
        wanted = set(kinds)
        keys = tuple(k for k in self.loaded if k in wanted)
        return FP4Hook(dict.fromkeys(self.sites, keys)) if keys else None

    def weights_hook(self, spans: list[RowSpan], num_rows: int) -> LinearWeightsHook | None:
        """Only the copies this step's rows asked for."""
        return self._hook(s.plan for s in spans)

    def graph_hooks(self) -> PluginHooks:
        return PluginHooks(weights=self._hook(self.loaded))

    def metric_label(self, plan: Fp4Kind) -> str:  # type: ignore[override]
        """The FP4 kind ("nvfp4", "mxfp4"; "fp4" counts as the kind it picked). A primary-weights request
        has no plan and is not counted here (only in the server's request counters)."""
        return plan

    def prefix_key(self, plan: Fp4Kind) -> str:  # type: ignore[override]
        """The FP4 copy's name: prompts share K/V only with prompts computed with the same copy."""
        return plan
