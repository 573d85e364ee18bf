"""`moe`: experts per token, per request, on a native mixture-of-experts model (the `moe` hook point,
docs/architecture.md §6). `{"moe": {"top_k": k}}` routes every token of the request (prompt and
generated) through its k highest-scoring experts at every MoE layer instead of the model's
`num_experts_per_tok`, weighted as the model's router weights them (softmax over all experts; the k
weights renormalised to sum to 1 where the model renormalises: Mixtral, and Qwen-MoE / OLMoE with
`norm_topk_prob`). That is the model with `num_experts_per_tok = k`; 1 <= k <= num_experts.

A row's k travels as a per-row input (`moe_top_k`, -1 = the model's routing), so one step mixes
requests of different k: the hook routes at the step's widest k and a row with a smaller one leaves
its extra columns empty (expert -1, weight 0: no weight reads, +0.0 in the sum), and rows without the
field get the model's routing bit for bit. Decode steps replay from CUDA graphs captured at a fixed
width, option `graph_top_k` (default min(num_experts, 2 x num_experts_per_tok)); a step with a wider
request runs eager (`graph_mode` None). The k changes the prompt's K/V, so it is the prefix-cache key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from actserve.interventions.base import (
    InterventionError,
    InterventionPlugin,
    ModelInfo,
    MoEHook,
    MoEInfo,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
)
from actserve.kernels.moe_ref import route_topk

INPUT = "moe_top_k"  # per row: its experts per token, -1 = the model's own routing


class MoESpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: StrictInt = Field(
        description="experts per token at every MoE layer, 1 to the model's number of experts (its default "
        "is the config's num_experts_per_tok); weighted and renormalised as the model's router does"
    )


class TopKHook:
    """Routes rows whose input holds k through their top k experts, at a fixed width (>= every k)."""

    def __init__(self, info: MoEInfo, width: int) -> None:
        self.info, self.width = info, width

    def layers(self) -> set[int]:
        return set(self.info.layers)

    def route(
        self, layer: int, router_logits: torch.Tensor, top_k: int, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = inputs[INPUT][:, 0]
        mine = k > 0
        ids, weights = route_topk(router_logits, self.width, self.info.renormalize, row_k=k.clamp(min=1))
        plain_ids, plain_w = route_topk(router_logits, top_k, self.info.renormalize)
        pad = self.width - top_k
        plain_ids = torch.nn.functional.pad(plain_ids, (0, pad), value=-1)
        plain_w = torch.nn.functional.pad(plain_w, (0, pad), value=0.0)
        keep = mine.unsqueeze(1)
        return torch.where(keep, ids, plain_ids), torch.where(keep, weights, plain_w)


class MoEPlugin(InterventionPlugin):
    name = "moe"
    description = (
        "Experts per token on a mixture-of-experts model: top_k experts at every MoE layer for this "
        "request's tokens, renormalised as the model's router does."
    )
    hook_points = ("moe",)
    spec_model = MoESpec
    row_inputs = (RowInput(INPUT, torch.int32, 1, -1),)
    graph_safe = True

    def __init__(self, model_info: ModelInfo) -> None:
        super().__init__(model_info)
        moe = model_info.moe
        self.graph_top_k = min(moe.num_experts, 2 * moe.top_k) if moe is not None else 0

    def configure(self, options: Mapping[str, Any]) -> None:
        """Option `graph_top_k`: the width decode CUDA graphs are captured at (wider requests run eager)."""
        moe = self.model_info.moe
        given = options.get("graph_top_k")
        if given is None or moe is None:
            return
        if not isinstance(given, int) or not moe.top_k <= given <= moe.num_experts:
            raise ValueError(f"moe option graph_top_k must be an integer in [{moe.top_k}, {moe.num_experts}]")
        self.graph_top_k = given

    def prepare(self, spec: BaseModel, param: str) -> int | None:
        """The row's k (the plan); None when it is the model's own (a plain request)."""
        assert isinstance(spec, MoESpec)
        info, where = self.model_info, f"{param}.top_k"
        if info.moe is None:
            if info.is_moe:
                why = f"the transformers fallback serves this model ({info.fallback_reason})"
                raise InterventionError(f"{where}: needs the native MoE implementation; {why}", where)
            raise InterventionError(f"{where}: {info.name} is not a mixture-of-experts model", where)
        n = info.moe.num_experts
        if not 1 <= spec.top_k <= n:
            msg = f"{where} must be in [1, {n}] (the model's experts); got {spec.top_k}"
            raise InterventionError(msg, where)
        return None if spec.top_k == info.moe.top_k else spec.top_k

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            arrays[INPUT][s.start : s.start + s.count, 0] = s.plan

    def moe_hook(self, spans: list[RowSpan], num_rows: int) -> MoEHook | None:
        """At the step's widest k (and at least the model's, so plain rows fit)."""
        moe = self.model_info.moe
        if moe is None:
            return None
        return TopKHook(moe, max(moe.top_k, *(s.plan for s in spans)))

    def graph_hooks(self) -> PluginHooks:
        moe = self.model_info.moe
        return PluginHooks(moe=TopKHook(moe, self.graph_top_k)) if moe is not None else PluginHooks()

    def graph_mode(self, spans: list[RowSpan], num_rows: int) -> str | None:
        """None (eager) when a row needs more experts than the captured width."""
        return "" if all(s.plan <= self.graph_top_k for s in spans) else None

    def prefix_key(self, plan: int) -> tuple[str, int]:  # type: ignore[override]
        """The prompt's K/V depends on the experts its tokens went through."""
        return ("top_k", plan)
