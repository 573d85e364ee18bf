"""SSE chunks of one streamed completion, built around a pre-serialized envelope.

A stream sends one chunk per token per client; dumping the whole body each time (id, object, created,
model, usage) is most of the event loop's JSON work at 64 streams. The envelope is dumped once, and only
the choice is serialized per chunk. The bytes equal `json.dumps` of the full body (tests check that)."""

from __future__ import annotations

import json
from typing import Any

_dumps = json.dumps


def _opt(value: str | int | None) -> str:
    return "null" if value is None else _dumps(value)  # None on every chunk but the last


class ChunkWriter:
    def __init__(self, envelope: dict[str, Any], include_usage: bool) -> None:
        head = _dumps(envelope)
        self._head = f'data: {head[:-1]}, "choices": ['
        self._tail = '], "usage": null}\n\n' if include_usage else "]}\n\n"
        self._envelope, self._include_usage = envelope, include_usage

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        """Any chunk: the envelope plus these choices (and `usage` when the request asked for it)."""
        if usage is None:
            return self._head + ", ".join(map(_dumps, choices)) + self._tail
        body: dict[str, Any] = {**self._envelope, "choices": choices}
        if self._include_usage:
            body["usage"] = usage
        return f"data: {_dumps(body)}\n\n"

    def text(self, index: int, text: str, finish_reason: str | None, stop_reason: str | int | None) -> str:
        """A completions chunk without logprobs (the common one)."""
        return (
            f'{self._head}{{"index": {index}, "text": {_dumps(text)}, "logprobs": null, '
            f'"finish_reason": {_opt(finish_reason)}, "stop_reason": {_opt(stop_reason)}}}{self._tail}'
        )

    def delta(self, index: int, text: str, finish_reason: str | None, stop_reason: str | int | None) -> str:
        """A chat chunk without logprobs: content delta (none when the text is empty)."""
        delta = f'{{"content": {_dumps(text)}}}' if text else "{}"
        return (
            f'{self._head}{{"index": {index}, "delta": {delta}, "logprobs": null, '
            f'"finish_reason": {_opt(finish_reason)}, "stop_reason": {_opt(stop_reason)}}}{self._tail}'
        )
