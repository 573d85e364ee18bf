"""End-to-end FP4 serving on the H200 (issue 13): the engine on a Llama-3-8B-shaped model with random
weights, bf16 and then `--quantization nvfp4` (and any other format listed), each in its own process so
neither sees the other's memory. Per format: decode tok/s at batch 1, 8 and 64 (128-token prompts, 128
new tokens, greedy, CUDA graphs as served), the graph-only step time, time to first token of a
2048-token prompt, and the weight bytes (whole model, and the decoder layers' projections alone).
Speedups are over the bf16 engine of the same run. Prints a table last; writes JSON.

    python bench/fp4_e2e.py --out bench/results/fp4_e2e.json [--formats bf16,nvfp4,mxfp4]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_runs import generate, random_prompts, time_to_first_token  # noqa: E402
from gpu_bench import graph_replay_ms  # noqa: E402
from shapes import LLAMA3_8B, make_model_dir  # noqa: E402

PROMPT, NEW, BATCHES, PREFILL = 128, 128, (1, 8, 64), 2048


def projection_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder layers' parameters other than norms (what FP4 replaces)."""
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if ".layers." in name and "norm" not in name
    )


def measure(fmt: str, model_dir: Path) -> dict[str, Any]:
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    cfg = EngineConfig(
        model=str(model_dir), dtype="bfloat16", load_format="dummy", max_num_seqs=64, max_model_len=4096,
        max_num_batched_tokens=4096, gpu_memory_utilization=0.5,
        quantization=None if fmt == "bf16" else fmt,
    )  # fmt: skip
    t0 = time.perf_counter()
    eng = LLMEngine(cfg)
    res: dict[str, Any] = {"start_s": time.perf_counter() - t0}
    res["weights_gb"] = eng.loaded.weights_bytes / 1e9
    res["projection_gb"] = projection_bytes(eng.loaded.model) / 1e9
    vocab = eng.model_info.vocab_size
    generate(eng, random_prompts(4, PROMPT, vocab, 99), 16)  # warm-up
    for b in BATCHES:
        step_ms: list[float] = []
        dt, outs = generate(eng, random_prompts(b, PROMPT, vocab, b), NEW, step_ms=step_ms)
        assert all(len(o) == NEW for o in outs)
        res[f"tok_s_b{b}"] = b * NEW / dt
        res[f"step_ms_median_b{b}"] = statistics.median(step_ms[1:])
        res[f"graph_step_ms_b{b}"] = graph_replay_ms(eng, b)
        print(f"{fmt} b{b}: {res[f'tok_s_b{b}']:.1f} tok/s", flush=True)
    # a new prompt each time: a repeated one would be served from the prefix cache
    prompts = random_prompts(4, PREFILL, vocab, 5)
    time_to_first_token(eng, prompts[0])
    res[f"ttft_ms_{PREFILL}"] = 1e3 * statistics.median(time_to_first_token(eng, p) for p in prompts[1:])
    res["graph_steps"], res["eager_decode_steps"] = eng.runner.graph_steps, eng.runner.eager_decode_steps
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/fp4_e2e.json")
    ap.add_argument("--formats", default="bf16,nvfp4")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure this format, print JSON
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, Path(args.model_dir))), flush=True)
        return 0
    model_dir = make_model_dir(Path(tempfile.mkdtemp()) / "llama3-8b-shape", LLAMA3_8B)
    res: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "shape": "Llama-3-8B (random weights)",
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
    }
    for fmt in args.formats.split(","):
        cmd = [sys.executable, __file__, "--one", fmt, "--model-dir", str(model_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            res[f"{fmt}_error"] = (proc.stdout + proc.stderr)[-4000:]
            print(res[f"{fmt}_error"], flush=True)
            continue
        res[fmt] = json.loads(lines[-1][len("RESULT ") :])
    base = res.get("bf16")
    for fmt in args.formats.split(","):
        if fmt == "bf16" or fmt not in res or base is None:
            continue
        r = res[fmt]
        for b in BATCHES:
            res[f"{fmt}_e2e_speedup_b{b}"] = r[f"tok_s_b{b}"] / base[f"tok_s_b{b}"]
        res[f"{fmt}_prefill_time_ratio_{PREFILL}"] = r[f"ttft_ms_{PREFILL}"] / base[f"ttft_ms_{PREFILL}"]
        res[f"{fmt}_weight_memory_ratio"] = r["weights_gb"] / base["weights_gb"]
        res[f"{fmt}_projection_memory_ratio"] = r["projection_gb"] / base["projection_gb"]
    for key in ("e2e_speedup_b1", "e2e_speedup_b8", "e2e_speedup_b64", "weight_memory_ratio"):
        if f"nvfp4_{key}" in res:
            res[f"fp4_{key}"] = res[f"nvfp4_{key}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    cols = [f"tok_s_b{b}" for b in BATCHES] + [f"ttft_ms_{PREFILL}", "weights_gb", "projection_gb"]
    print("\n" + f"{'format':<8}" + "".join(f"{c:>16}" for c in cols))
    for fmt in args.formats.split(","):
        if fmt in res:
            print(f"{fmt:<8}" + "".join(f"{res[fmt][c]:>16.2f}" for c in cols))
    print({k: round(v, 3) for k, v in res.items() if isinstance(v, float)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
