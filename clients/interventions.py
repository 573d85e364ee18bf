"""Typed builders for the request's `interventions` object (docs/api.md).

Each helper's `to_dict()` returns exactly the JSON the server expects, so the same objects work with
this package's clients and, through `extra_body(...)`, with the official `openai` SDK. Torch is never
imported here: tensors and numpy arrays are recognised by duck typing, so the client stays light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

PHASES = ("prompt", "generation")


@runtime_checkable
class Intervention(Protocol):
    """Anything that renders itself as `{"<intervention key>": spec}` (steering now, more later)."""

    def to_dict(self) -> dict[str, Any]: ...


def _floats(values: Any, where: str) -> list[float]:
    """A 1-D direction as JSON floats; tensors go through float32 on the CPU (bf16 has no tolist)."""
    if hasattr(values, "detach"):  # torch.Tensor
        values = values.detach().float().cpu()
    shape = getattr(values, "shape", None)
    if shape is not None and len(shape) != 1:
        raise ValueError(f"{where}: a direction must be 1-D, got shape {tuple(shape)}")
    out = [float(x) for x in (values.tolist() if hasattr(values, "tolist") else values)]
    if not all(math.isfinite(x) for x in out):
        raise ValueError(f"{where}: values must be finite")
    return out


def _rows(matrix: Any) -> dict[int, Any]:
    """A [num_layers, hidden] tensor/array: row L is layer L; all-zero rows (no effect) are left out."""
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().float().cpu()
    rows = {i: (r.tolist() if hasattr(r, "tolist") else list(r)) for i, r in enumerate(matrix)}
    return {i: r for i, r in rows.items() if any(float(x) != 0.0 for x in r)}


@dataclass
class SteeringVector:
    """h <- h + scale * directions[L] at the output of decoder layer L (0-based), on the chosen phases.

    `directions` maps layer -> direction (list of floats, 1-D tensor or array of length hidden_size), or
    is a whole [num_layers, hidden_size] tensor/array whose row L is layer L. `name` refers to a stored
    vector instead (the server's vector library; give exactly one of the two). `window=(start, end)`
    steers only positions whose index within their phase is in [start, end) (end None: open): prompt
    positions from the first prompt token, generated tokens from the first generated token.
    """

    directions: Mapping[int, Any] | Any | None = None
    scale: float = 1.0
    phases: Sequence[str] = PHASES
    normalize: bool = False
    name: str | None = None
    window: tuple[int, int | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON of one entry of `interventions.steering.vectors`."""
        if (self.name is None) == (self.directions is None):
            raise ValueError("SteeringVector: give exactly one of 'directions' or 'name'")
        if not math.isfinite(self.scale):
            raise ValueError(f"SteeringVector.scale must be finite, got {self.scale}")
        phases = list(self.phases)
        if not phases or any(p not in PHASES for p in phases):
            raise ValueError(f"SteeringVector.phases must be a non-empty subset of {PHASES}, got {phases}")
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        else:
            d = self.directions
            layers = d if isinstance(d, Mapping) else _rows(d)
            out["directions"] = {str(int(k)): _floats(v, f"directions[{k}]") for k, v in layers.items()}
        out.update(scale=float(self.scale), phases=phases, normalize=bool(self.normalize))
        if self.window is not None:
            start, end = self.window
            if start < 0 or (end is not None and end <= start):
                raise ValueError(f"SteeringVector.window needs 0 <= start < end, got {self.window}")
            out["window"] = [int(start), None if end is None else int(end)]
        return out


def vector_body(
    name: str,
    directions: Mapping[int, Any] | Any | None = None,
    combine: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    model_hint: str | None = None,
    metadata: Mapping[str, str] | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """JSON body of `POST /v1/steering/vectors`: directions as for SteeringVector, or `combine`, a
    {name: scale} mapping (or pairs) whose scaled sum becomes the new vector."""
    if (directions is None) == (combine is None):
        raise ValueError("give exactly one of 'directions' and 'combine'")
    body: dict[str, Any] = {"name": name, "replace": bool(replace)}
    if directions is not None:
        layers = directions if isinstance(directions, Mapping) else _rows(directions)
        body["directions"] = {str(int(k)): _floats(v, f"directions[{k}]") for k, v in layers.items()}
    else:
        assert combine is not None
        pairs = combine.items() if isinstance(combine, Mapping) else combine
        body["combine"] = [{"name": n, "scale": float(s)} for n, s in pairs]
    if model_hint is not None:
        body["model_hint"] = model_hint
    if metadata:
        body["metadata"] = dict(metadata)
    return body


@dataclass
class Steering:
    """The `steering` intervention: several vectors, added in order (their effects sum)."""

    vectors: list[SteeringVector] = field(default_factory=list)

    def __init__(
        self, *args: SteeringVector | Iterable[SteeringVector], vectors: Iterable[SteeringVector] = ()
    ) -> None:
        """`Steering(v1, v2)`, `Steering([v1, v2])` and `Steering(vectors=[v1, v2])` are the same."""
        self.vectors = []
        for v in (*args, vectors):
            self.vectors.extend([v] if isinstance(v, SteeringVector) else v)

    def to_dict(self) -> dict[str, Any]:
        """`{"steering": {"vectors": [...]}}`: the value of the request's `interventions` field."""
        if not self.vectors:
            raise ValueError("Steering needs at least one SteeringVector")
        return {"steering": {"vectors": [v.to_dict() for v in self.vectors]}}


SteeringLike = Steering | SteeringVector | Sequence[SteeringVector] | Mapping[str, Any]
InterventionsLike = Mapping[str, Any] | Intervention | Iterable[Intervention]


def build_interventions(
    steering: SteeringLike | None = None, interventions: InterventionsLike | None = None
) -> dict[str, Any] | None:
    """Merge typed helpers and raw specs into one `interventions` object (None when there is none)."""
    parts: list[dict[str, Any]] = []
    if steering is not None:
        if isinstance(steering, Mapping):  # a raw spec: {"vectors": [...]}
            parts.append({"steering": dict(steering)})
        else:
            parts.append((steering if isinstance(steering, Steering) else Steering(steering)).to_dict())
    if interventions is not None:
        if isinstance(interventions, Mapping):
            parts.append(dict(interventions))
        elif isinstance(interventions, Intervention):
            parts.append(interventions.to_dict())
        else:
            parts.extend(i.to_dict() for i in interventions)
    merged: dict[str, Any] = {}
    for part in parts:
        for key, spec in part.items():
            if key in merged:
                raise ValueError(f"intervention {key!r} given twice")
            merged[key] = spec
    return merged or None


def extra_body(
    steering: SteeringLike | None = None, interventions: InterventionsLike | None = None, **fields: Any
) -> dict[str, Any]:
    """`extra_body` for the openai SDK: `{"interventions": {...}}` plus any extra fields (e.g. top_k).

    `client.completions.create(..., extra_body=extra_body(steering=Steering(vec)))`
    """
    body = dict(fields)
    merged = build_interventions(steering, interventions)
    if merged is not None:
        body["interventions"] = merged
    return body
