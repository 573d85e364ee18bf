"""Request schema of `interventions.cot_compression`: exactly one of `strength` or `kl_budget`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STRENGTH = 8.0  # |γ| in units of the whole mean concise−verbose gap; beyond this text degenerates
MAX_KL_BUDGET = 10.0  # nats per token; the model's calibration table usually allows less (checked later)


class CoTCompressionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strength: float | None = Field(
        None,
        ge=-MAX_STRENGTH,
        le=MAX_STRENGTH,
        allow_inf_nan=False,
        description=(
            "γ in [-8, 8]: multiple of the stored concise−verbose direction added to the residual at the "
            "ASC layer for every generated token; 0 = off, > 0 shortens reasoning, < 0 lengthens it"
        ),
    )
    kl_budget: float | None = Field(
        None,
        ge=0.0,
        le=MAX_KL_BUDGET,
        allow_inf_nan=False,
        description=(
            "mean per-token KL(steered ‖ unsteered) in nats, >= 0; mapped to γ by the model's calibration "
            "table (the γ whose 95% upper confidence bound of the KL, over the calibration prompts, equals "
            "the budget); at most the largest KL calibrated for the model (GET /v1/interventions)"
        ),
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> CoTCompressionSpec:
        if (self.strength is None) == (self.kl_budget is None):
            raise ValueError("give exactly one of 'strength' or 'kl_budget'")
        return self
