"""Typed builders for the request's `interventions` object (docs/api.md).

Each helper's `to_dict()` returns exactly the JSON the server expects, so the same objects work with
this package's clients and, through `extra_body(...)`, with the official `openai` SDK. Torch is never
imported here: tensors and numpy arrays are recognised by duck typing, so the client stays light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

PHASES = ("prompt", "generation")


@runtime_checkable
class Intervention(Protocol):
    """Anything that renders itself as `{"<intervention key>": spec}` (Steering, CoTCompression, ...)."""

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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _number(value: Any, where: str, low: float, high: float) -> float:
    _check(isinstance(value, int | float) and not isinstance(value, bool), f"{where} must be a number")
    _check(
        math.isfinite(value) and low <= value <= high, f"{where} must be in [{low:g}, {high:g}], got {value}"
    )
    return float(value)


def _integer(value: Any, where: str, low: int) -> int:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= low,
        f"{where} must be an integer >= {low}",
    )
    return int(value)


@dataclass
class CoTCompression:
    """`cot_compression`: shorten (> 0) or lengthen (< 0) chain-of-thought by adding the server's ASC
    direction. Give exactly one: `strength` (gamma in [-8, 8]) or `kl_budget` (mean per-token KL in nats,
    in [0, 10], mapped to gamma by the model's calibration). Needs a server started with
    `--cot-compression`."""

    strength: float | None = None
    kl_budget: float | None = None

    def to_dict(self) -> dict[str, Any]:
        _check(
            (self.strength is None) != (self.kl_budget is None),
            "CoTCompression: give exactly one of strength and kl_budget",
        )
        if self.strength is not None:
            return {"cot_compression": {"strength": _number(self.strength, "CoTCompression.strength", -8, 8)}}
        return {"cot_compression": {"kl_budget": _number(self.kl_budget, "CoTCompression.kl_budget", 0, 10)}}


PrecisionWeights = Literal["bf16", "none", "fp4", "nvfp4", "mxfp4"]


@dataclass
class Precision:
    """`precision`: the weights this request's matmuls use: `bf16`/`none` (the checkpoint's), `nvfp4` or
    `mxfp4` (an FP4 copy the server loaded with `--precisions`), `fp4` (the loaded copy, nvfp4 first)."""

    weights: PrecisionWeights

    def to_dict(self) -> dict[str, Any]:
        allowed = ("bf16", "none", "fp4", "nvfp4", "mxfp4")
        _check(self.weights in allowed, f"Precision.weights must be one of {allowed}, got {self.weights!r}")
        return {"precision": {"weights": self.weights}}


SparsityMethod = Literal["teal", "chess", "r_sparse", "coreinfer"]


@dataclass
class Sparsity:
    """`sparsity`: zero a `level` share (0 to 0.9, in steps of 0.01) of the method's inputs while
    generating (the prompt runs dense). teal / chess / r_sparse need the server's calibration
    (`--sparsity-calibration`); coreinfer picks FFN neurons from the prompt."""

    method: SparsityMethod
    level: float

    def to_dict(self) -> dict[str, Any]:
        methods = ("teal", "chess", "r_sparse", "coreinfer")
        _check(self.method in methods, f"Sparsity.method must be one of {methods}, got {self.method!r}")
        level = _number(self.level, "Sparsity.level", 0.0, 0.9)
        _check(
            abs(level * 100 - round(level * 100)) < 1e-9,
            f"Sparsity.level must be a multiple of 0.01, got {level}",
        )
        return {"sparsity": {"method": self.method, "level": round(level, 2)}}


@dataclass
class ExpertsPerToken:
    """`moe`: experts per token at every MoE layer (1 to the model's number of experts); MoE models only."""

    top_k: int

    def to_dict(self) -> dict[str, Any]:
        return {"moe": {"top_k": _integer(self.top_k, "ExpertsPerToken.top_k", 1)}}


KVRetrievalMethod = Literal["actqkv", "infllm", "quest"]


@dataclass
class KVRetrieval:
    """`kv_retrieval`: each decode step attends to `budget_tokens` of the context per layer (sink, the
    blocks the method retrieves, the recent window); fields left None take the server's defaults
    (actqkv, 2048, 64, 256)."""

    method: KVRetrievalMethod | None = None
    budget_tokens: int | None = None
    sink_tokens: int | None = None
    window_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if self.method is not None:
            methods = ("actqkv", "infllm", "quest")
            _check(
                self.method in methods, f"KVRetrieval.method must be one of {methods}, got {self.method!r}"
            )
            spec["method"] = self.method
        for name, low in (("budget_tokens", 1), ("sink_tokens", 0), ("window_tokens", 1)):
            value = getattr(self, name)
            if value is not None:
                spec[name] = _integer(value, f"KVRetrieval.{name}", low)
        return {"kv_retrieval": spec}


@dataclass
class StructuredOutput:
    """`structured_output`: constrain the output. Give exactly one: `json_schema` (a JSON Schema object),
    `json_object=True` (any JSON object), `regex`, `choice` (one of these strings) or `grammar` (EBNF).
    The OpenAI fields `response_format` and vLLM's `guided_*` map to the same thing."""

    json_schema: Mapping[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None

    def to_dict(self) -> dict[str, Any]:
        fields = {
            "json_schema": self.json_schema,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
        }
        given = {k: v for k, v in fields.items() if v is not None}
        if self.json_object:
            given["json_object"] = True
        _check(
            len(given) == 1, f"StructuredOutput: give exactly one constraint, got {sorted(given) or 'none'}"
        )
        ((key, value),) = given.items()
        if key == "json_schema":
            value = dict(value)
        elif key == "choice":
            value = [str(c) for c in value]
            _check(1 <= len(value) <= 256, "StructuredOutput.choice must hold 1 to 256 strings")
        elif key in ("regex", "grammar"):
            _check(
                isinstance(value, str) and value != "", f"StructuredOutput.{key} must be a non-empty string"
            )
        return {"structured_output": {key: value}}


@dataclass
class LogitBias:
    """`logit_bias`: add a bias in [-100, 100] to chosen token ids' logits (at most 300); the OpenAI
    field `logit_bias` does the same."""

    bias: Mapping[int, float]

    def to_dict(self) -> dict[str, Any]:
        _check(0 < len(self.bias) <= 300, "LogitBias.bias must hold 1 to 300 token ids")
        out = {}
        for token, value in self.bias.items():
            out[str(_integer(token, "LogitBias token id", 0))] = _number(
                value, f"LogitBias.bias[{token}]", -100, 100
            )
        return {"logit_bias": {"bias": out}}


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
