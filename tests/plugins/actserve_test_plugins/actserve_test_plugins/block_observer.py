"""`test_block_observer`: records, per request tag, every KV block its sequence fills: (layer, the
sequence's logical block index, mean of the block's keys over its tokens), through the attention hook's
`filled` observer. It reads the blocks back on the host, so it is not graph-safe."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field

from actserve.interventions.base import (
    AttentionHook,
    InterventionError,
    InterventionPlugin,
    RowInputs,
    RowSpan,
)

# (layer, logical block index, mean key [kv_heads, head_dim] float32 on the CPU)
Record = tuple[int, int, torch.Tensor]


class BlockObserverSpec(BaseModel):
    tag: str = Field(min_length=1, max_length=64)


class _Hook:
    def __init__(self, owner: BlockObserverPlugin, spans: list[RowSpan]) -> None:
        self.owner, self.spans = owner, spans

    def layers(self) -> set[int]:
        return set(range(self.owner.model_info.num_layers))

    def select(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, inputs: RowInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tables, lens

    def filled(
        self, layer: int, kv_cache: torch.Tensor, blocks: torch.Tensor, rows: torch.Tensor, inputs: RowInputs
    ) -> None:
        bs = self.owner.model_info.block_size
        for block, row in zip(blocks.tolist(), rows.tolist(), strict=True):
            span = next((s for s in self.spans if s.start <= row < s.start + s.count), None)
            if span is None:  # -1, or another request's row
                continue
            logical = (span.pos0 + row - span.start) // bs
            mean = kv_cache[0, block * bs : (block + 1) * bs].float().mean(0).cpu()
            self.owner.records.setdefault(span.plan.tag, []).append((layer, logical, mean))


class BlockObserverPlugin(InterventionPlugin):
    name = "test_block_observer"
    description = "Test plugin: records the mean key of every KV block the request fills, per layer."
    hook_points = ("attention",)
    spec_model = BlockObserverSpec

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: dict[str, list[Record]] = {}

    def prepare(self, spec: BaseModel, param: str) -> Any:
        assert isinstance(spec, BlockObserverSpec)
        if self.model_info.implementation != "native":  # attention hooks exist in native models only
            raise InterventionError("needs the native model implementation", param)
        return spec

    def attention_hook(self, spans: list[RowSpan], num_rows: int) -> AttentionHook:
        return _Hook(self, spans)

    def prefix_key(self, plan: Any) -> Any:
        return None  # observes only
