"""HTTP load generator: N concurrent streaming completions against a running actserve (or any
OpenAI-compatible) server, from its own process so the client never competes with the server.

    python bench/http_load.py --url http://127.0.0.1:8000 --model NAME --clients 64 --prompt-len 128 \
        --max-tokens 128 --vocab 128256

With `--serve MODEL_DIR` it first starts `actserve serve` itself (own process; `--engine-process on|off`
picks where its engine runs, `--server-args` adds flags, `--profile FILE` runs the server under cProfile,
which sees the event-loop thread: the per-chunk SSE work), and stops it afterwards.

Prints one JSON line: tokens, seconds, tok_s, ttft_p50_s of the median of `--rounds` measured rounds
(each: all clients at once), after `--warmup-rounds` unmeasured ones; rounds_tok_s lists every round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psutil


async def one_httpx(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float]:
    """One streamed request: (completion tokens from the usage chunk, time to the first text chunk).
    Only those two chunks are parsed: at thousands of chunks per second, json.loads of every chunk
    made this client the bottleneck instead of the server."""
    t0 = time.perf_counter()
    ttft, tokens = 0.0, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if not ttft and '"choices": []' not in line and '"choices":[]' not in line:
                ttft = time.perf_counter() - t0
            if '"usage"' in line and '"usage": null' not in line and '"usage":null' not in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens, ttft


_USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')


async def one_raw(url: str, body: dict) -> tuple[int, float]:
    """The same request over a bare asyncio connection (`Connection: close`, read to EOF), looking only
    for the first text chunk's arrival and the usage chunk: a few us per chunk, where httpx's per-line
    parsing costs tens of us and at 64 streams could make the load generator the bottleneck."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(payload), payload)
    )
    ttft, buf = 0.0, bytearray()
    while data := await reader.read(1 << 16):
        buf += data
        if not ttft and b'"text"' in data:
            ttft = time.perf_counter() - t0
    writer.close()
    if not buf.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"HTTP error: {bytes(buf[:200])!r}")
    found = _USAGE.findall(buf)
    return (int(found[-1]) if found else 0), ttft


async def run(args: argparse.Namespace) -> dict:
    if args.model is None:
        args.model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    rng = random.Random(args.seed)
    bodies = [
        {"model": args.model, "prompt": [rng.randrange(10, args.vocab) for _ in range(args.prompt_len)],
         "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True}}
        for _ in range(args.clients)
    ]  # fmt: skip
    limits = httpx.Limits(max_connections=args.clients + 8)
    rounds: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_httpx(client, args.url, {**bodies[0], "max_tokens": 4})  # warm-up: connection, model
        for _ in range(args.warmup_rounds + args.rounds):  # warm-up rounds: the same load, not counted
            t0, c0 = time.perf_counter(), time.process_time()
            if args.client == "raw":
                results = await asyncio.gather(*(one_raw(args.url, b) for b in bodies))
            else:
                results = await asyncio.gather(*(one_httpx(client, args.url, b) for b in bodies))
            dt, client_cpu = time.perf_counter() - t0, time.process_time() - c0
            tokens = sum(r[0] for r in results)
            rounds.append({"tokens": tokens, "seconds": dt, "tok_s": tokens / dt, "client_cpu_s": client_cpu,
                           "ttft_p50_s": statistics.median(r[1] for r in results)})  # fmt: skip
    counted = rounds[args.warmup_rounds :]
    mid = sorted(counted, key=lambda r: r["tok_s"])[len(counted) // 2]  # the median round
    return {
        "clients": args.clients,
        "client": args.client,
        **mid,
        "rounds_tok_s": [r["tok_s"] for r in counted],
    }


def cpu_seconds(server: psutil.Process) -> tuple[float, float]:
    """(user+system seconds of the server process, of its children): warm-up request included."""
    t = server.cpu_times()
    kids = sum(sum(c.cpu_times()[:2]) for c in server.children(recursive=True))
    return t.user + t.system, kids


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until `url`/health answers 200; raises if the server exits first or takes longer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy in {timeout_s:.0f} s")


@contextmanager
def serve(args: argparse.Namespace) -> Iterator[tuple[str, psutil.Process]]:
    """`actserve serve` in a child process; yields its URL (once /health answers 200) and process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "actserve.server", "serve", "--model", args.serve, "--port", str(port),
           "--engine-process", args.engine_process, "--log-level", "warning",
           *shlex.split(args.server_args)]  # fmt: skip
    if args.profile:
        cmd[1:1] = ["-m", "cProfile", "-o", args.profile]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 600)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)  # graceful: uvicorn stops, the engine process with it
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the model the server lists first")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--client", default="raw", choices=["raw", "httpx"], help="raw: bare asyncio sockets")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument(
        "--rounds", type=int, default=3, help="measured rounds of all clients; the median is reported"
    )
    ap.add_argument("--warmup-rounds", type=int, default=1, help="unmeasured rounds first (prefill shapes)")
    ap.add_argument("--serve", default=None, metavar="MODEL_DIR", help="start actserve on this model first")
    ap.add_argument("--engine-process", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--server-args", default="", help="more `actserve serve` flags, e.g. '--max-num-seqs 64'")
    ap.add_argument("--profile", default=None, metavar="FILE", help="with --serve: cProfile the server")
    args = ap.parse_args()
    if args.serve is None:
        print(json.dumps(asyncio.run(run(args))))
        return
    with serve(args) as (url, server):
        args.url = url
        before = cpu_seconds(server)
        result = asyncio.run(run(args))
        api, engine = (b - a for a, b in zip(before, cpu_seconds(server), strict=True))
    # CPU seconds the API process (HTTP, SSE; in thread mode also the engine) and the engine process spent
    cpu = {
        "api_cpu_s": api,
        "engine_proc_cpu_s": engine,
        "api_cpu_us_per_token": 1e6 * api / result["tokens"],
    }
    print(json.dumps({**result, **cpu, "engine_process": args.engine_process}))


if __name__ == "__main__":
    main()
