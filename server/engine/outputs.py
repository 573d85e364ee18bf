"""What the engine hands to its front-ends and the API: per-step deltas, the admission check, and the
error a request that can never run gets. The API imports this module, never the engine core
(llm_engine.py); import-linter holds it to that (pyproject.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actserve.server.engine.sequence import TokenLogprob


@dataclass
class SeqOutput:
    """What changed for one sequence in one step (a streaming delta)."""

    seq_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the engine failed this sequence (finished, with no finish_reason)


class RequestRejected(ValueError):
    """A request that can never run on this engine (too long for the context or the KV cache)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_fits(max_model_len: int, prompt_len: int, max_tokens: int | None) -> int:
    """Resolve max_tokens (None: up to the context) and reject what can never fit. Run once, where a
    sequence is made (the API through `EngineClient.check_fits`; `offline.make_sequences`)."""
    limit = max_model_len
    if prompt_len == 0:
        raise RequestRejected("prompt is empty; send at least one token", "prompt")
    if prompt_len > limit or (max_tokens is not None and prompt_len + max_tokens > limit):
        asked = prompt_len + (max_tokens or 0)
        raise RequestRejected(
            f"This model's maximum context length is {limit} tokens; the request has {prompt_len} prompt "
            f"tokens and asks for {max_tokens or 0} more ({asked} in all); shorten prompt or max_tokens.",
            "max_tokens" if prompt_len <= limit else "prompt",
        )
    return limit - prompt_len if max_tokens is None else max_tokens
