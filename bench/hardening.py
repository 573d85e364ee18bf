"""Hardening figures on the CPU: a real `actserve serve` on TinyStories-656K, driven over loopback.

    python bench/hardening.py [--out bench/results/hardening_cpu.json] [--only NAME ...]

Scenarios (each on a fresh server in its own process group):
- `concurrency`: 3 rounds of 256 concurrent streams; every one must end with a finish_reason and
  `[DONE]`; the server's resident memory (with its engine process) after each round.
- `disconnects`: 130 streams whose clients hang up after the first chunk; how many the server counts as
  aborted, and how long until no request runs and the KV cache is empty again.
- `overload`: `--max-num-seqs 4 --max-waiting 8`, 200 requests at once (half streamed): the status codes,
  how many 429s carry Retry-After, and whether the next request after the burst succeeds.
- `sigterm`: SIGTERM to the server alone, then to its whole process group, during 32 streams of 200
  tokens: streams that completed, exit code, seconds to exit, engine processes left behind.
- `core_killed`: SIGKILL to the engine core during 16 streams: seconds until every client has its
  error, the server's exit code.
- `big_body`: a 50 MB prompt while /health is polled: the status, and the slowest /health answer.

The tests under tests/ assert the behaviour; this script records the figures. Prints a table last and
writes JSON with the command that made it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_load import wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "data" / "tinystories-656k"
OUT = ROOT / "bench" / "results" / "hardening_cpu.json"
DEVICE = "cpu"  # --device
FINISH = re.compile(rb'"finish_reason":\s*"(\w+)"')


class Server:
    """`actserve serve` in its own session (so the whole group can be signalled), on a free port."""

    def __init__(self, engine_process: str, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "actserve.server",
            "serve",
            "--model",
            str(MODEL),
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--engine-process",
            engine_process,
            "--log-level",
            "warning",
            *flags,
        ]
        self.proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.proc.pid)
        wait_healthy(self.url, self.proc, 120)

    def family(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        total = 0
        for p in self.family():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextmanager
def server(engine_process: str, *flags: str) -> Iterator[Server]:
    s = Server(engine_process, *flags)
    try:
        yield s
    finally:
        s.stop()


def body(max_tokens: int, stream: bool = True, prompt: str = "Once upon a time") -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def raw_request(url: str, payload: dict[str, Any], first_chunk_only: bool = False) -> dict[str, Any]:
    """One request over a bare connection, read to EOF (or to the first SSE chunk, then hung up):
    status, headers, whether a stream finished with [DONE], and when its first and last bytes came."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(payload).encode()
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError as e:
        return {"status": 0, "error": str(e), "seconds": time.perf_counter() - t0}
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data)
    )
    buf = bytearray()
    try:
        while chunk := await reader.read(1 << 16):
            buf += chunk
            if first_chunk_only and b"data: " in buf:
                break
    except OSError:
        pass
    writer.close()
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.decode().partition(":") for ln in lines[1:])}
    finishes = FINISH.findall(rest)
    return {
        "status": status,
        "headers": headers,
        "done": b"data: [DONE]" in rest,
        "finish": finishes[-1].decode() if finishes else None,
        "error_event": b'"error"' in rest and payload.get("stream", False),
        "seconds": time.perf_counter() - t0,
    }


def metric(url: str, name: str, label: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not label or label in line) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def concurrency(mode: str) -> dict[str, Any]:
    with server(mode, "--max-num-seqs", "64") as s:
        rounds = []
        for _ in range(3):
            t0 = time.perf_counter()
            results = asyncio.run(_gather([raw_request(s.url, body(32)) for _ in range(256)]))
            ok = sum(1 for r in results if r["status"] == 200 and r["done"] and r["finish"])
            rounds.append(
                {"complete": ok, "of": 256, "seconds": time.perf_counter() - t0, "rss_mb": s.rss_mb()}
            )
        return {"rounds": rounds, "rss_growth_mb": rounds[-1]["rss_mb"] - rounds[0]["rss_mb"]}


async def _gather(coros: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*coros))


def disconnects(mode: str) -> dict[str, Any]:
    with server(mode, "--max-num-seqs", "64") as s:
        before = metric(s.url, "actserve_request_success_total", 'finished_reason="abort"')
        asyncio.run(_gather([raw_request(s.url, body(400), first_chunk_only=True) for _ in range(130)]))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 60:
            running = metric(s.url, "actserve_num_requests_running")
            kv = metric(s.url, "actserve_kv_cache_usage_perc")
            if running == 0 and kv == 0:
                break
            time.sleep(0.05)
        aborted = metric(s.url, "actserve_request_success_total", 'finished_reason="abort"') - before
        return {
            "disconnected": 130,
            "aborted": aborted,
            "idle_after_s": time.perf_counter() - t0,
            "kv_usage_after": kv,
        }


def overload(mode: str) -> dict[str, Any]:
    with server(mode, "--max-num-seqs", "4", "--max-waiting", "8") as s:
        reqs = [raw_request(s.url, body(24, stream=i % 2 == 0)) for i in range(200)]
        results = asyncio.run(_gather(reqs))
        codes: dict[str, int] = {}
        for r in results:
            codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
        limited = [r for r in results if r["status"] in (429, 503)]
        after = asyncio.run(raw_request(s.url, body(8, stream=False)))
        return {
            "codes": codes,
            "limited_with_retry_after": sum("retry-after" in r["headers"] for r in limited),
            "limited": len(limited),
            "next_request_status": after["status"],
        }


def sigterm(mode: str, group: bool) -> dict[str, Any]:
    with server(mode, "--max-num-seqs", "64") as s:
        core = [p.pid for p in s.family()[1:]]

        async def drive() -> list[dict[str, Any]]:
            tasks = [asyncio.create_task(raw_request(s.url, body(200))) for _ in range(32)]
            await asyncio.sleep(1.0)  # streams under way
            (os.killpg if group else os.kill)(s.proc.pid, signal.SIGTERM)
            return list(await asyncio.gather(*tasks))

        t0 = time.perf_counter()
        results = asyncio.run(drive())
        try:
            code = s.proc.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        left = [pid for pid in core if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        return {
            "streams": 32,
            "completed": sum(1 for r in results if r["done"] and r["finish"]),
            "exit_code": code,
            "exit_s": time.perf_counter() - t0,
            "engine_processes_left": len(left),
        }


def core_killed() -> dict[str, Any]:
    with server("on", "--max-num-seqs", "64") as s:
        core = s.family()[1:]

        async def drive() -> list[dict[str, Any]]:
            tasks = [asyncio.create_task(raw_request(s.url, body(400))) for _ in range(16)]
            await asyncio.sleep(1.0)
            for p in core:
                p.kill()
            t_kill = time.perf_counter()
            results = list(await asyncio.gather(*tasks))
            for r in results:
                r["after_kill_s"] = time.perf_counter() - t_kill
            return results

        results = asyncio.run(drive())
        try:
            code = s.proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        return {
            "streams": 16,
            "error_events": sum(1 for r in results if r["error_event"] or not r["done"]),
            "all_answered_s": max(r["after_kill_s"] for r in results),
            "server_exit_code": code,
        }


def big_body(mode: str) -> dict[str, Any]:
    with server(mode) as s:

        async def drive() -> dict[str, Any]:
            slowest, stop = 0.0, False

            async def poll() -> None:
                nonlocal slowest
                async with httpx.AsyncClient() as c:
                    while not stop:
                        t0 = time.perf_counter()
                        await c.get(f"{s.url}/health", timeout=120)
                        slowest = max(slowest, time.perf_counter() - t0)
                        await asyncio.sleep(0.02)

            poller = asyncio.create_task(poll())
            rss0 = s.rss_mb()
            big = await raw_request(s.url, body(4, stream=False, prompt="x " * 25_000_000))
            stop = True
            await poller
            return {
                "status": big["status"],
                "seconds": big["seconds"],
                "slowest_health_s": slowest,
                "rss_growth_mb": s.rss_mb() - rss0,
            }

        return asyncio.run(drive())


SCENARIOS = {
    "concurrency": lambda: {m: concurrency(m) for m in ("off", "on")},
    "disconnects": lambda: {m: disconnects(m) for m in ("off", "on")},
    "overload": lambda: {m: overload(m) for m in ("off", "on")},
    "sigterm": lambda: {
        f"{m}/{'group' if g else 'server'}": sigterm(m, g) for m in ("off", "on") for g in (False, True)
    },
    "core_killed": lambda: {"on": core_killed()},
    "big_body": lambda: {m: big_body(m) for m in ("off", "on")},
}


def table(results: dict[str, Any]) -> str:
    rows = []
    for name, by_mode in results.items():
        for mode, r in by_mode.items():
            flat = {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
            if name == "concurrency":
                flat["complete"] = "/".join(str(x["complete"]) for x in r["rounds"])
                flat["rss_mb"] = "/".join(f"{x['rss_mb']:.0f}" for x in r["rounds"])
            if name == "overload":
                flat["codes"] = r["codes"]
            cells = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())
            rows.append(f"{name:<12} {mode:<10} {cells}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--only", nargs="*", choices=list(SCENARIOS), default=None)
    ap.add_argument("--device", default="cpu", help="the server's --device (cpu, cuda)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    results = {}
    for name in args.only or SCENARIOS:
        t0 = time.perf_counter()
        results[name] = SCENARIOS[name]()
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    doc = {
        "command": "python " + " ".join([f"bench/{Path(__file__).name}", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPU cores",
        "device": DEVICE,
        "model": "tinystories-656k",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
