"""HTTP load generator: N concurrent streaming completions against a running actserve (or any
OpenAI-compatible) server, from its own process so the client never competes with the server.

    python bench/http_load.py --url http://127.0.0.1:8000 --model NAME --clients 64 --prompt-len 128 \
        --max-tokens 128 --vocab 128256

Prints one JSON line: tokens, seconds, tok_s, ttft_p50_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    ttft, tokens = 0.0, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not ttft and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, ttft


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    bodies = [
        {"model": args.model, "prompt": [rng.randrange(10, args.vocab) for _ in range(args.prompt_len)],
         "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True}}
        for _ in range(args.clients)
    ]  # fmt: skip
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(client, args.url, {**bodies[0], "max_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, args.url, b) for b in bodies))
        dt = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    return {"clients": args.clients, "tokens": tokens, "seconds": dt, "tok_s": tokens / dt,
            "ttft_p50_s": statistics.median(r[1] for r in results)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=5)
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
