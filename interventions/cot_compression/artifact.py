"""The ASC artifact: one safetensors file holding the direction, its layer and the KL calibration table.

Tensors: `direction` [hidden] float32, `calibration.gamma` [n] and `calibration.kl` [n] float64 (γ
ascending, measured mean per-token KL ascending). Metadata (strings): `format` = "actserve.asc",
`version`, `layer`, `hidden_size`, `num_layers`, `model`, and `info` (JSON: how it was built).

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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from actserve.server.models.loader import ModelInfo

FORMAT = "actserve.asc"
VERSION = "1"


class ArtifactError(ValueError):
    """A file that is not an ASC artifact, or one built for a model of another shape."""


@dataclass
class AscArtifact:
    direction: torch.Tensor  # float32 [hidden], raw concise - verbose mean difference
    layer: int
    num_layers: int
    model: str  # name of the model it was built on (informational)
    gammas: list[float] = field(default_factory=list)  # calibration: ascending strengths ...
    kls: list[float] = field(default_factory=list)  # ... and their measured mean per-token KL (nats)
    info: dict[str, Any] = field(default_factory=dict)

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
        if not 0 <= self.layer < info.num_layers:
            raise ArtifactError(f"artifact layer {self.layer} out of range [0, {info.num_layers - 1}]")


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
    save_file(tensors, str(path), metadata=meta)


def load_artifact(path: str | Path) -> AscArtifact:
    """Read and check an artifact file; raises ArtifactError on anything that is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "not readable"
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an ASC artifact (metadata format {meta.get('format')!r})")
    try:
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
        )
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: incomplete ASC artifact ({e})") from None
    if direction.dim() != 1 or not bool(torch.isfinite(direction).all()):
        raise ArtifactError(f"{path}: direction must be a finite vector")
    if (gammas, kls) != monotone_table(list(zip(gammas, kls, strict=True))):
        raise ArtifactError(f"{path}: calibration table must be strictly increasing in γ > 0 and KL")
    return art
