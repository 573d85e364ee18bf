"""CoT compression (ASC): h <- h + γ·v at the ASC layer, for every generated token of the request.

It is steering with one fixed vector, so it lives in the steering plugin's table: one slot of that
table is reserved for the artifact's direction (resident once, shared by every request), each request's
plan is a `SteeringPlan` with one vector in that slot (scale γ, generation phase only), and the
registry hands its rows to the steering plugin together with the steering rows
(`shares_steering_table`), so a step mixing steering and CoT compression is one fused kernel per layer
and still replays from CUDA graphs. Without a steering plugin in the registry (a registry built for
CoT compression alone) it keeps a private one-slot table. γ comes from the request (`strength`) or
from the artifact's calibration table (`kl_budget`). The artifact reaches the plugin through the
registry's shared `context` (`ASC_KEY`), filled from `EngineConfig.cot_compression` by `cot_context`
when the engine starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from actserve.interventions.base import InterventionError, InterventionPlugin, RowSpan
from actserve.interventions.cot_compression.artifact import AscArtifact, load_artifact
from actserve.interventions.cot_compression.schema import CoTCompressionSpec
from actserve.interventions.registry import plugin_key
from actserve.interventions.steering.plugin import PreparedVector, SteeringHook, SteeringPlan, SteeringPlugin
from actserve.server.engine.config import EngineConfig
from actserve.server.models.loader import ModelInfo

log = logging.getLogger(__name__)
ASC_KEY = "cot_compression.artifact"
NOT_CONFIGURED = "cot_compression is not configured for this model; build it with `actserve cot build`"


@dataclass
class CoTPlan(SteeringPlan):
    """A steering plan (no vector when γ = 0) plus what the request asked for."""

    gamma: float = 0.0
    kl_budget: float | None = None
    artifact: AscArtifact | None = None


def cot_context(config: EngineConfig, info: ModelInfo) -> dict[str, Any]:
    """Registry context entries for `--cot-compression FILE`: the artifact, checked against the model."""
    if not config.cot_compression:
        return {}
    art = load_artifact(config.cot_compression)
    art.check_fits(info)
    if art.model and art.model != info.name:
        log.warning("CoT compression artifact was built on %r; serving %r", art.model, info.name)
    return {ASC_KEY: art}


class CoTCompressionPlugin(InterventionPlugin):
    name = "cot_compression"
    description = (
        "Shorter chains of thought (ASC): push the residual along a concise-minus-verbose direction at every "
        "generated token, by a strength or by a per-token KL budget."
    )
    hook_points = ("residual",)
    spec_model = CoTCompressionSpec
    shares_steering_table = True

    def __init__(self, model_info: ModelInfo) -> None:
        super().__init__(model_info)
        self._table: tuple[SteeringPlugin, int] | None = None  # the steering table and the reserved slot
        self._resident: AscArtifact | None = None
        self._row_of: tuple[AscArtifact, torch.Tensor] | None = None  # artifact, its [layers, hidden] row

    def _slot(self) -> tuple[SteeringPlugin, int]:
        """The registry's steering plugin (from the shared context) and the slot reserved there."""
        if self._table is None:
            shared = self.context.get(plugin_key("steering"))
            if isinstance(shared, SteeringPlugin):
                self._table = (shared, shared.reserve_slot())
            else:
                self._table = (SteeringPlugin(self.model_info, slots=1), 0)
        return self._table

    @property
    def artifact(self) -> AscArtifact | None:
        return self.context.get(ASC_KEY)

    def _row(self, art: AscArtifact) -> torch.Tensor:
        cached = self._row_of
        if cached is not None and cached[0] is art:
            return cached[1]
        row = torch.zeros(self.model_info.num_layers, self.model_info.hidden_size, dtype=torch.float32)
        row[art.layer] = art.direction
        self._row_of = (art, row)  # one artifact at a time
        return row

    def prepare(self, spec: CoTCompressionSpec, param: str) -> CoTPlan:  # type: ignore[override]
        art = self.artifact
        if art is None:
            raise InterventionError(NOT_CONFIGURED, param)
        if spec.kl_budget is not None:
            if spec.kl_budget > art.max_kl:
                raise InterventionError(
                    f"{param}.kl_budget: {spec.kl_budget} is above this model's calibrated range "
                    f"[0, {art.max_kl:.4g}] nats per token; use a smaller budget or an explicit strength",
                    f"{param}.kl_budget",
                )
            gamma = art.gamma_for(spec.kl_budget)
        else:
            assert spec.strength is not None
            gamma = spec.strength
        vectors = []
        if gamma != 0.0:  # γ = 0 steers no row: the request runs exactly as an unsteered one
            vectors.append(
                PreparedVector(
                    data=self._row(art),
                    layers=[art.layer],
                    scale=gamma,
                    prompt=False,
                    generation=True,
                    normalize=False,
                    slot=self._slot()[1],
                )
            )
        layers = {art.layer}
        return CoTPlan(vectors=vectors, layers=layers, gamma=gamma, kl_budget=spec.kl_budget, artifact=art)

    def activate(self, plan: CoTPlan) -> None:  # type: ignore[override]
        """Engine thread: put the plan's direction in the reserved slot unless it is there already (it
        normally is: one artifact per engine; swap artifacts only while no CoT request runs)."""
        if not plan.vectors or self._resident is plan.artifact:
            return
        steering, slot = self._slot()
        table, mask = steering.table, steering.layer_mask
        table[slot] = plan.vectors[0].data.to(table.device, table.dtype)
        mask[slot] = False
        mask[slot, plan.vectors[0].layers] = True
        self._resident = plan.artifact

    def json_schema(self) -> dict[str, Any]:
        """The request schema plus what this server's artifact allows (the kl_budget range)."""
        schema = super().json_schema()
        art = self.artifact
        schema["x-actserve-artifact"] = (
            None
            if art is None
            else {
                "layer": art.layer,
                "model": art.model,
                "kl_budget_max": art.max_kl,
                "calibration": [[g, k] for g, k in zip(art.gammas, art.kls, strict=True)],
            }
        )
        return schema

    def residual_hook(self, spans: list[RowSpan], num_rows: int) -> SteeringHook | None:
        """Used only without a shared steering plugin (the registry merges these rows into steering's)."""
        return self._slot()[0].residual_hook(spans, num_rows)
