"""The generic plugin contract of issue 11 (docs/architecture.md §6): options reach `configure`, plugins
own services and find peers by name, contributors' rows join their owner's group, and the CUDA-graph
width is what the plugins declare. The registry names no plugin; these use toy plugins as well."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from actserve.interventions.base import InterventionPlugin, ModelInfo, RowSpan
from actserve.interventions.registry import InterventionRegistry, discover
from actserve.interventions.steering.library import VectorLibrary
from actserve.interventions.steering.schema import MAX_VECTORS_PER_REQUEST

INFO = ModelInfo("m", "/m", "LlamaForCausalLM", "native", 2, 8, 32, 64, torch.float32, torch.device("cpu"))


class _Spec(BaseModel):
    x: int = 0


class Owner(InterventionPlugin):
    name = "owner"
    description = "a toy fused table"
    hook_points = ("residual",)
    spec_model = _Spec
    graph_columns = 3
    seen: ClassVar[list[list[RowSpan]]] = []

    def configure(self, options: Any) -> None:
        self.service = dict(options)

    def prepare(self, spec: BaseModel, param: str) -> Any:
        return spec

    def fused_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, 2, 8), torch.zeros(1, 2, dtype=torch.bool)

    def residual_hook(self, spans: list[RowSpan], num_rows: int) -> None:
        self.seen.append(spans)


class Helper(Owner):
    name = "helper"
    contributes_to = "owner"
    graph_columns = 2

    def fused_table(self) -> None:  # type: ignore[override]
        return None


def test_toy_plugins_options_peers_groups_width() -> None:
    reg = InterventionRegistry(INFO, {"owner": Owner, "helper": Helper}, options={"owner": {"k": 1}})
    assert reg.service("owner") == {"k": 1} and reg.service("helper") == {}
    assert reg.fused is reg.plugin("owner") and reg.plugin("helper").peer("owner") is reg.fused  # type: ignore[union-attr]
    assert reg.graph_width() == 5
    a, b = RowSpan(None, 0, 1, 0, 1), RowSpan(None, 1, 1, 0, 1)
    assert reg.group_spans({"helper": [a], "owner": [b]}) == {"owner": [a, b]}
    Owner.seen.clear()
    reg.step_hooks({"helper": [a], "owner": [b]}, 2)
    assert Owner.seen == [[a, b]]  # one hook, on the owner, for both plugins' rows
    alone = InterventionRegistry(INFO, {"helper": Helper})  # no owner loaded: its rows stay its own
    assert alone.fused is None and alone.graph_width() == 0
    assert alone.group_spans({"helper": [a]}) == {"helper": [a]}


def test_in_tree_plugins_through_the_generic_contract(tmp_path: Path) -> None:
    reg = InterventionRegistry(INFO, discover(), options={"steering": {"vectors_dir": str(tmp_path)}})
    assert isinstance(reg.service("steering"), VectorLibrary)
    assert reg.graph_width() == MAX_VECTORS_PER_REQUEST + 1  # a request's vectors + one CoT direction
    assert reg.fused is reg.plugin("steering")
    assert reg.owner("cot_compression") == "steering"
