"""Request schema of `interventions.steering` (DESIGN.md §5)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_VECTORS_PER_REQUEST = 8


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
