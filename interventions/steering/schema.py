"""Request schema of `interventions.steering` (DESIGN.md §5)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_VECTORS_PER_REQUEST = 8


class SteeringVectorSpec(BaseModel):
    """One vector: inline per-layer directions (or, in a later release, a library name) and a scale."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="name of a stored vector (vector library: not yet available)")
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

    @model_validator(mode="after")
    def _one_source(self) -> SteeringVectorSpec:
        if (self.name is None) == (self.directions is None):
            raise ValueError("give exactly one of 'name' or 'directions'")
        return self


class SteeringSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vectors: list[SteeringVectorSpec] = Field(min_length=1, max_length=MAX_VECTORS_PER_REQUEST)
