"""`POST /v1/steering/vectors/train`: train a steering vector from examples and store it in the library.

Body: `{"name", "positive": [...], "negative": [...]}` (paired by index unless `"paired": false`) or
`{"name", "pairs": [{"positive", "negative"}, ...]}`, plus `layers` (list or null/"all"), `method`
(`mean_diff` | `pca_diff`), `position` (`last` | `mean`), `replace`. At most `MAX_EXAMPLES` examples per
side, each at most the model's max length. The forward passes run on the engine thread between steps
(the model and its device state belong to it; in process mode that is the engine process), so
generation pauses while a vector trains.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from actserve.interventions.steering.library import LibraryError, StoredVector, VectorLibrary, check_name
from actserve.interventions.steering.train import MAX_EXAMPLES, TrainedVector, TrainingError, train_vector
from actserve.server.api.errors import APIError
from actserve.server.engine.engine_client import EngineClient
from actserve.server.engine.llm_engine import LLMEngine

Examples = list[str]


class TrainPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    positive: str
    negative: str


class TrainRequest(BaseModel):
    """Give `pairs`, or both `positive` and `negative`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    positive: Examples | None = Field(None, min_length=1, max_length=MAX_EXAMPLES)
    negative: Examples | None = Field(None, min_length=1, max_length=MAX_EXAMPLES)
    pairs: list[TrainPair] | None = Field(None, min_length=1, max_length=MAX_EXAMPLES)
    paired: bool = Field(True, description="positive[i] and negative[i] form a pair (needed by pca_diff)")
    layers: list[int] | Literal["all"] | None = Field(None, description="layer indices; null or 'all': all")
    method: Literal["mean_diff", "pca_diff"] = "mean_diff"
    position: Literal["last", "mean"] = "last"
    replace: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> TrainRequest:
        lists = self.positive is not None or self.negative is not None
        if (self.pairs is not None) == lists:
            raise ValueError("give either 'pairs' or both 'positive' and 'negative'")
        if lists and (self.positive is None or self.negative is None):
            raise ValueError("give both 'positive' and 'negative'")
        if self.pairs is not None and not self.paired:
            raise ValueError(
                "paired: 'pairs' are paired; send 'positive' and 'negative' lists for paired=false"
            )
        return self

    def examples(self) -> tuple[Examples, Examples]:
        if self.pairs is not None:
            return [p.positive for p in self.pairs], [p.negative for p in self.pairs]
        assert self.positive is not None and self.negative is not None
        return self.positive, self.negative


def _training_error(e: TrainingError, body: TrainRequest) -> APIError:
    """Name the field as the client sent it: positive[3] is pairs[3].positive when pairs were sent."""
    param, message = e.param, str(e)
    m = re.fullmatch(r"(positive|negative)\[(\d+)\]", param or "")
    if m and body.pairs is not None:
        param = f"pairs[{m.group(2)}].{m.group(1)}"
        message = message.replace(m.group(0), param, 1)
    return APIError(400, message, param)


def _store(lib: VectorLibrary, body: TrainRequest, vec: TrainedVector) -> StoredVector:
    return lib.add(lib.build(body.name, vec.directions, metadata=vec.metadata()), replace=body.replace)


def _contains(lib: VectorLibrary, name: str) -> bool:
    return name in lib


def _train(eng: LLMEngine, body: TrainRequest, layers: list[int] | None) -> TrainedVector:
    """Runs where the engine runs, between steps (module-level: it may be pickled to the engine process)."""
    positive, negative = body.examples()
    return train_vector(
        eng.runner.model,
        eng.tokenizer,
        positive,
        negative,
        layers=layers,  # type: ignore[arg-type]
        method=body.method,
        position=body.position,
        paired=body.paired,
        max_tokens=eng.max_model_len,
        progress=False,
    )


async def train_route(request: Request, body: TrainRequest) -> dict[str, Any]:
    """Train, store, and return the vector (summary, training statistics and directions)."""
    engine: EngineClient = request.app.state.actserve.ready()
    try:
        check_name(body.name)
    except LibraryError as e:
        raise APIError(e.status, str(e), e.param) from None
    if not body.replace and await engine.library_call(_contains, body.name):
        # fail before the forward passes; add() checks again
        message = f"name: a vector named {body.name!r} already exists; delete it or pass replace=true"
        raise APIError(409, message, "name")
    layers = None if body.layers in (None, "all") else body.layers
    try:
        vec: TrainedVector = await engine.run_in_engine(_train, body, layers)
        stored: StoredVector = await engine.library_call(_store, body, vec)
    except TrainingError as e:
        raise _training_error(e, body) from None
    except LibraryError as e:
        raise APIError(e.status, str(e), e.param) from None
    return {
        **stored.summary(),
        "training": vec.summary(),
        "directions": {str(k): d.tolist() for k, d in sorted(stored.directions.items())},
    }
