"""Many concurrent streams on a live server: every one completes, and repeated rounds do not grow memory
(a leak per request, e.g. of streams, plans or KV bookkeeping, would show as steady growth)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx
import psutil

STREAMS = 256
ROUNDS = 3
# a leak of even 100 kB per request would add 51 MB over the two later rounds; noise is far below
GROWTH_BOUND_MB = 48


async def one_stream(client: httpx.AsyncClient, url: str, i: int) -> tuple[str | None, bool, int]:
    """(finish_reason, saw [DONE], completion tokens) of one streamed completion."""
    body = {"prompt": f"Once upon a time {i}", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    finish, done, tokens = None, False, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                for c in chunk.get("choices", []):
                    finish = c.get("finish_reason") or finish
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return finish, done, tokens


async def one_round(url: str) -> list[tuple[str | None, bool, int]]:
    limits = httpx.Limits(max_connections=STREAMS + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        return list(await asyncio.gather(*(one_stream(client, url, i) for i in range(STREAMS))))


def rss_mb() -> float:
    """This process (the API server runs in it) and its children (the engine core in process mode)."""
    me = psutil.Process(os.getpid())
    procs = [me, *me.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def test_rounds_of_256_concurrent_streams_all_complete_with_flat_memory(tinystories_server: Any) -> None:
    after: list[float] = []
    for _ in range(ROUNDS):
        results = asyncio.run(one_round(tinystories_server.url))
        assert [r for r in results if r != ("length", True, 12)] == []
        after.append(rss_mb())
    assert after[-1] - after[0] < GROWTH_BOUND_MB, after
