"""`POST /v1/steering/vectors/train`: train a steering vector from examples and store it in the library.

Body: `{"name", "positive": [...], "negative": [...]}` (paired by index unless `"paired": false`) or
`{"name", "pairs": [{"positive", "negative"}, ...]}`, plus `layers` (list or null/"all"), `method`
(`mean_diff` | `pca_diff`), `position` (`last` | `mean`), `replace`. At most `MAX_EXAMPLES` examples per
side, each at most `MAX_EXAMPLE_CHARS` characters and the model's max length in tokens. Validation and
tokenization run in a worker thread; the forward passes run where the engine runs (it owns the model
and its device state; in process mode that is the engine process), one chunk of at most CHUNK_TOKENS
tokens / CHUNK_EXAMPLES examples per engine call, so other requests keep decoding between chunks
instead of pausing for the whole training. Each call is the runner's collect mode on the serving KV
cache (free blocks borrowed and given back); when running requests hold too many blocks it is a 503.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from starlette.concurrency import run_in_threadpool

from actserve.interventions.steering.hidden import collect_residuals
from actserve.interventions.steering.library import LibraryError, StoredVector, VectorLibrary, check_name
from actserve.interventions.steering.plugin import library_call
from actserve.interventions.steering.train import (
    CHUNK_EXAMPLES,
    CHUNK_TOKENS,
    MAX_EXAMPLE_CHARS,
    MAX_EXAMPLES,
    NOT_NATIVE,
    TrainedVector,
    TrainingError,
    chunks,
    fit_vector,
    native_spec,
    prepare_examples,
)
from actserve.server.api.errors import APIError
from actserve.server.engine.engine_client import EngineClient
from actserve.server.engine.model_runner import NotEnoughBlocks

if TYPE_CHECKING:  # the function that takes it runs in the engine (`run_in_engine`)
    from actserve.server.engine.llm_engine import LLMEngine

MAX_LAYER_INDICES = 1024  # more than any model's layers; each is then checked against the model
Example = Annotated[str, StringConstraints(max_length=MAX_EXAMPLE_CHARS)]
Examples = list[Example]


class TrainPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    positive: Example
    negative: Example


class TrainRequest(BaseModel):
    """Give `pairs`, or both `positive` and `negative`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    positive: Examples | None = Field(None, min_length=1, max_length=MAX_EXAMPLES)
    negative: Examples | None = Field(None, min_length=1, max_length=MAX_EXAMPLES)
    pairs: list[TrainPair] | None = Field(None, min_length=1, max_length=MAX_EXAMPLES)
    paired: bool = Field(True, description="positive[i] and negative[i] form a pair (needed by pca_diff)")
    layers: list[int] | Literal["all"] | None = Field(
        None, max_length=MAX_LAYER_INDICES, description="layer indices; null or 'all': all"
    )
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


def _residual_chunk(
    eng: LLMEngine, prompts: list[list[int]], layers: list[int], position: str
) -> torch.Tensor:
    """One engine call of training: residuals of a few examples (module-level: it may be pickled to the
    engine process). [len(prompts), len(layers), hidden] float32 on the CPU."""
    native_spec(eng.runner.model)
    return collect_residuals(eng.runner, prompts, layers, position, CHUNK_TOKENS)  # type: ignore[arg-type]


async def _residuals(
    engine: EngineClient, prompts: list[list[int]], layers: list[int], position: str
) -> tuple[torch.Tensor, int]:
    """All examples' residuals, one engine call per chunk; between calls the engine runs its steps."""
    parts = []
    ranges = chunks(prompts, CHUNK_TOKENS, CHUNK_EXAMPLES)
    for start, end in ranges:
        try:
            parts.append(await engine.run_in_engine(_residual_chunk, prompts[start:end], layers, position))
        except NotEnoughBlocks as e:
            message = f"the KV cache is too full to train now: {e}"
            raise APIError(503, message, None, "kv_cache_full") from None
    return torch.cat(parts), len(ranges)


async def _train(
    engine: EngineClient, body: TrainRequest, layers: list[int] | None
) -> tuple[TrainedVector, int]:
    """Validate and tokenize in a worker thread, forward in engine chunks, fit in a worker thread."""
    positive, negative = body.examples()
    info = engine.model_info
    if info.implementation != "native":
        raise TrainingError(NOT_NATIVE, "model")
    chosen, prompts = await run_in_threadpool(
        lambda: prepare_examples(
            engine.tokenizer, positive, negative, num_layers=info.num_layers, layers=layers,
            method=body.method, position=body.position, paired=body.paired, max_tokens=engine.max_model_len,
        )
    )  # fmt: skip
    h, calls = await _residuals(engine, prompts, chosen, body.position)
    vec = await run_in_threadpool(
        lambda: fit_vector(
            h, len(positive), chosen, method=body.method, position=body.position, paired=body.paired,
            num_tokens=sum(map(len, prompts)), num_layers=info.num_layers,
        )
    )  # fmt: skip
    return vec, calls


async def train_route(request: Request, body: TrainRequest) -> dict[str, Any]:
    """Train, store, and return the vector (summary, training statistics and directions)."""
    engine: EngineClient = request.app.state.actserve.ready()
    try:
        check_name(body.name)
    except LibraryError as e:
        raise APIError(e.status, str(e), e.param) from None
    if not body.replace and await engine.plugin_call("steering", library_call, _contains, body.name):
        # fail before the forward passes; add() checks again
        message = f"name: a vector named {body.name!r} already exists; delete it or pass replace=true"
        raise APIError(409, message, "name")
    layers = None if body.layers in (None, "all") else body.layers
    try:
        vec, calls = await _train(engine, body, layers)
        stored: StoredVector = await engine.plugin_call("steering", library_call, _store, body, vec)
    except TrainingError as e:
        raise _training_error(e, body) from None
    except LibraryError as e:
        raise APIError(e.status, str(e), e.param) from None
    return {
        **stored.summary(),
        "training": {**vec.summary(), "engine_calls": calls},
        "directions": {str(k): d.tolist() for k, d in sorted(stored.directions.items())},
    }
