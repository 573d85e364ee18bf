"""Tensor parallelism on two GPUs (issue 17): all-reduce latency, decode speed-ups against one GPU in the
same run, the 70B-shape decode against its two-GPU roofline, and greedy agreement with one GPU.

1. All-reduce latency of a bf16 message of 8 KB (a batch-1 Llama-3 residual) and 512 KB: NCCL captured in
   a CUDA graph (what decode graphs replay; 50 all-reduces per graph, replayed 20 times, CUDA events),
   NCCL eager, and torch's symmetric-memory one-shot all-reduce (`--tp-allreduce symm_mem`'s path, also
   in a graph) when this torch and the GPUs have it.
2. Llama-3-8B shape (random bf16 weights, `--load-format dummy`), batch-1 decode on one GPU and split over
   two (`--tensor-parallel-size 2`): median engine step after warm-up, `tp2_speedup_b1_8b` = one / two,
   and the bound the measured all-reduce sets (two per layer: the speed-up if the split halved the
   weights' time and added 2 x 32 all-reduces), `tp2_speedup_bound_b1_8b`.
3. Llama-3-70B shape (80 layers, hidden 8192, MLP 28672, 64 / 8 heads, vocabulary 128256; random bf16)
   split over two: batch 1 and 64 decode, against the roofline weight bytes / (2 x measured copy
   bandwidth) (each GPU reads its half of the weights once per step): `tp2_roofline_frac_b1_70b`.
4. Greedy agreement of two GPUs vs one on TinyStories-656K in bf16: 64 held-out story openings x 128
   tokens; the share of positions whose token matches, and where each diverging prompt first differs.

Each part runs in a process of its own (GPU memory is returned between them). JSON keys among the
figures: `tp2_speedup_b1_8b`, `tp2_roofline_frac_b1_70b`, `allreduce_us_8KB`.

    python bench/tp_bench.py --out bench/results/tp_bench.json      # two H200s (nvidia-h200-x2)
    python bench/tp_bench.py --parts allreduce,decode8b --out F      # a subset (added to F's figures)
    python bench/tp_bench.py --cpu-smoke                             # the same, tiny, on the CPU (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from decode_profile import graph_time_us  # noqa: E402
from engine_runs import generate, random_prompts  # noqa: E402
from shapes import LLAMA3_8B, make_model_dir  # noqa: E402

PARTS = ("allreduce", "decode8b", "decode70b", "agree")
LLAMA3_70B = {
    **LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 8192,
}  # fmt: skip
# the smoke run's stand-ins (CPU, float32)
TINY_8B = {
    **LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 2048,
}  # fmt: skip
TINY_70B = {**TINY_8B, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 6}
TINYSTORIES = REPO / "tests" / "data" / "tinystories-656k"
HELDOUT = REPO / "bench" / "data" / "fp4_quality" / "tinystories_heldout.jsonl"
SIZES = {"8KB": 8 * 1024, "512KB": 512 * 1024}


# -- children: each part's measurement, in a process of its own ---------------------------------------
def allreduce_rank(rank: int, smoke: bool, port: int, out: str) -> None:
    """One of two ranks timing all-reduces; rank 0 writes the JSON."""
    import torch.distributed as dist

    cuda = not smoke
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    res: dict[str, Any] = {}
    per_graph, replays = (50, 20) if cuda else (1, 50)
    symm = None
    if cuda:
        try:
            from actserve.server.layers.parallel import SymmMemAllReduce

            symm = SymmMemAllReduce(dist.group.WORLD, dtype, dev)
        except Exception as e:  # noqa: BLE001 - reported: this torch / these GPUs may lack it
            res["symm_mem_error"] = f"{type(e).__name__}: {e}"[:300]
    for name, nbytes in SIZES.items():
        x = torch.ones(nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=dev)
        for _ in range(10):
            dist.all_reduce(x)
        res[f"allreduce_eager_us_{name}"] = timed(lambda x=x: dist.all_reduce(x), replays * 5, cuda)
        if not cuda:
            res[f"allreduce_us_{name}"] = res[f"allreduce_eager_us_{name}"]  # gloo: no graphs
            continue
        res[f"allreduce_us_{name}"] = graph_time_us(
            lambda x=x: dist.all_reduce(x), per_graph, replays, "thread_local"
        )
        if symm is not None:
            try:
                res[f"allreduce_symm_us_{name}"] = graph_time_us(
                    lambda x=x, s=symm: s.all_reduce(x), per_graph, replays, "thread_local"
                )
            except Exception as e:  # noqa: BLE001 - reported
                res["symm_mem_error"] = f"{type(e).__name__}: {e}"[:300]
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def timed(fn: Any, n: int, cuda: bool) -> float:
    """Microseconds per call of `fn`, eager."""
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t) / n


def child_allreduce(a: argparse.Namespace) -> dict[str, Any]:
    import torch.multiprocessing as tmp

    from actserve.server.engine.tp_group import free_port

    tmp.spawn(allreduce_rank, args=(a.cpu_smoke, free_port(), a.child_out), nprocs=2, join=True)
    return json.loads(Path(a.child_out).read_text())


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes per second of one device-to-device copy of 2 GiB (read + write counted), best of 5."""
    n = (2 << 30) if dev.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n / best


def child_decode(a: argparse.Namespace) -> dict[str, Any]:
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    smoke = a.cpu_smoke
    shape = {"8b": TINY_8B if smoke else LLAMA3_8B, "70b": TINY_70B if smoke else LLAMA3_70B}[a.shape]
    model_dir = make_model_dir(Path(tempfile.mkdtemp()) / f"tp-{a.shape}", shape)
    batches = [int(b) for b in a.batches.split(",")]
    prompt_len, steps, warmup = (16, 4, 1) if smoke else (32, 64, 8)
    ctx = prompt_len + steps + warmup + 8
    blocks = max(batches) * (-(-ctx // 16)) + 16
    eng = LLMEngine(
        EngineConfig(
            model=str(model_dir), device="cpu" if smoke else "cuda", dtype="float32" if smoke else "bfloat16",
            load_format="dummy", tensor_parallel_size=a.tp, max_num_seqs=max(batches), max_model_len=ctx + 16,
            num_kv_blocks=blocks, enable_prefix_caching=False, tp_allreduce=a.allreduce,
            max_num_batched_tokens=max(max(batches) * prompt_len, 64),
        )
    )  # fmt: skip
    try:
        res: dict[str, Any] = {"tp": a.tp, "shape": a.shape, "graphs": eng.runner.graphs is not None}
        for b in batches:
            step_ms: list[float] = []
            generate(
                eng,
                random_prompts(b, prompt_len, shape["vocab_size"], seed=b),
                steps + warmup + 1,
                step_ms=step_ms,
            )
            decode = step_ms[1 + warmup :]  # the first step prefills
            res[f"step_ms_b{b}"] = statistics.median(decode)
            res[f"tok_s_b{b}"] = 1e3 * b / res[f"step_ms_b{b}"]
        ranks = eng.tp.rank_memory if eng.tp is not None else [{"weights": eng.loaded.weights_bytes}]
        res["weight_bytes"] = sum(r["weights"] for r in ranks)
        res["weight_bytes_per_rank"] = [r["weights"] for r in ranks]
        res["copy_bw"] = copy_bandwidth(eng.model_info.device)
        res["graph_steps"] = getattr(eng.runner, "graph_steps", 0)
    finally:
        eng.close()
    return res


def agree_prompts(n: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINYSTORIES)
    texts = [json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()[:n]]
    return [tok(t)["input_ids"][:length] for t in texts]


def child_agree(a: argparse.Namespace) -> dict[str, Any]:
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine
    from actserve.server.engine.offline import generate as generate_tokens
    from actserve.server.engine.sampling_params import SamplingParams

    smoke = a.cpu_smoke
    n, length, tokens = (4, 24, 8) if smoke else (64, 48, 128)
    dev, dtype = ("cpu", "float32") if smoke else ("cuda", "bfloat16")
    eng = LLMEngine(
        EngineConfig(
            model=str(TINYSTORIES), device=dev, dtype=dtype, tensor_parallel_size=a.tp, max_num_seqs=64,
            num_kv_blocks=64 * 12 + 16, max_model_len=length + tokens + 8,
        )
    )  # fmt: skip
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        out = generate_tokens(eng, agree_prompts(n, length), params)
    finally:
        eng.close()
    return {"tokens": out}


# -- the parent: runs the parts and puts the figures together ----------------------------------------
def run_child(a: argparse.Namespace, *args: str) -> dict[str, Any]:
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, __file__, "--child-out", out, *args] + (["--cpu-smoke"] if a.cpu_smoke else [])
    t = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(f"  [{' '.join(args)}] {time.time() - t:.0f} s", flush=True)
    return json.loads(Path(out).read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (gloo), end to end")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument(
        "--allreduce", default="nccl", choices=["nccl", "symm_mem"], help="--tp-allreduce of TP=2"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="8b", help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batches", default="1", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cpu_smoke:
        a.allreduce = "nccl"  # (gloo on the CPU whatever the choice)
    if a.child is not None:
        res = {"allreduce": child_allreduce, "decode": child_decode, "agree": child_agree}[a.child](a)
        Path(a.child_out).write_text(json.dumps(res))
        return 0
    parts = [p for p in a.parts.split(",") if p]
    bad = set(parts) - set(PARTS)
    if bad:
        ap.error(f"--parts: unknown {sorted(bad)}; choose among {','.join(PARTS)}")
    t0 = time.time()
    res: dict[str, Any] = {
        "bench": "tp_bench",
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "device": "cpu (gloo, smoke)" if a.cpu_smoke else torch.cuda.get_device_name(),
        "gpus": 0 if a.cpu_smoke else torch.cuda.device_count(),
        "tp_allreduce": a.allreduce,
    }
    if a.out is not None and a.out.exists() and set(parts) != set(PARTS):  # a subset adds to an earlier run
        before = json.loads(a.out.read_text())
        res = {**before, **res, "command": f"{before.get('command', '')}; {res['command']}".lstrip("; ")}
    if "allreduce" in parts:
        res |= run_child(a, "--child", "allreduce")
        print(
            "all-reduce us:",
            {k: round(v, 1) for k, v in res.items() if k.startswith("allreduce_") and isinstance(v, float)},
        )
    if "decode8b" in parts:
        one = run_child(a, "--child", "decode", "--shape", "8b", "--tp", "1")
        two = run_child(a, "--child", "decode", "--shape", "8b", "--tp", "2", *tp_flag(a))
        res["decode_8b"] = {"tp1": one, "tp2": two}
        res["tp2_speedup_b1_8b"] = one["step_ms_b1"] / two["step_ms_b1"]
        layers = (TINY_8B if a.cpu_smoke else LLAMA3_8B)["num_hidden_layers"]
        ar_ms = res.get("allreduce_us_8KB", 0.0) / 1e3
        bound_ms = (
            one["step_ms_b1"] / 2 + 2 * layers * ar_ms
        )  # weights' time halved, two all-reduces per layer
        res["tp2_step_bound_ms_b1_8b"] = bound_ms
        res["tp2_speedup_bound_b1_8b"] = one["step_ms_b1"] / bound_ms
        res["tp2_frac_of_bound_b1_8b"] = bound_ms / two["step_ms_b1"]
        speedup = res["tp2_speedup_b1_8b"]
        print(f"8B b1: {one['step_ms_b1']:.2f} ms (1 GPU) vs {two['step_ms_b1']:.2f} ms (2): x{speedup:.2f}")
    if "decode70b" in parts:
        big = 8 if a.cpu_smoke else 64
        two = run_child(
            a, "--child", "decode", "--shape", "70b", "--tp", "2", "--batches", f"1,{big}", *tp_flag(a)
        )
        roofline_ms = 1e3 * two["weight_bytes"] / (2 * two["copy_bw"])
        res["decode_70b"] = two
        res["roofline_ms_70b"] = roofline_ms
        res["copy_bw_GBs"] = two["copy_bw"] / 1e9
        res["tp2_roofline_frac_b1_70b"] = roofline_ms / two["step_ms_b1"]
        res[f"tp2_roofline_frac_b{big}_70b"] = roofline_ms / two[f"step_ms_b{big}"]
        res[f"tp2_tok_s_b{big}_70b"] = two[f"tok_s_b{big}"]
        b1, bb = two["step_ms_b1"], two[f"step_ms_b{big}"]
        print(f"70B b1 {b1:.2f} ms, b{big} {bb:.2f} ms; roofline {roofline_ms:.2f} ms")
    if "agree" in parts:
        one = run_child(a, "--child", "agree", "--tp", "1")["tokens"]
        two = run_child(a, "--child", "agree", "--tp", "2", *tp_flag(a))["tokens"]
        same = sum(x == y for p, q in zip(one, two, strict=True) for x, y in zip(p, q, strict=True))
        total = sum(len(p) for p in one)
        first = {
            i: next(j for j, (x, y) in enumerate(zip(p, q, strict=True)) if x != y)
            for i, (p, q) in enumerate(zip(one, two, strict=True))
            if p != q
        }
        res["tp2_greedy_agreement_tinystories"] = same / total
        res["tp2_greedy_prompts_diverging"] = len(first)
        res["tp2_greedy_first_divergence"] = first
        res["greedy_prompts_x_tokens"] = [len(one), len(one[0]) if one else 0]
        print(f"greedy agreement {same}/{total} ({100 * same / total:.2f} %), {len(first)} prompts diverge")
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


def tp_flag(a: argparse.Namespace) -> list[str]:
    return ["--allreduce", a.allreduce]


if __name__ == "__main__":
    sys.exit(main())
