"""GPU benchmark of the engine on a Llama-3-8B-shaped model (random bf16 weights), with its baselines
measured in the same run: the copy-bandwidth roofline and transformers' eager `generate`.

    python bench/gpu_bench.py --out bench/results/gpu_bench.json [--skip-hf] [--http [--http-engine both]]

Prints a table last; every figure is also in the JSON (keys name the batch size, e.g. engine_tok_s_b8).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_runs import generate, random_prompts, time_to_first_token  # noqa: E402
from shapes import LLAMA3_8B, make_model_dir  # noqa: E402

from actserve.server.engine.config import EngineConfig  # noqa: E402
from actserve.server.engine.llm_engine import LLMEngine  # noqa: E402

PROMPT, NEW = 128, 128


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy (the decode roofline's rate)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def steering_specs(n: int, hidden: int, layers: list[int], seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    specs = []
    for _ in range(n):
        dirs = {str(layer): (torch.randn(hidden, generator=g) * 0.01).tolist() for layer in layers}
        specs.append({"steering": {"vectors": [{"directions": dirs, "scale": 1.0}]}})
    return specs


def bench_engine(
    res: dict[str, Any], model_dir: Path, batches: list[int], decode_only: bool = False
) -> LLMEngine:
    cfg = EngineConfig(
        model=str(model_dir), dtype="bfloat16", load_format="dummy", max_num_seqs=128, max_model_len=8448,
        max_num_batched_tokens=16384, gpu_memory_utilization=0.55,
    )  # fmt: skip
    t0 = time.perf_counter()
    eng = LLMEngine(cfg)
    res["engine_start_s"] = time.perf_counter() - t0
    res["weights_gb"] = eng.loaded.weights_bytes / 1e9
    res["kv_blocks"] = eng.blocks.num_blocks
    vocab = eng.model_info.vocab_size
    generate(eng, random_prompts(4, PROMPT, vocab, 99), 16)  # warm-up: kernels, cuBLAS heuristics
    for b in batches:
        prompts = random_prompts(b, PROMPT, vocab, b)
        step_ms: list[float] = []
        dt, outs = generate(eng, prompts, NEW, step_ms=step_ms)
        assert all(len(o) == NEW for o in outs)
        res[f"engine_tok_s_b{b}"] = b * NEW / dt
        res[f"engine_s_b{b}"] = dt
        # where the time went: the first step (prefill), the median decode step, the slowest step
        res[f"engine_first_step_ms_b{b}"] = step_ms[0]
        res[f"engine_step_ms_median_b{b}"] = statistics.median(step_ms[1:])
        res[f"engine_step_ms_max_b{b}"] = max(step_ms[1:])
        print(f"engine b{b}: {b * NEW / dt:.1f} tok/s", flush=True)
    res["engine_graph_prefills"] = eng.runner.graph_prefills  # single prompts prefilled from a graph
    for b in (1, 8, 64):
        res[f"graph_step_ms_b{b}"] = graph_replay_ms(eng, b)
        res[f"graph_only_tok_s_b{b}"] = b * 1e3 / res[f"graph_step_ms_b{b}"]
    if decode_only:
        return eng
    for n in (512, 2048, 8192):
        prompt = random_prompts(1, n, vocab, n)[0]
        time_to_first_token(eng, prompt)
        res[f"ttft_ms_{n}"] = 1e3 * statistics.median(time_to_first_token(eng, prompt) for _ in range(3))
        print(f"ttft {n}: {res[f'ttft_ms_{n}']:.1f} ms", flush=True)
    # a prompt length never seen before: what the first request of a new length waits
    res["ttft_cold_ms_1000"] = 1e3 * time_to_first_token(eng, random_prompts(1, 1000, vocab, 1000)[0])
    # steering overhead: 32 concurrent requests, each with its own vector at 4 layers, vs the same unsteered
    prompts = random_prompts(32, PROMPT, vocab, 7)
    specs = steering_specs(32, eng.model_info.hidden_size, [8, 12, 16, 20], 3)
    graphs0, eager0 = eng.runner.graph_steps, eng.runner.eager_decode_steps
    plain = min(generate(eng, prompts, NEW)[0] for _ in range(3))
    steered = min(generate(eng, prompts, NEW, specs)[0] for _ in range(3))
    t0 = time.perf_counter()
    for spec in specs:  # what the API thread spends per request on validating and preparing the vectors
        eng.registry.release(eng.registry.prepare(spec))
    res["steer_prepare_ms_per_request"] = 1e3 * (time.perf_counter() - t0) / len(specs)
    res["steer_plain_tok_s_b32"] = 32 * NEW / plain
    res["steer_tok_s_b32"] = 32 * NEW / steered
    res["steer_overhead_pct"] = 100 * (steered / plain - 1)
    res["steer_eager_decode_steps"] = eng.runner.eager_decode_steps - eager0
    res["steer_graph_steps"] = eng.runner.graph_steps - graphs0
    print(f"steering overhead {res['steer_overhead_pct']:.2f}%", flush=True)
    return eng


def bench_hf(res: dict[str, Any], model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    vocab = config.vocab_size
    for b in (1, 8):
        ids = torch.tensor(random_prompts(b, PROMPT, vocab, b), device="cuda")
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        res[f"hf_generate_tok_s_b{b}"] = b * NEW / (time.perf_counter() - t0)
        print(f"hf b{b}: {res[f'hf_generate_tok_s_b{b}']:.1f} tok/s", flush=True)
    del model
    torch.cuda.empty_cache()


def bench_http(
    res: dict[str, Any], eng: LLMEngine, clients: int = 64, mode: str = "process", client: str = "raw"
) -> None:
    """64 concurrent streaming clients on loopback (bench/http_load.py, its own process) against the
    same model served through uvicorn; the in-process figure is measured again right after. Both sides
    report the median of 3 rounds after one unmeasured warm-up round.

    mode "process": the server's engine runs in its own process (`--engine-process on`), loading the same
    model with the same settings but a smaller share of the GPU (this process keeps its engine, idle);
    "thread": the server drives this process's engine from a thread. "both": process, then thread
    (its figures under http_thread_*)."""
    for m in ("process", "thread") if mode == "both" else (mode,):
        prefix = "http_thread" if mode == "both" and m == "thread" else "http"
        serve_http(res, eng, clients, m, prefix, "httpx" if client == "httpx" else "raw")
        if client == "both":  # the same server load from the httpx client (A/B of the load generator)
            serve_http(res, eng, clients, m, prefix + "_httpx", "httpx")
    prompts = random_prompts(clients, PROMPT, eng.model_info.vocab_size, 5)
    generate(eng, prompts, NEW)  # warm-up, as http_load warms the server up with one unmeasured round
    in_proc = statistics.median(generate(eng, prompts, NEW)[0] for _ in range(3))  # the same median of 3
    res[f"inproc_tok_s_b{clients}"] = clients * NEW / in_proc
    for prefix in ("http", "http_thread", "http_httpx", "http_thread_httpx"):
        if f"{prefix}_tok_s_c{clients}" in res:
            res[f"{prefix}_vs_inproc"] = res[f"{prefix}_tok_s_c{clients}"] / res[f"inproc_tok_s_b{clients}"]
    print(
        f"http ({mode}) {res[f'http_tok_s_c{clients}']:.0f} tok/s vs in-process "
        f"{res[f'inproc_tok_s_b{clients}']:.0f}"
    )


def serve_http(
    res: dict[str, Any], eng: LLMEngine, clients: int, mode: str, prefix: str, client: str = "raw"
) -> None:
    import dataclasses
    import subprocess

    import uvicorn

    from actserve.server.api.app import create_app
    from actserve.server.engine.async_engine import AsyncEngine
    from actserve.server.engine.engine_client import EngineClient

    engine: EngineClient
    if mode == "process":
        from actserve.server.engine.process_engine import ProcessEngine

        t0 = time.perf_counter()
        engine = ProcessEngine(
            dataclasses.replace(eng.config, gpu_memory_utilization=0.25, engine_process="on")
        )
        res["http_engine_process_start_s"] = time.perf_counter() - t0
    else:
        engine = AsyncEngine(eng)
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine), port=8765, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    cmd = [sys.executable, str(Path(__file__).parent / "http_load.py"), "--url", "http://127.0.0.1:8765",
           "--model", eng.model_name, "--clients", str(clients), "--prompt-len", str(PROMPT),
           "--max-tokens", str(NEW), "--vocab", str(eng.model_info.vocab_size),
           "--client", client]  # fmt: skip
    try:
        load = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        )
    finally:
        server.should_exit = True
        time.sleep(1.0)
        engine.shutdown()  # thread mode: its thread must stop stepping `eng` before `eng` is used here
    res[f"{prefix}_tok_s_c{clients}"] = load["tok_s"]
    res[f"{prefix}_ttft_p50_ms"] = 1e3 * load["ttft_p50_s"]
    res[f"{prefix}_tokens"] = load["tokens"]
    res[f"{prefix}_rounds_tok_s"] = load["rounds_tok_s"]
    res[f"{prefix}_client_cpu_s"] = load["client_cpu_s"]  # the load generator's own CPU time in that round
    res[f"{prefix}_client"] = client
    res[f"{prefix}_engine"] = mode


def graph_replay_ms(eng: LLMEngine, batch: int, reps: int = 50) -> float:
    """GPU time of one captured decode step (no host work): the floor the engine's step time sits on."""
    graphs = eng.runner.graphs
    assert graphs is not None
    graph, _ = graphs.graphs[((), graphs.bucket(batch))]  # type: ignore[index]  # the plain variant
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def section(res: dict[str, Any], name: str, fn: Any) -> Any:
    """Run one part; on failure record the traceback and keep the other parts' figures."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        res[f"{name}_error"] = traceback.format_exc()
        print(res[f"{name}_error"], flush=True)
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_bench.json")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--http", action="store_true")
    ap.add_argument(
        "--http-engine", default="process", choices=["process", "thread", "both"], help="engine of --http"
    )
    ap.add_argument(
        "--http-client", default="raw", choices=["raw", "httpx", "both"], help="load generator of --http"
    )
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--decode-only", action="store_true", help="skip TTFT and steering (A/B runs)")
    args = ap.parse_args()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "shape": "Llama-3-8B (random bf16 weights)", "prompt_tokens": PROMPT,
                           "new_tokens": NEW}  # fmt: skip
    res["command"] = shlex.join(["python", "bench/gpu_bench.py", *sys.argv[1:]])
    res["copy_bw_tb_s"] = copy_bandwidth() / 1e12
    model_dir = make_model_dir(Path(tempfile.mkdtemp()) / "llama3-8b-shape", LLAMA3_8B)
    eng = section(
        res,
        "engine",
        lambda: bench_engine(res, model_dir, [int(b) for b in args.batches.split(",")], args.decode_only),
    )
    if not args.skip_hf:
        section(res, "hf", lambda: bench_hf(res, model_dir))
    if args.http and eng is not None:
        section(res, "http", lambda: bench_http(res, eng, mode=args.http_engine, client=args.http_client))
    if "weights_gb" in res:
        res["roofline_tok_s_b1"] = res["copy_bw_tb_s"] * 1e12 / (res["weights_gb"] * 1e9)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\n{'metric':<28}{'value':>12}")
    for k, v in res.items():
        if isinstance(v, float):
            print(f"{k:<28}{v:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
