"""`test_kv_window`: at decode, a row reads only its first `first` and last `last` KV blocks (the last one
being the partly filled current block), through the attention hook's block selection."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from actserve.interventions.base import (
    AttentionHook,
    InterventionError,
    InterventionPlugin,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
)


class KVWindowSpec(BaseModel):
    first: int = Field(ge=0, le=1024)
    last: int = Field(ge=1, le=1024)  # at least the current block: a token always sees itself


class _Hook:
    """Reads only row inputs and uses device ops of fixed shapes, so a decode CUDA graph can capture it."""

    def __init__(self, num_layers: int, block_size: int) -> None:
        self._layers, self.block_size = set(range(num_layers)), block_size

    def layers(self) -> set[int]:
        return self._layers

    def select(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bs, width = self.block_size, tables.shape[1]
        w = inputs["window"].long()
        first, last = w[:, 0], w[:, 1]
        used = (lens.long() + bs - 1) // bs  # blocks the row's context spans
        drop = used - first - last  # middle blocks to skip
        cut = (first >= 0) & (drop > 0)  # `none` rows (first = -1) keep everything
        col = torch.arange(width, device=tables.device).unsqueeze(0)
        src = torch.where(col < first.unsqueeze(1), col, col + drop.clamp(min=0).unsqueeze(1))
        picked = tables.gather(1, src.clamp(max=width - 1))
        new_lens = (lens.long() - drop.clamp(min=0) * bs).to(lens.dtype)
        return torch.where(cut.unsqueeze(1), picked, tables), torch.where(cut, new_lens, lens)

    def filled(
        self, layer: int, kv_cache: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor, inputs: RowInputs
    ) -> None:
        """Nothing to observe."""


class KVWindowPlugin(InterventionPlugin):
    name = "test_kv_window"
    description = "Test plugin: at decode, a row attends only to its first `first` and last `last` KV blocks."
    hook_points = ("attention",)
    spec_model = KVWindowSpec
    row_inputs = (RowInput("window", torch.int32, 2, -1),)
    graph_safe = True

    def prepare(self, spec: BaseModel, param: str) -> Any:
        assert isinstance(spec, KVWindowSpec)
        if self.model_info.implementation != "native":  # attention hooks exist in native models only
            raise InterventionError("needs the native model implementation", param)
        return spec

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        for s in spans:
            arrays["window"][s.start : s.start + s.count] = (s.plan.first, s.plan.last)

    def _hook(self) -> AttentionHook:
        return _Hook(self.model_info.num_layers, self.model_info.block_size)

    def attention_hook(self, spans: list[RowSpan], num_rows: int) -> AttentionHook:
        return self._hook()

    def graph_hooks(self) -> PluginHooks:
        return PluginHooks(attention=self._hook())

    def prefix_key(self, plan: Any) -> Any:
        return None  # selection at decode only: the prompt's KV is a plain request's
