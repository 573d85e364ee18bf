"""The `kv_retrieval` request key and the plan a valid one becomes (docs/api.md, "KV retrieval").

Sizes are in tokens and become KV blocks: the budget rounds down to whole blocks (a request never reads
more than it asked), the sink and the window round up (never fewer tokens than asked). The window's
blocks are the last ones, the block being filled among them, so `window_tokens` is a lower bound of the
recent tokens every step reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from actserve.interventions.base import InterventionError
from actserve.interventions.kv_retrieval.methods import METHODS

DEFAULT_BUDGET, DEFAULT_SINK, DEFAULT_WINDOW = 2048, 64, 256
# one step stale by default: the choice for the next step is made off the step's critical path (a side
# stream on CUDA); bench/results/kv_retrieval_quality_lag1.json measured its needle accuracy
DEFAULT_LAG = 1
LAGS = (0, 1)


class KVRetrievalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["actqkv", "infllm", "quest"] = Field(
        "actqkv",
        description="how blocks are scored: actqkv (activation-bias probe query, layer budget by entropy), "
        "infllm (representative keys), quest (per-block min/max of the keys)",
    )
    budget_tokens: StrictInt = Field(
        DEFAULT_BUDGET,
        description="tokens each layer attends to at a decode step: sink + retrieved blocks + window "
        "(rounded down to whole KV blocks; actqkv spreads the retrieved blocks unevenly over layers)",
    )
    sink_tokens: StrictInt = Field(
        DEFAULT_SINK, description="initial tokens always attended (rounded up to blocks)"
    )
    window_tokens: StrictInt = Field(
        DEFAULT_WINDOW,
        description="recent tokens always attended (rounded up to blocks, the current one included)",
    )
    lag: StrictInt = Field(
        DEFAULT_LAG,
        description="0: each decode step reads the blocks chosen from its own query; 1: those chosen from "
        "the previous step's query (chosen off the critical path; the sink and window stay current, the "
        "first step after the prompt chooses afresh)",
    )


@dataclass
class RetrievalPlan:
    """One sequence's retrieval: its method id, budget in blocks and its slot of per-sequence state."""

    method: int
    retrieve: int  # retrieved blocks per layer (actqkv: the mean over layers)
    sink: int  # blocks
    window: int  # blocks
    lag: int = 0  # 1: a decode step reads the choice made at the previous step
    slot: int = -1
    active: bool = False
    released: bool = False
    # with a host tier: the engine has asked which blocks stay on the GPU (blocks may have moved), and a
    # host id was seen in the table since the last (re)start (they stay there until the next one)
    may_host: bool = False
    on_host: bool = False
    # lag 1: the position whose decode step reads the choice the last decode step made (-1: none)
    lag_next: int = -1


def plan_of(spec: KVRetrievalSpec, where: str, block_size: int, max_budget: int) -> RetrievalPlan:
    """Check the sizes (a 400 naming the field and its range) and turn them into blocks."""
    if not block_size <= spec.budget_tokens <= max_budget:
        raise InterventionError(
            f"{where}.budget_tokens must be in [{block_size}, {max_budget}] (the server's "
            f"max_budget_tokens); got {spec.budget_tokens}",
            f"{where}.budget_tokens",
        )
    if not 0 <= spec.sink_tokens <= max_budget:
        raise InterventionError(
            f"{where}.sink_tokens must be in [0, {max_budget}]; got {spec.sink_tokens}",
            f"{where}.sink_tokens",
        )
    if not 1 <= spec.window_tokens <= max_budget:
        raise InterventionError(
            f"{where}.window_tokens must be in [1, {max_budget}]; got {spec.window_tokens}",
            f"{where}.window_tokens",
        )
    if spec.lag not in LAGS:
        raise InterventionError(
            f"{where}.lag must be 0 (choose from this step's query) or 1 (from the previous step's, one "
            f"step stale); got {spec.lag}",
            f"{where}.lag",
        )
    budget = spec.budget_tokens // block_size
    sink = -(-spec.sink_tokens // block_size)
    window = -(-spec.window_tokens // block_size)
    if budget < sink + window + 1:
        least = (sink + window + 1) * block_size
        raise InterventionError(
            f"{where}.budget_tokens must be at least {least}: it is counted in whole KV blocks of "
            f"{block_size} tokens (rounded down: {budget} blocks) and must hold the sink ({sink} blocks, "
            f"sink_tokens rounded up), the window ({window} blocks, window_tokens rounded up) and one "
            f"retrieved block; got {spec.budget_tokens}",
            f"{where}.budget_tokens",
        )
    return RetrievalPlan(METHODS[spec.method], budget - sink - window, sink, window, spec.lag)
