"""`test_logit_bias`: add a bias to chosen token ids' logits for the request's rows (logits hook)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from actserve.interventions.base import (
    InterventionError,
    InterventionPlugin,
    LogitsHook,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
)

MAX_TOKENS = 4


class LogitBiasSpec(BaseModel):
    token_ids: list[int] = Field(min_length=1, max_length=MAX_TOKENS)
    bias: float = Field(allow_inf_nan=False)


class _Hook:
    def apply(self, logits: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        ids, bias = inputs["bias_ids"], inputs["bias"]
        valid = ids >= 0
        add = torch.zeros_like(logits)
        add.scatter_add_(1, ids.clamp(min=0), torch.where(valid, bias, 0.0).to(logits.dtype))
        return torch.where(valid.any(1, keepdim=True), logits + add, logits)


class LogitBiasPlugin(InterventionPlugin):
    name = "test_logit_bias"
    description = "Test plugin: adds `bias` to the logits of `token_ids` for this request's rows."
    hook_points = ("logits",)
    spec_model = LogitBiasSpec
    row_inputs = (
        RowInput("bias_ids", torch.int64, MAX_TOKENS, -1),
        RowInput("bias", torch.float32, MAX_TOKENS, 0.0),
    )
    graph_safe = True

    def prepare(self, spec: BaseModel, param: str) -> Any:
        assert isinstance(spec, LogitBiasSpec)
        for i, t in enumerate(spec.token_ids):
            if not 0 <= t < self.model_info.vocab_size:
                raise InterventionError(f"token id {t} outside the vocabulary", f"{param}.token_ids[{i}]")
        return spec

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            k = len(s.plan.token_ids)
            arrays["bias_ids"][s.start : s.start + s.count, :k] = s.plan.token_ids
            arrays["bias"][s.start : s.start + s.count, :k] = s.plan.bias

    def logits_hook(self, spans: list[RowSpan], num_rows: int) -> LogitsHook:
        return _Hook()

    def graph_hooks(self) -> PluginHooks:
        return PluginHooks(logits=_Hook())

    def prefix_key(self, plan: Any) -> Any:
        return None  # logits only: the prompt's KV is a plain request's
