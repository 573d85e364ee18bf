"""CoT compression (ASC): h <- h + γ·v at the ASC layer, for every generated token of the request.

With an artifact onset (`Onset`), also h <- h + γ·weight·u at the onset layer for the first few
generated tokens. It is steering with fixed vectors, so it lives in the steering plugin's table: one slot
of that table is reserved for each of the artifact's directions (resident once, shared by every
request), each request's plan is a `SteeringPlan` with a vector in each slot (scale γ, resp. γ·weight
with the onset's token window; generation phase only), and the
registry hands its rows to the steering plugin together with the steering rows
(`contributes_to = "steering"`), so a step mixing steering and CoT compression is one fused kernel per
layer and still replays from CUDA graphs. The steering plugin is found by name among the registry's
plugins (`peer`); its API is `reserve_slot` and its table. Without a steering plugin in the registry (a
registry built for CoT compression alone) it keeps a private one-slot table. γ comes from the request
(`strength`) or from the artifact's calibration table (`kl_budget`). The artifact comes from the
plugin's option `artifact` (`--cot-compression FILE|default`), loaded by `configure` when the engine
starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from actserve.interventions.base import InterventionError, InterventionPlugin, RowSpan
from actserve.interventions.cot_compression.artifact import ArtifactError, AscArtifact, load_artifact
from actserve.interventions.cot_compression.schema import CoTCompressionSpec
from actserve.interventions.steering.plugin import (
    PreparedVector,
    SteeringHook,
    SteeringPlan,
    SteeringPlugin,
    prompt_key,
)
from actserve.server.contract import ModelInfo

log = logging.getLogger(__name__)
NOT_CONFIGURED = "cot_compression is not configured for this model; build it with `actserve cot build`"
# `--cot-compression default`: the artifact shipped for the embedded default model (data/README.md says
# how it was built), so the default model compresses without a 5-13 minute build
DEFAULT_ARTIFACT = "default"
SHIPPED_ARTIFACT = Path(__file__).with_name("data") / "smollm2-135m-instruct.asc.safetensors"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # the model it was built for (server/models/default_model.py)


@dataclass
class CoTPlan(SteeringPlan):
    """A steering plan (no vector when γ = 0) plus what the request asked for."""

    gamma: float = 0.0
    kl_budget: float | None = None
    artifact: AscArtifact | None = None


class _Part(NamedTuple):
    """One of an artifact's pushes as a steering row: [num_layers, hidden] with the direction at `layer`."""

    row: torch.Tensor
    layer: int
    weight: float
    window: tuple[int, int | None] | None


def resolve_artifact_path(option: str, info: ModelInfo) -> Path:
    """The file behind `--cot-compression`: a path, or `default` = the shipped artifact, which only the
    embedded default model may use (its calibration belongs to those exact weights; another model of
    the same shape would load it and be steered wrongly)."""
    if option != DEFAULT_ARTIFACT:
        return Path(option)
    if not info.embedded_default:
        raise ArtifactError(
            f"--cot-compression default: the shipped artifact is for the embedded default model "
            f"({DEFAULT_MODEL}, served when --model is not given); this server runs {info.name} "
            f"({info.path}). Build one for it: `actserve cot build --model {info.path} --out FILE`, then "
            "`--cot-compression FILE` (a file named 'default': pass ./default)"
        )
    return SHIPPED_ARTIFACT


def load_configured(option: str | None, info: ModelInfo) -> AscArtifact | None:
    """The artifact of `--cot-compression FILE|default` (`option`), checked against the model."""
    if not option:
        return None
    art = load_artifact(resolve_artifact_path(option, info))
    art.check_fits(info)
    if art.model and art.model != info.name:
        log.warning("CoT compression artifact was built on %r; serving %r", art.model, info.name)
    return art


class CoTCompressionPlugin(InterventionPlugin):
    name = "cot_compression"
    description = (
        "Shorter chains of thought (ASC): push the residual along a concise-minus-verbose direction at every "
        "generated token, by a strength or by a per-token KL budget."
    )
    hook_points = ("residual",)
    spec_model = CoTCompressionSpec
    contributes_to = "steering"
    graph_columns = 1  # one resident direction per row in a graph step (the onset's rows run eagerly)
    tp_mode = "replicated"  # tensor parallelism: every rank adds to the replicated residual

    def __init__(self, model_info: ModelInfo) -> None:
        super().__init__(model_info)
        # the artifact in use (`configure`; swap it only while no CoT request runs)
        self.artifact: AscArtifact | None = None
        self._table: SteeringPlugin | None = None  # the steering table ...
        self._slots: list[int] = []  # ... and the slots reserved there (main direction, onset)
        self._reserve_lock = threading.Lock()
        self._resident: AscArtifact | None = None
        self._parts_of: tuple[AscArtifact, list[_Part]] | None = None  # one artifact at a time

    def _reserved(self, count: int) -> tuple[SteeringPlugin, list[int]]:
        """The registry's steering plugin (a peer) and `count` slots reserved there."""
        with self._reserve_lock:  # API threads prepare while the engine thread activates
            if self._table is None:
                shared = self.peer("steering")
                own = not isinstance(shared, SteeringPlugin)  # a registry without steering
                self._table = SteeringPlugin(self.model_info, 2) if own else shared
            while len(self._slots) < count:
                self._slots.append(self._table.reserve_slot())
            return self._table, self._slots[:count]

    def configure(self, options: Mapping[str, Any]) -> None:
        """Option `artifact`: a file from `actserve cot build`, or `default` (the shipped one)."""
        self.artifact = load_configured(options.get("artifact"), self.model_info)

    def _parts(self, art: AscArtifact) -> list[_Part]:
        cached = self._parts_of
        if cached is not None and cached[0] is art:
            return cached[1]
        pushes = [(art.direction, art.layer, 1.0, None)]
        if art.onset is not None:
            o = art.onset
            pushes.append((o.direction, o.layer, o.weight, (0, o.tokens)))
        parts = []
        for direction, layer, weight, window in pushes:
            row = torch.zeros(self.model_info.num_layers, self.model_info.hidden_size, dtype=torch.float32)
            row[layer] = direction
            parts.append(_Part(row, layer, weight, window))
        self._parts_of = (art, parts)
        return parts

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
        parts = self._parts(art)
        vectors = []
        if gamma != 0.0:  # γ = 0 steers no row: the request runs exactly as an unsteered one
            slots = self._reserved(len(parts))[1]
            vectors = [
                PreparedVector(
                    data=p.row,
                    layers=[p.layer],
                    scale=gamma * p.weight,
                    prompt=False,
                    generation=True,
                    normalize=False,
                    window=p.window,
                    slot=slot,
                )
                for p, slot in zip(parts, slots, strict=True)
            ]
        layers = {p.layer for p in parts}
        return CoTPlan(vectors=vectors, layers=layers, gamma=gamma, kl_budget=spec.kl_budget, artifact=art)

    def activate(self, plan: CoTPlan) -> None:  # type: ignore[override]
        """Engine thread: put the plan's direction in the reserved slot unless it is there already (it
        normally is: one artifact per engine; swap artifacts only while no CoT request runs)."""
        if not plan.vectors or self._resident is plan.artifact:
            return
        steering = self._reserved(len(plan.vectors))[0]
        table, mask = steering.table, steering.layer_mask
        for vec in plan.vectors:
            table[vec.slot] = vec.data.to(table.device, table.dtype)
            mask[vec.slot] = False
            mask[vec.slot, vec.layers] = True
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
                "onset": None
                if art.onset is None
                else {"layer": art.onset.layer, "tokens": art.onset.tokens, "weight": art.onset.weight},
                "calibration": [[g, k] for g, k in zip(art.gammas, art.kls, strict=True)],
            }
        )
        return schema

    def prefix_key(self, plan: CoTPlan) -> tuple | None:  # type: ignore[override]
        return prompt_key(plan)

    def residual_hook(self, spans: list[RowSpan], num_rows: int) -> SteeringHook | None:
        """Used only without a shared steering plugin (the registry merges these rows into steering's)."""
        return self._reserved(0)[0].residual_hook(spans, num_rows)
