"""Request fields that the structured_output and logit_bias plugins implement: OpenAI's
`response_format` and `logit_bias`, vLLM's `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`. They become entries of the request's `interventions` (so they compose with every other
intervention, per row), and the plugins' 400s are renamed to the field the client sent."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actserve.server.api.errors import APIError, as_api_error
from actserve.server.api.generation import Choice, build_sequences
from actserve.server.engine.engine_client import EngineClient
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.engine.sequence import Sequence

STRUCTURED = "structured_output"
BIAS = "logit_bias"


class JSONSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`; the schema is always enforced (`strict` either way)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and allowed only with it")
        return self


class StructuredFields(BaseModel):
    """The fields themselves (a base of `SamplingFields`)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    # token id (a string, as OpenAI's JSON has it) -> bias in [-100, 100]; at most 300 entries
    logit_bias: dict[str, float] | None = Field(None, max_length=300)

    @field_validator("guided_json")
    @classmethod
    def _json_text(cls, v: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError as e:
                raise ValueError(f"not valid JSON: {e}") from None
            if not isinstance(v, dict):
                raise ValueError("must be a JSON Schema object")
        return v


def constraint_of(req: StructuredFields) -> tuple[str, dict[str, Any]] | None:
    """(the field it came from, the structured_output spec) of the one constraint the request gives."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.json_schema is not None:
        found.append(("response_format.json_schema.schema", {"json_schema": rf.json_schema.schema_}))
    if req.guided_json is not None:
        found.append(("guided_json", {"json_schema": req.guided_json}))
    if req.guided_regex is not None:
        found.append(("guided_regex", {"regex": req.guided_regex}))
    if req.guided_choice is not None:
        found.append(("guided_choice", {"choice": req.guided_choice}))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", {"grammar": req.guided_grammar}))
    if len(found) > 1:
        first, second = found[0][0].split(".")[0], found[1][0].split(".")[0]
        raise APIError(400, f"{second}: cannot be combined with {first} (one output constraint)", second)
    return found[0] if found else None


def request_interventions(
    req: StructuredFields, interventions: dict[str, Any] | None, params: SamplingParams
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The request's interventions with its constraint and logit_bias added, and how to rename the
    plugins' error params (interventions.<plugin>.<key> -> the request's field)."""
    out = dict(interventions or {})
    renames: dict[str, str] = {}
    constraint = constraint_of(req)
    if constraint is not None:
        field, spec = constraint
        if STRUCTURED in out:
            raise APIError(400, f"{field}: cannot be combined with interventions.{STRUCTURED}", field)
        # a complete output allows only EOS: suppressing it would leave no token to sample
        if params.ignore_eos:
            msg = "ignore_eos: cannot be combined with an output constraint (a complete output ends at EOS)"
            raise APIError(400, msg, "ignore_eos")
        if params.min_tokens:
            msg = "min_tokens: cannot be combined with an output constraint (its output may end sooner)"
            raise APIError(400, msg, "min_tokens")
        out[STRUCTURED] = spec
        renames[f"interventions.{STRUCTURED}.{next(iter(spec))}"] = field
        renames[f"interventions.{STRUCTURED}"] = field.split(".")[0]
    if req.logit_bias:
        if BIAS in out:
            raise APIError(400, f"logit_bias: cannot be combined with interventions.{BIAS}", "logit_bias")
        out[BIAS] = {"bias": req.logit_bias}
        renames[f"interventions.{BIAS}.bias"] = "logit_bias"
    return (out or None), renames


def renamed(e: Exception, renames: dict[str, str]) -> Exception:
    """A plugin's 400 naming the field the client sent instead of the intervention it became."""
    err = as_api_error(e)
    if err is None or err.param is None:
        return e
    for old in sorted(renames, key=len, reverse=True):
        if err.param == old or err.param.startswith((old + ".", old + "[")):
            new = renames[old] + err.param[len(old) :]
            return APIError(err.status, err.message.replace(err.param, new), new, err.code)
    return e


async def constrained_sequences(
    engine: EngineClient, rid: str, prompts: list[list[int]], params: SamplingParams, req: Any
) -> list[tuple[Choice, Sequence]]:
    """`build_sequences` with the request's constraint and logit_bias among its interventions."""
    interventions, renames = request_interventions(req, req.interventions, params)
    try:
        return await build_sequences(engine, rid, prompts, params, interventions)
    except Exception as e:
        raise renamed(e, renames) from None
