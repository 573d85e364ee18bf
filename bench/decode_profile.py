"""Where a decode step's time goes on the GPU, and how each weight matmul compares with the copy roofline.

    python bench/decode_profile.py --out bench/results/decode_profile.json [--gemv-sweep]

Part 1: one captured decode step of the Llama-3-8B-shaped engine (random bf16 weights) at batch 1 and 8,
profiled with torch.profiler: device time per kernel name, kernel count, and the step's total. Part 2:
each projection shape of that model at M = 1 and 8, timed from CUDA graphs (no launch gaps): cuBLAS
(`F.linear`) against the Triton `gemv` kernel over a small config sweep, as achieved read bandwidth.
Prints a table last; details go to the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_runs import generate, random_prompts  # noqa: E402
from gpu_bench import copy_bandwidth  # noqa: E402
from shapes import LLAMA3_8B, make_model_dir  # noqa: E402

from actserve.kernels.gemv import GemvConfig, gemv, pick_config  # noqa: E402
from actserve.kernels.gemv_ref import gemv_ref  # noqa: E402
from actserve.kernels.silu_mul import silu_mul  # noqa: E402
from actserve.server.engine.config import EngineConfig  # noqa: E402
from actserve.server.engine.llm_engine import LLMEngine  # noqa: E402
from actserve.server.engine.offline import make_sequences  # noqa: E402
from actserve.server.engine.sampling_params import SamplingParams  # noqa: E402


def graph_time_us(
    fn: Callable[[], Any], reps: int = 20, rounds: int = 5, capture_error_mode: str = "global"
) -> float:
    """Device time of one call, from a CUDA graph of `reps` calls (launch overhead excluded), the best of
    `rounds` replays. `capture_error_mode`: torch's; "thread_local" where other threads (NCCL's) run."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best


def device_spans(prof: torch.profiler.profile) -> list[tuple[float, float, str]]:
    """(start us, end us, kernel name) of every device kernel and copy the profiler saw, in time order."""
    return sorted(
        (ev.time_range.start, ev.time_range.end, ev.name)
        for ev in prof.events()
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0
    )


def step_profile(eng: LLMEngine, batch: int, trace: str | None = None) -> dict[str, Any]:
    graphs = eng.runner.graphs
    assert graphs is not None
    graph, _ = graphs.graphs[((), graphs.bucket(batch))]  # type: ignore[index]  # the plain variant
    graph.replay()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(f"{trace}/step_b{batch}.json")
    seq = sorted(
        (ev.time_range.start, ev.device_time, ev.name)
        for ev in prof.events()
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0
    )
    return {**per_kernel(prof, 3), "first_kernels": [f"{d:8.1f} us {n[:60]}" for _, d, n in seq[:16]]}


def per_kernel(prof: torch.profiler.profile, calls: int, top: int = 14) -> dict[str, Any]:
    """Device time and launches per kernel name, per call of what ran `calls` times under `prof`."""
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            per[ev.name][0] += ev.device_time / calls
            per[ev.name][1] += 1 / calls
    kernels = sorted(((k, v[0], v[1]) for k, v in per.items()), key=lambda r: -r[1])
    return {
        "kernel_us_total": sum(v for _, v, _ in kernels),
        "kernels_per_step": sum(c for _, _, c in kernels),
        "top": [{"name": n[:90], "us": round(t, 1), "count": round(c)} for n, t, c in kernels[:top]],
    }


def profile_calls(fn: Callable[[], Any], calls: int = 3, trace: str | None = None) -> dict[str, Any]:
    """`per_kernel` of `calls` calls of fn (after one unprofiled call), plus their wall time per call;
    `trace`: also a chrome trace written there."""
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - t0) / calls
    if trace:  # the profiler does not make the folder: without it the trace is lost with a log line
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace)
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    host_top = [{"name": e.key[:60], "self_cpu_us": round(e.self_cpu_time_total / calls, 1)} for e in host]
    return {"wall_ms_profiled": wall_ms, **per_kernel(prof, calls), "host_top": host_top}


def loop_profile(eng: LLMEngine, batch: int, new: int = 64, trace: str | None = None) -> dict[str, Any]:
    """The engine loop at one batch size: wall time per step against the GPU's busy time in the same
    window (idle = host-bound), the kernels outside the graph, and the host functions that cost most."""
    prompts = random_prompts(batch, 128, eng.model_info.vocab_size, batch)
    generate(eng, prompts, new)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        dt, _ = generate(eng, prompts, new)
    if trace:
        Path(trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(f"{trace}/loop_b{batch}.json")
    spans = device_spans(prof)
    busy, end = 0.0, float("-inf")
    for a, b, _ in spans:  # union of kernel intervals (us)
        if b > end:
            busy += b - max(a, end)
            end = b
    window = spans[-1][1] - spans[0][0] if spans else 0.0
    names: dict[str, int] = defaultdict(int)
    for _, _, n in spans:
        names[n[:70]] += 1
    chained0, graphs0 = eng.chained_steps, eng.runner.graph_steps
    step_ms: list[float] = []
    generate(eng, prompts, new, step_ms=step_ms)
    ordered = sorted(step_ms)
    prof_c = cProfile.Profile()
    prof_c.enable()
    dt_c, _ = generate(eng, prompts, new)
    prof_c.disable()
    stats = pstats.Stats(prof_c)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:18]  # type: ignore[attr-defined]
    return {
        "wall_ms_per_step": 1e3 * dt / new,
        "gpu_busy_ms_per_step": busy / 1e3 / new,
        "gpu_idle_pct": 100 * (1 - busy / window) if window else 0.0,
        "kernel_names": dict(sorted(names.items(), key=lambda kv: -kv[1])[:25]),
        "cprofile_wall_ms_per_step": 1e3 * dt_c / new,
        "steps": len(step_ms),
        "step_ms_median": statistics.median(step_ms),
        "step_ms_first5": [round(x, 2) for x in step_ms[:5]],
        "step_ms_last3": [round(x, 2) for x in step_ms[-3:]],
        "step_ms_max5": [round(x, 2) for x in ordered[-5:]],
        "step_ms_total": sum(step_ms),
        "chained": eng.chained_steps - chained0,
        "graph_steps": eng.runner.graph_steps - graphs0,
        "host_top_tottime_us_per_step": [
            f"{1e6 * v[2] / new:8.1f} {v[1] / new:6.1f}x {k[0].split('/')[-1]}:{k[1]} {k[2]}" for k, v in top
        ],
    }


def prefill_profile(eng: LLMEngine, length: int, trace: str | None = None) -> dict[str, Any]:
    """The first step of one fresh request (its prefill, plus the chained first decode launch): wall
    time, the GPU's busy time inside it, kernels by device time, and host ops by self CPU time."""
    vocab = eng.model_info.vocab_size
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def first_step(tag: str, seed: int, around: Any = contextlib.nullcontext) -> float:
        """Wall ms of the request's first step only (`around` wraps just that step); the rest is drained."""
        prompt = random_prompts(1, length, vocab, seed)[0]
        seqs = make_sequences(eng, [prompt], params, tag=tag)
        eng.add(seqs[0])
        torch.cuda.synchronize()
        with around():
            t = time.perf_counter()
            eng.step()
            dt = 1e3 * (time.perf_counter() - t)
            torch.cuda.synchronize()
        while eng.has_work():
            eng.step()
        return dt

    warm = [first_step(f"pw{length}-{i}-", 1000 + i) for i in range(3)]
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    prof = torch.profiler.profile(activities=acts)
    first_step(f"pp{length}-", 2000, lambda: prof)
    if trace:
        prof.export_chrome_trace(f"{trace}/prefill_{length}.json")
    spans = device_spans(prof)
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for a, b, n in spans:
        per[n[:70]][0] += b - a
        per[n[:70]][1] += 1
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    prof_c = cProfile.Profile()
    cprof_ms = first_step(f"pc{length}-", 3000, lambda: prof_c)
    stats = pstats.Stats(prof_c)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:25]  # type: ignore[attr-defined]
    return {
        "first_step_ms_warm": [round(x, 2) for x in warm],
        "gpu_kernel_ms_sum": sum(b - a for a, b, _ in spans) / 1e3,
        "kernels": len(spans),
        "gpu_first_to_last_ms": (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0,
        "top_kernels": [
            f"{v[0]:9.1f} us x{v[1]:<4} {k}" for k, v in sorted(per.items(), key=lambda kv: -kv[1][0])[:15]
        ],
        "top_host_ops": [f"{e.self_cpu_time_total:9.1f} us x{e.count:<5} {e.key[:60]}" for e in cpu],
        "cprofile_ms": cprof_ms,
        "cprofile_cumtime": [
            f"{1e3 * v[3]:8.2f} ms {v[1]:5d}x {k[0].split('/')[-1]}:{k[1]} {k[2]}" for k, v in top
        ],
    }


SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "down_silu": (4096, 14336), "lm_head": (128256, 4096)}  # fmt: skip
# Qwen3-30B-A3B's dense projections (bench/moe_step_profile.py: at batch 1 its o_proj reads at ~2 TB/s)
QWEN3_SHAPES = {"q3_qkv": (5120, 2048), "q3_o": (2048, 4096)}
# Llama-3-8B's qkv and o_proj shards over two GPUs (bench/tp_bench.py): pick_config's small-matrix rule
TP2_SHAPES = {"tp2_qkv": (3072, 4096), "tp2_o": (4096, 2048)}
SWEEP = [
    GemvConfig(bn, bk, w, s)
    for bn, bk, w, s in itertools.product((4, 8, 16, 32, 64), (256, 512, 1024), (4, 8), (2, 3, 4))
    if bn * bk <= 32768
]


def gemv_sweep(
    bw: float,
    full: bool,
    shapes: dict[str, tuple[int, int]] = SHAPES,
    ms: tuple[int, ...] = (1, 8),
    cold: bool = False,
    also: tuple[GemvConfig, ...] = (),
) -> list[dict[str, Any]]:
    """Each shape's cuBLAS time and the best Triton config's (`full`: over SWEEP; else pick_config's).
    `cold`: calls cycle through copies of the weight (>= 256 MB together, so none is read from L2, as
    in a model's step, where a small matrix would otherwise stay in the 60 MB L2); then `default_us` is
    pick_config's time too. `also`: configs timed beside pick_config's when not `full` (an A/B)."""
    rows = []
    for (name, (n, k)), m in itertools.product(shapes.items(), ms):
        copies = min(64, -(-(256 << 20) // (n * k * 2))) if cold else 1
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        w = ws[0]
        silu = name.endswith("_silu")
        x = torch.randn(m, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
        ref = gemv_ref(x, w, silu_mul=True) if silu else F.linear(x, w)
        gb = n * k * 2 / 1e9
        cyc = itertools.cycle(ws)
        reps = max(20, copies)
        if silu:  # the unfused path: activation kernel, then cuBLAS
            t_cublas = graph_time_us(lambda x=x, c=cyc: F.linear(silu_mul(x), next(c)), reps=reps)
        else:
            t_cublas = graph_time_us(lambda x=x, c=cyc: F.linear(x, next(c)), reps=reps)
        best: tuple[float, GemvConfig | None] = (float("inf"), None)
        default = pick_config(m, n, k)
        t_default = None
        timed: dict[str, float] = {}
        for cfg in SWEEP if full else [default, *(c for c in also if c != default)]:
            try:
                out = gemv(x, w, silu_mul=silu, cfg=cfg)
                err = (out.float() - ref.float()).abs().max().item()
                if err > 0.05 * ref.float().abs().max().item():
                    continue
                t = graph_time_us(
                    lambda x=x, c=cyc, cfg=cfg, s=silu: gemv(x, next(c), silu_mul=s, cfg=cfg), reps=reps
                )
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is skipped
                print(f"skip {cfg}: {type(e).__name__}", flush=True)
                continue
            t_default = t if cfg == default else t_default
            timed[str(cfg)] = t
            best = min(best, (t, cfg), key=lambda r: r[0])
        rows.append({
            "shape": name, "m": m, "n": n, "k": k, "cold": cold, "cublas_us": t_cublas,
            "cublas_pct_copy": 100 * gb * 1e6 / t_cublas / bw, "triton_us": best[0],
            "triton_pct_copy": 100 * gb * 1e6 / best[0] / bw, "triton_cfg": str(best[1]),
            "default_us": t_default, "default_cfg": str(default), **({} if full else {"timed_us": timed}),
        })  # fmt: skip
        print(rows[-1], flush=True)
        del w, ws, x
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/decode_profile.json")
    ap.add_argument("--gemv-sweep", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-gemv", action="store_true")
    ap.add_argument("--trace", help="folder for chrome traces of the profiled steps")
    ap.add_argument("--prefill-only", action="store_true", help="only the first-step (prefill) profile")
    ap.add_argument("--qwen3-shapes", action="store_true", help="sweep Qwen3-30B-A3B's projections instead")
    ap.add_argument("--tp2-shapes", action="store_true", help="with Llama-3-8B's qkv/o shards over 2 GPUs")
    ap.add_argument("--cold", action="store_true", help="gemv calls cycle through weight copies (no L2)")
    ap.add_argument("--also", action="append", default=[], help="BN,BK,WARPS,STAGES timed too")
    args = ap.parse_args()
    if args.also and args.gemv_sweep:
        ap.error("--also times configs beside pick_config's; --gemv-sweep already times every config")
    parts = [a.split(",") for a in args.also]
    if not all(len(p) == 4 and all(v.isdigit() for v in p) for p in parts):
        ap.error(f"--also takes BN,BK,WARPS,STAGES (four integers), got {args.also}")
    also = tuple(GemvConfig(*(int(v) for v in p)) for p in parts)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    bw = copy_bandwidth() / 1e9  # GB/s
    res["copy_bw_tb_s"] = bw / 1e3
    small = {**(QWEN3_SHAPES if args.qwen3_shapes else {}), **(TP2_SHAPES if args.tp2_shapes else {})}
    shapes = small or SHAPES
    ms = (1, 8) if shapes is SHAPES else (1,)
    res["gemv"] = [] if args.skip_gemv else gemv_sweep(bw, args.gemv_sweep, shapes, ms, args.cold, also)
    if not args.skip_engine:
        model_dir = make_model_dir(Path(tempfile.mkdtemp()) / "llama3-8b-shape", LLAMA3_8B)
        cfg = EngineConfig(model=str(model_dir), dtype="bfloat16", load_format="dummy", max_num_seqs=64,
                           max_model_len=2048, gpu_memory_utilization=0.5)  # fmt: skip
        eng = LLMEngine(cfg)
        generate(eng, random_prompts(4, 128, eng.model_info.vocab_size, 99), 16)  # warm-up
        for n in (128, 512):
            res[f"prefill_{n}"] = prefill_profile(eng, n, args.trace)
    if not args.skip_engine and not args.prefill_only:
        for b in (1, 8):
            res[f"step_b{b}"] = step_profile(eng, b, args.trace)
        for b in (1, 8, 64):
            res[f"loop_b{b}"] = loop_profile(eng, b, 16 if args.trace else 64, args.trace)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    head = f"{'shape':<11}{'m':>3}{'cuBLAS us':>11}{'% copy':>8}{'triton us':>11}{'% copy':>8}{'default':>9}"
    print(f"\n{head}  config")
    for r in res["gemv"]:
        print(f"{r['shape']:<11}{r['m']:>3}{r['cublas_us']:>11.1f}{r['cublas_pct_copy']:>8.1f}"
              f"{r['triton_us']:>11.1f}{r['triton_pct_copy']:>8.1f}{r['default_us'] or float('nan'):>9.1f}"
              f"  {r['triton_cfg']}")  # fmt: skip
    for b in (1, 8):
        step = res.get(f"step_b{b}")
        if step:
            print(f"\nstep b{b}: {step['kernel_us_total']:.0f} us in {step['kernels_per_step']:.0f} kernels")
            for t in step["top"]:
                print(f"  {t['us']:>8.1f} us  x{t['count']:<4} {t['name']}")
            print("  first kernels of the step:", *step["first_kernels"], sep="\n    ")
    for n in (128, 512):
        pre = res.get(f"prefill_{n}")
        if pre:
            print(
                f"\nprefill {n}: first step {pre['first_step_ms_warm']} ms; GPU kernels "
                f"{pre['gpu_kernel_ms_sum']:.2f} ms over {pre['gpu_first_to_last_ms']:.2f} ms "
                f"({pre['kernels']} kernels); cProfile {pre['cprofile_ms']:.1f} ms"
            )
            print(*pre["top_kernels"], *pre["top_host_ops"], *pre["cprofile_cumtime"], sep="\n  ")
    for b in (1, 8, 64):
        loop = res.get(f"loop_b{b}")
        if loop:
            print(f"\nloop b{b}: {loop['wall_ms_per_step']:.2f} ms/step wall, GPU busy "
                  f"{loop['gpu_busy_ms_per_step']:.2f} ms ({loop['gpu_idle_pct']:.1f}% idle); "
                  f"under cProfile {loop['cprofile_wall_ms_per_step']:.2f} ms")  # fmt: skip
            print(
                "  steps",
                {k: loop[k] for k in loop if k.startswith("step") or k in ("chained", "graph_steps")},
            )
            for line in loop["host_top_tottime_us_per_step"][:12]:
                print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
