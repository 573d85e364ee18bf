"""`logit_bias`: OpenAI's logit_bias as a plugin on the logits hook (docs/architecture.md §6): per row,
up to 300 (token id, bias) pairs added to the logits before sampling. The API's `logit_bias` field maps
to it; rows without it keep their logits bit for bit."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from actserve.interventions.base import (
    InterventionError,
    InterventionPlugin,
    LogitsHook,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
)

MAX_ENTRIES = 300  # OpenAI's limit
MAX_BIAS = 100.0


class LogitBiasSpec(BaseModel):
    """`bias`: token id (as a string, as in OpenAI's JSON) -> bias in [-100, 100], at most 300 entries."""

    model_config = ConfigDict(extra="forbid")

    bias: dict[str, float] = Field(max_length=MAX_ENTRIES)


class BiasHook:
    """logits[r, ids[r, j]] += bias[r, j] for the listed ids (-1: none); other rows unchanged."""

    def apply(self, logits: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        ids, bias = inputs["bias_ids"], inputs["bias"]
        valid = ids >= 0
        bias = torch.where(valid, bias, 0).to(logits.dtype)  # `none` entries add 0 to token 0
        add = torch.zeros_like(logits).scatter_add_(1, ids.clamp(min=0), bias)
        return torch.where(valid.any(1, keepdim=True), logits + add, logits)


class LogitBiasPlugin(InterventionPlugin):
    name = "logit_bias"
    description = "OpenAI logit_bias: add a bias in [-100, 100] to the logits of up to 300 token ids."
    hook_points = ("logits",)
    spec_model = LogitBiasSpec
    row_inputs = (
        RowInput("bias_ids", torch.int64, MAX_ENTRIES, -1),
        RowInput("bias", torch.float32, MAX_ENTRIES, 0.0),
    )
    graph_safe = True
    tp_mode = "rank0"  # tensor parallelism: logits only: where they are (rank 0)

    def prepare(self, spec: BaseModel, param: str) -> tuple[list[int], list[float]]:
        assert isinstance(spec, LogitBiasSpec)
        vocab = self.model_info.vocab_size
        ids: list[int] = []
        for key, value in spec.bias.items():
            where = f"{param}.bias.{key}"
            tid = int(key) if key.isascii() and key.isdigit() else -1
            if not 0 <= tid < vocab:
                raise InterventionError(f"{where}: token id must be an integer in [0, {vocab - 1}]", where)
            if tid in ids:
                raise InterventionError(f"{where}: token id {tid} is given twice", where)
            if not -MAX_BIAS <= value <= MAX_BIAS:
                raise InterventionError(f"{where}: bias must be in [-100, 100]; got {value}", where)
            ids.append(tid)
        return ids, list(spec.bias.values())

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            ids, bias = s.plan
            row = s.start + s.count - 1  # only the row that picks the next token
            arrays["bias_ids"][row, : len(ids)] = ids
            arrays["bias"][row, : len(ids)] = bias

    def prefix_key(self, plan: object) -> None:
        """Logits only: the prompt's KV is a plain request's, so the prefix cache shares it."""
        return None

    def logits_hook(self, spans: list[RowSpan], num_rows: int) -> LogitsHook:
        return BiasHook()

    def graph_hooks(self) -> PluginHooks:
        return PluginHooks(logits=BiasHook())
