"""The pre-serialized SSE chunks are byte-for-byte what `json.dumps` of the whole body gives."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actserve.server.api.sse import ChunkWriter

ENVELOPE = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": 'm "x" é'}
TEXTS = ["", "hello", ' wörld ✓\n\t"quoted" \\ back', "\ufffd", "😀"]
FINISHES: list[tuple[str | None, str | int | None]] = [
    (None, None),
    ("stop", "END"),
    ("stop", 7),
    ("length", None),
]


def body(choice: dict[str, Any], include_usage: bool) -> str:
    b: dict[str, Any] = {**ENVELOPE, "choices": [choice]}
    if include_usage:
        b["usage"] = None
    return f"data: {json.dumps(b)}\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
def test_fast_chunks_equal_full_dumps(include_usage: bool) -> None:
    w = ChunkWriter(ENVELOPE, include_usage)
    for text in TEXTS:
        for finish, stop in FINISHES:
            plain = {"index": 3, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop}
            assert w.text(3, text, finish, stop) == body(plain, include_usage)
            delta = {"content": text} if text else {}
            chat = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": stop,
            }
            assert w.delta(0, text, finish, stop) == body(chat, include_usage)
            assert w.chunk([plain]) == body(plain, include_usage)


def test_usage_chunk() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    got = ChunkWriter(ENVELOPE, True).chunk([], usage)
    assert got == f"data: {json.dumps({**ENVELOPE, 'choices': [], 'usage': usage})}\n\n"
