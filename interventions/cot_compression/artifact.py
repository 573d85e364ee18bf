"""The ASC artifact: one safetensors file holding the direction, its layer and the KL calibration table.

Tensors: `direction` [hidden] float32, `calibration.gamma` [n] and `calibration.kl` [n] float64 (γ
ascending, per-token KL ascending: since version 2 the one-sided 95 % upper confidence bound of the mean
over the calibration prompts, in version 1 the mean itself; `info` holds both). Metadata (strings):
`format` = "actserve.asc", `version`, `layer`, `hidden_size`, `num_layers`, `model`, and `info` (JSON:
how it was built).
Version 2 adds an optional ONSET: tensor `onset.direction` and metadata `onset_layer`, `onset_tokens`,
`onset_weight`: the same kind of direction read at an earlier layer, added with strength γ·weight to
the first `onset_tokens` generated tokens only (see `Onset`). Version 1 files (no onset) still load.

The direction is stored RAW, not unit norm: mean(concise) − mean(verbose) residual at the layer, so
strength γ = 1 moves the residual by the whole average concise−verbose gap whatever the model's residual
scale (γ is comparable across layers and models, as in the ASC paper); its norm is in `info`.
Layer L is the output of decoder layer L (transformers: `model.layers[L]`, i.e. `hidden_states[L+1]`),
exactly where steering at layer L acts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from actserve.interventions.safetensors_file import read_safetensors
from actserve.server.contract import ModelInfo

FORMAT = "actserve.asc"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")


class ArtifactError(ValueError):
    """A file that is not an ASC artifact, or one built for a model of another shape."""


@dataclass
class Onset:
    """A push at an earlier layer for the first generated tokens only, scaled with the main one.

    Why: on SmolLM2-135M, ASC at one layer for every token shortens answers only up to a point; pushed
    harder, more answers fall into repetition loops that run to the token cap. A strong push at an
    earlier layer during the first tokens sets a short answer's course (its median fell 125 -> 74 tokens)
    but alone leaves the loops; with the main push on every token as well, both fall
    (bench/results/cot_explore.json)."""

    direction: torch.Tensor  # float32 [hidden], concise - verbose at `layer`, raw like the main one
    layer: int
    tokens: int  # generated tokens [0, tokens) are pushed
    weight: float  # strength there = γ * weight


@dataclass
class AscArtifact:
    direction: torch.Tensor  # float32 [hidden], raw concise - verbose mean difference
    layer: int
    num_layers: int
    model: str  # name of the model it was built on (informational)
    gammas: list[float] = field(default_factory=list)  # calibration: ascending strengths ...
    kls: list[float] = field(default_factory=list)  # ... and their per-token KL (nats; upper bound, v2)
    info: dict[str, Any] = field(default_factory=dict)
    onset: Onset | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.direction.shape[0])

    @property
    def max_kl(self) -> float:
        return self.kls[-1] if self.kls else 0.0

    def gamma_for(self, kl_budget: float) -> float:
        """The strength whose calibrated per-token KL equals `kl_budget`: piecewise-linear interpolation of
        the monotone table through (0, 0). Linear in KL is conservative where KL(γ) is convex (≈ ½γ²vᵀFv
        near 0): the chord lies above the curve, so the γ returned never overshoots the budget there."""
        return interpolate_gamma(self.gammas, self.kls, kl_budget)

    def check_fits(self, info: ModelInfo) -> None:
        if self.hidden_size != info.hidden_size or self.num_layers != info.num_layers:
            raise ArtifactError(
                f"the CoT compression artifact was built for a model with hidden size {self.hidden_size} and "
                f"{self.num_layers} layers; the loaded model has {info.hidden_size} and {info.num_layers}"
            )
        for name, layer in (("layer", self.layer), ("onset layer", self.onset and self.onset.layer)):
            if layer is not None and not 0 <= layer < info.num_layers:
                raise ArtifactError(f"artifact {name} {layer} out of range [0, {info.num_layers - 1}]")


def monotone_table(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Sorted by γ > 0, keeping only points whose KL exceeds every smaller γ's (a strictly increasing
    table, so KL -> γ is a function); measurement noise or saturation at large γ drops points."""
    gammas: list[float] = []
    kls: list[float] = []
    for g, k in sorted(points):
        if g > 0 and math.isfinite(k) and k > (kls[-1] if kls else 0.0):
            gammas.append(float(g))
            kls.append(float(k))
    return gammas, kls


def interpolate_gamma(gammas: list[float], kls: list[float], kl_budget: float) -> float:
    """γ at `kl_budget` on the piecewise-linear curve through (0, 0) and the table's points."""
    if not 0.0 <= kl_budget <= (kls[-1] if kls else 0.0):
        raise ValueError(
            f"kl_budget {kl_budget} outside the calibrated range [0, {kls[-1] if kls else 0:.4g}]"
        )
    g0, k0 = 0.0, 0.0
    for g1, k1 in zip(gammas, kls, strict=True):
        if kl_budget <= k1:
            return g0 + (g1 - g0) * (kl_budget - k0) / (k1 - k0)
        g0, k0 = g1, k1
    return g0


def save_artifact(art: AscArtifact, path: str | Path) -> None:
    tensors = {
        "direction": art.direction.detach().float().cpu().contiguous(),
        "calibration.gamma": torch.tensor(art.gammas, dtype=torch.float64),
        "calibration.kl": torch.tensor(art.kls, dtype=torch.float64),
    }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "layer": str(art.layer),
        "hidden_size": str(art.hidden_size),
        "num_layers": str(art.num_layers),
        "model": art.model,
        "info": json.dumps(art.info, sort_keys=True),
    }
    if art.onset is not None:
        tensors["onset.direction"] = art.onset.direction.detach().float().cpu().clone()  # may be `direction`
        meta |= {
            "onset_layer": str(art.onset.layer),
            "onset_tokens": str(art.onset.tokens),
            "onset_weight": repr(float(art.onset.weight)),
        }
    save_file(tensors, str(path), metadata=meta)


def load_artifact(path: str | Path) -> AscArtifact:
    """Read and check an artifact file; raises ArtifactError on anything that is not one."""
    meta, tensors = read_safetensors(path, ArtifactError)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an ASC artifact (metadata format {meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path}: ASC artifact version {meta.get('version')!r}; this server reads {READABLE_VERSIONS}"
        )
    try:
        onset = None
        if "onset_layer" in meta:
            onset = Onset(
                direction=tensors["onset.direction"].float(),
                layer=int(meta["onset_layer"]),
                tokens=int(meta["onset_tokens"]),
                weight=float(meta["onset_weight"]),
            )
        direction = tensors["direction"].float()
        gammas = [float(x) for x in tensors["calibration.gamma"].tolist()]
        kls = [float(x) for x in tensors["calibration.kl"].tolist()]
        art = AscArtifact(
            direction=direction,
            layer=int(meta["layer"]),
            num_layers=int(meta["num_layers"]),
            model=meta.get("model", ""),
            gammas=gammas,
            kls=kls,
            info=json.loads(meta.get("info", "{}")),
            onset=onset,
        )
    except (KeyError, ValueError, RecursionError) as e:  # RecursionError: `info` JSON nested too deeply
        raise ArtifactError(f"{path}: incomplete ASC artifact ({type(e).__name__}: {str(e)[:200]})") from None
    if direction.dim() != 1 or not bool(torch.isfinite(direction).all()):
        raise ArtifactError(f"{path}: direction must be a finite vector")
    if onset is not None:
        d = onset.direction
        if d.shape != direction.shape or not bool(torch.isfinite(d).all()):
            raise ArtifactError(f"{path}: onset.direction must be a finite vector like direction")
        if onset.tokens < 1 or not math.isfinite(onset.weight):
            raise ArtifactError(f"{path}: onset_tokens must be >= 1 and onset_weight finite")
    if (gammas, kls) != monotone_table(list(zip(gammas, kls, strict=True))):
        raise ArtifactError(f"{path}: calibration table must be strictly increasing in γ > 0 and KL")
    return art
