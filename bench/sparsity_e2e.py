"""End-to-end decode with TEAL sparsity (issue 14, `sparse_e2e_speedup_s40_b1` / `_s50_b1`): the engine on
a Llama-3-8B-shaped model with random weights (--load-format dummy: the same seeded values in every
process), first calibrated (`calibrate`, the code of `actserve sparsity calibrate`, on the model's own
activations over random-token prompts: random weights have no text distribution of their own), then
served twice, each in its own process: dense (no calibration, so no transposed weight copies) and with
the calibration (the sparsity plugin's W^T copies and fused sparse GEMV steps). Per process: decode tok/s
at batch 1, 2, 4, 8 and 16 (128-token prompts, 128 new tokens, greedy, CUDA graphs as served) for plain
requests and, in the sparse one, for requests at levels 0.4 and 0.5, plus its steps replayed from graphs
and run eager. Speedups are over the dense process's plain requests; `sparse_e2e_pays_up_to_b_s{40,50}` is the
largest batch at which the level still beats dense. Each process also profiles 5 steady decode steps at
batch 1 (and 2) per kind: kernel launches per step (`<kind>_profile_b1.kernels_per_step`) and the top
kernels, printed beside the batch-1 speedups. Prints a table last; writes JSON.

    python bench/sparsity_e2e.py --out bench/results/sparsity_e2e.json
    python bench/sparsity_e2e.py --batches 1 --out /tmp/s.json   # batch 1 only (the speedup targets)
    python bench/sparsity_e2e.py --cpu-smoke --out /tmp/s.json   # runs end to end; its times mean nothing
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import profile_calls  # noqa: E402
from engine_runs import generate, random_prompts  # noqa: E402
from shapes import LLAMA3_8B, make_model_dir  # noqa: E402

PROMPT, NEW, BATCHES, LEVELS = 128, 128, (1, 2, 4, 8, 16), (0.4, 0.5)
TINY = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "torch_dtype": "float32"}  # fmt: skip


def engine(model_dir: Path, smoke: bool, calibration: Path | None) -> Any:
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    opts = {"sparsity": {"calibration": str(calibration)}} if calibration is not None else {}
    cfg = EngineConfig(
        model=str(model_dir), dtype="float32" if smoke else "bfloat16", load_format="dummy",
        device="cpu" if smoke else "auto", max_num_seqs=16, max_model_len=2048,
        max_num_batched_tokens=2048, gpu_memory_utilization=0.5, plugin_options=opts,
    )  # fmt: skip
    return LLMEngine(cfg)


def calibrate_to(model_dir: Path, smoke: bool, out: Path) -> dict[str, Any]:
    from actserve.interventions.sparsity.artifact import save_calibration
    from actserve.interventions.sparsity.calibrate import calibrate

    eng = engine(model_dir, smoke, None)
    seqs = random_prompts(4 if smoke else 16, 64 if smoke else 512, eng.model_info.vocab_size, 7)
    cal = calibrate(eng, seqs, progress=False, info={"source": "random-token prompts"},
                    correction_tokens=256 if smoke else 2048)  # fmt: skip
    save_calibration(cal, out)
    return {"tokens": cal.tokens}


def measure(
    model_dir: Path, smoke: bool, calibration: Path | None, batches: tuple[int, ...] = BATCHES
) -> dict[str, Any]:
    eng = engine(model_dir, smoke, calibration)
    vocab, new = eng.model_info.vocab_size, 16 if smoke else NEW
    generate(eng, random_prompts(2, PROMPT, vocab, 99), 8)  # warm-up
    res: dict[str, Any] = {}
    kinds: list[tuple[str, float | None]] = [("dense", None)]
    if calibration is not None:
        kinds += [(f"s{round(lv * 100)}", lv) for lv in LEVELS]
    for tag, level in kinds:
        for b in batches:
            spec = {"sparsity": {"method": "teal", "level": level}} if level is not None else None
            # this kind's graph variant for this batch bucket is captured (and its kernels compiled) on
            # first use: not inside the timed run
            generate(eng, random_prompts(b, PROMPT, vocab, 50 + b), 4, [spec] * b)
            graphs0, eager0 = eng.runner.graph_steps, eng.runner.eager_decode_steps
            dt, outs = generate(eng, random_prompts(b, PROMPT, vocab, b), new, [spec] * b)
            assert all(len(o) == new for o in outs)
            res[f"{tag}_tok_s_b{b}"] = b * new / dt
            res[f"{tag}_graph_steps_b{b}"] = eng.runner.graph_steps - graphs0
            res[f"{tag}_eager_steps_b{b}"] = eng.runner.eager_decode_steps - eager0
            print(f"{tag} b{b}: {res[f'{tag}_tok_s_b{b}']:.1f} tok/s", flush=True)
    if not smoke:
        for tag, level in kinds:
            for b in (1, 2):
                if b not in batches:
                    continue
                spec = {"sparsity": {"method": "teal", "level": level}} if level is not None else None
                prof = res[f"{tag}_profile_b{b}"] = steady_profile(eng, b, spec)
                print(
                    f"{tag} b{b} profile: {prof['kernels_per_step']:.0f} launches a step, "
                    f"{prof['kernel_us_total']:.0f} us of kernels;", json.dumps(prof["top"][:6]), flush=True,
                )  # fmt: skip
    return res


def steady_profile(eng: Any, b: int, spec: dict[str, Any] | None) -> dict[str, Any]:
    """Kernels of 5 steady decode steps of b rows of `spec` (decode_profile.profile_calls)."""
    from actserve.server.engine.offline import make_sequences
    from actserve.server.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    seqs = make_sequences(eng, random_prompts(b, PROMPT, eng.model_info.vocab_size, 77), params, [spec] * b)
    for s in seqs:
        eng.add(s)
    while min(len(s.output_token_ids) for s in seqs) < 4:
        eng.step()
    out = profile_calls(eng.step, calls=5)
    while eng.has_work():
        eng.step()
    return out


def child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError((proc.stdout + proc.stderr)[-4000:])
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/sparsity_e2e.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny random config on the CPU")
    ap.add_argument(
        "--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes (default: all)"
    )
    ap.add_argument("--one", choices=["calibrate", "dense", "sparse"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--calibration", help=argparse.SUPPRESS)
    args = ap.parse_args()
    smoke = args.cpu_smoke
    batches = tuple(int(b) for b in args.batches.split(","))
    if args.one:
        model_dir, cal = Path(args.model_dir), Path(args.calibration)
        if args.one == "calibrate":
            out = calibrate_to(model_dir, smoke, cal)
        else:
            out = measure(model_dir, smoke, cal if args.one == "sparse" else None, batches)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    tmp = Path(tempfile.mkdtemp())
    model_dir = make_model_dir(tmp / "model", TINY if smoke else LLAMA3_8B)
    cal = tmp / "actserve-sparsity.safetensors"
    common = ["--model-dir", str(model_dir), "--calibration", str(cal), "--batches", args.batches]
    common += ["--cpu-smoke"] if smoke else []
    res: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv),
        "device": "cpu" if smoke else torch.cuda.get_device_name(),
        "shape": "tiny (CPU smoke)" if smoke else "Llama-3-8B (random weights)",
        "prompt_tokens": PROMPT,
        "new_tokens": 16 if smoke else NEW,
    }
    res["calibration"] = child(["--one", "calibrate", *common])
    res["dense"] = child(["--one", "dense", *common])
    res["sparse"] = child(["--one", "sparse", *common])
    base = res["dense"]
    for b in batches:
        res[f"plain_beside_kernel_ratio_b{b}"] = (
            res["sparse"][f"dense_tok_s_b{b}"] / base[f"dense_tok_s_b{b}"]
        )
        for lv in LEVELS:
            tag = f"s{round(lv * 100)}"
            res[f"sparse_e2e_speedup_{tag}_b{b}"] = (
                res["sparse"][f"{tag}_tok_s_b{b}"] / base[f"dense_tok_s_b{b}"]
            )
    for lv in LEVELS:
        tag = f"s{round(lv * 100)}"
        wins = [b for b in batches if res[f"sparse_e2e_speedup_{tag}_b{b}"] > 1]
        res[f"sparse_e2e_pays_up_to_b_{tag}"] = max(wins, default=0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{'run':<14}" + "".join(f"{'tok/s b' + str(b):>14}" for b in batches))
    rows = [("dense engine", base, "dense"), ("plain, sparse", res["sparse"], "dense")]
    rows += [(f"level {lv}", res["sparse"], f"s{round(lv * 100)}") for lv in LEVELS]
    for name, r, tag in rows:
        print(f"{name:<14}" + "".join(f"{r[f'{tag}_tok_s_b{b}']:>14.1f}" for b in batches))
    for name, r, tag in rows:  # launches per steady batch-1 step (what issue 14's fused step cuts)
        prof = r.get(f"{tag}_profile_b1")
        if prof is not None:
            launches, ms = prof["kernels_per_step"], prof["wall_ms_profiled"]
            print(f"{name:<14} b1: {launches:.0f} launches a step, {ms:.2f} ms a step profiled")
    print({k: round(v, 3) for k, v in res.items() if isinstance(v, float)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
