"""OpenAI request bodies with vLLM's extra sampling fields; every bound is checked here, so the engine
only ever sees valid parameters and a bad field becomes a 400 that names it.

Bounds that depend on the loaded model (token ids against the vocabulary, lengths against the context)
are checked where the model is known: `generation.build_sequences` and the routes."""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from actserve.server.api.errors import APIError
from actserve.server.api.structured import StructuredFields
from actserve.server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

MAX_N = 16
MAX_LOGPROBS = 20
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_SEQUENCES = 256  # prompts x n of one request (each is an engine sequence)
MAX_STOP_TOKEN_IDS = 256

# Fields OpenAI or vLLM define that this server does not implement, with the values that ask for nothing
# (so clients that always send e.g. `response_format: {"type": "text"}` keep working). Any other value
# is a 400 naming the field: silently ignoring a JSON schema or a logit bias would return output the
# client did not ask for. Remove an entry when its feature lands.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,),
    "structural_tag": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "suffix": (None, ""),
    "logits_processors": (None, []),
    "prompt_logprobs": (None,),
}

_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: Any) -> None:
    """Raise if a string anywhere in `value` holds a lone UTF-16 surrogate (a JSON escape like \\ud800
    that pairs with nothing): such text cannot be encoded as UTF-8, so the tokenizer (and any response
    echoing it) would fail later with a 500."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ValueError("contains a lone UTF-16 surrogate (e.g. \\ud800); text must be valid Unicode")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, (str, list, tuple, dict)):
                _check_text(v)


class APIModel(BaseModel):
    """Base of request bodies: every string must be valid Unicode, wherever it sits (a 400 naming the
    field instead of an encoding error deep in the tokenizer)."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, v: Any) -> Any:
        _check_text(v)
        return v

    @model_validator(mode="after")
    def _valid_extra_text(self) -> APIModel:
        for key, value in (self.model_extra or {}).items():
            try:
                _check_text(key)
                _check_text(value)
            except ValueError as e:
                raise ValueError(f"{ascii(key)}: {e}") from None
        return self


def check_fields(req: BaseModel) -> None:
    """Refuse fields this server knows but does not implement; log (once per request) the unknown ones,
    which are ignored as vLLM ignores them."""
    extra = req.model_extra or {}
    for name, value in extra.items():
        allowed = UNSUPPORTED_FIELDS.get(name)
        if allowed is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise APIError(400, f"{name}: not supported by this server", name)
    unknown = sorted(ascii(k) for k in extra if k not in UNSUPPORTED_FIELDS)
    if unknown:
        log.warning("fields were present in the request but ignored: %s", ", ".join(unknown))


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(APIModel, StructuredFields):
    """Fields shared by /v1/completions and /v1/chat/completions. Other fields are kept aside
    (`model_extra`) for `check_fields`."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1 - MAX_N)  # choice j samples with seed + j
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    interventions: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        items = [v] if isinstance(v, str) else v
        if items is not None:
            if len(items) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in items):
                raise ValueError("stop sequences must be non-empty strings")
        return items

    # Cross-field checks are field validators (reading fields declared earlier from `info.data`), so
    # the 400 names the field; a model-level validator's error has no location.
    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream", False):
            raise ValueError("only allowed when stream is true")
        return v

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=list(self.stop or []),  # type: ignore[arg-type]
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=2**31 - 1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request; got {len(v)}")
        return v

    def num_prompts(self) -> int:
        p = self.prompt
        return 1 if isinstance(p, str) or isinstance(p[0], int) else len(p)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v not in (None, info.data.get("n", 1)):
            raise ValueError("only best_of equal to n is supported")
        return v


class ChatMessage(APIModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs", False):
            raise ValueError("requires logprobs to be true")
        return v


class TokenizeRequest(APIModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(APIModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int]
