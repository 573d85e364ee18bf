"""Request schema of `interventions.steering` (docs/api.md, "Interventions: steering")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actserve.interventions.base import InterventionError

MAX_VECTORS_PER_REQUEST = 8
MAX_NAME_CHARS = 128  # as the library's names (library.NAME_RE)
MAX_LAYER_KEY_CHARS = 10  # a layer index as a string


def layer_index(key: object) -> int | None:
    """A layer key ("12") as an int; None unless it is 1-10 ASCII digits (int() alone would also take
    " 1", "1_0" or "٣")."""
    if isinstance(key, str) and 0 < len(key) <= MAX_LAYER_KEY_CHARS and key.isascii() and key.isdigit():
        return int(key)
    return None


def _key(key: object) -> str:
    text = str(key)
    return text if len(text) <= 24 else f"{text[:24]}..."


def check_directions_size(directions: dict[Any, Any], where: str, num_layers: int, hidden: int) -> None:
    """Counts and lengths of raw `{"L": [floats]}` before any per-element work: at most `num_layers` keys,
    each short, each list `hidden` long. O(num_layers): a spec with a million keys fails on len()."""
    if len(directions) > num_layers:
        raise InterventionError(
            f"{where}: {len(directions)} layer keys; this model has {num_layers} layers, so at most "
            f"{num_layers} keys in [0, {num_layers - 1}]",
            where,
        )
    for key, values in directions.items():
        p = f"{where}.{_key(key)}"
        if len(str(key)) > MAX_LAYER_KEY_CHARS:
            raise InterventionError(f"{p}: layer keys are integers in [0, {num_layers - 1}]", p)
        if isinstance(values, list) and len(values) != hidden:
            raise InterventionError(f"{p}: length {len(values)}, expected hidden_size = {hidden}", p)


def check_spec_size(value: object, param: str, num_layers: int, hidden: int) -> None:
    """Refuse an oversized raw steering spec before the schema validates each of its elements: the
    number of vectors (named or inline), name lengths, layer keys and direction lengths. Cost is
    bounded by the allowed size (8 vectors x num_layers keys), not by the size of the input."""
    vectors = value.get("vectors") if isinstance(value, dict) else None
    if not isinstance(vectors, list):
        return  # the schema reports it
    if len(vectors) > MAX_VECTORS_PER_REQUEST:
        raise InterventionError(
            f"{param}.vectors: {len(vectors)} vectors (named and inline together); at most "
            f"{MAX_VECTORS_PER_REQUEST} per request",
            f"{param}.vectors",
        )
    for i, vec in enumerate(vectors):
        if not isinstance(vec, dict):
            continue
        where = f"{param}.vectors[{i}]"
        name = vec.get("name")
        if isinstance(name, str) and len(name) > MAX_NAME_CHARS:
            raise InterventionError(
                f"{where}.name: {len(name)} characters; a vector name has at most {MAX_NAME_CHARS}",
                f"{where}.name",
            )
        directions = vec.get("directions")
        if isinstance(directions, dict):
            check_directions_size(directions, f"{where}.directions", num_layers, hidden)


class SteeringVectorSpec(BaseModel):
    """One vector: inline per-layer directions or a stored vector's name, a scale, phases and a window."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, description="name of a stored vector (GET /v1/steering/vectors lists them); or give directions"
    )
    directions: dict[str, list[float]] | None = Field(
        None, description="layer index (0-based, as a string) -> direction of length hidden_size"
    )
    scale: float = Field(1.0, allow_inf_nan=False, description="multiplier of the direction; finite")
    phases: list[Literal["prompt", "generation"]] = Field(
        default_factory=lambda: ["prompt", "generation"],
        min_length=1,
        description="prompt: positions of the prompt; generation: positions of generated tokens",
    )
    normalize: bool = Field(False, description="rescale the residual back to its pre-steering norm")
    window: tuple[int, int | None] | None = Field(
        None,
        description=(
            "[start, end): steer only positions whose index within their phase is in the window (end null: "
            "no end). Prompt phase: the prompt token's position (0 = first prompt token). Generation phase: "
            "the generated token's index (0 = first generated token, which is processed, and so steered, "
            "one step after it is sampled). Default: every position of the chosen phases."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> SteeringVectorSpec:
        if (self.name is None) == (self.directions is None):
            raise ValueError("give exactly one of 'name' or 'directions'")
        return self

    @field_validator("window")
    @classmethod
    def _window(cls, w: tuple[int, int | None] | None) -> tuple[int, int | None] | None:
        if w is not None and (w[0] < 0 or (w[1] is not None and w[1] <= w[0])):
            raise ValueError(f"window [start, end) needs 0 <= start < end, got {list(w)}")
        return w


class SteeringSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vectors: list[SteeringVectorSpec] = Field(min_length=1, max_length=MAX_VECTORS_PER_REQUEST)
