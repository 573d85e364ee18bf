"""Chunked prefill on the Llama-3-8B shape (dummy weights) at --max-model-len 131072: the profiled
activation peak of a step at the budget and the KV blocks left after it, then one 128k-token prompt and a
32k one served in chunks (TTFT), with the GPU's peak memory. Writes bench/results/chunked_prefill.json
(and $OUT/ when set)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_runs import random_prompts, time_to_first_token  # noqa: E402
from shapes import LLAMA3_8B, make_model_dir  # noqa: E402

from actserve.server.engine.config import EngineConfig  # noqa: E402
from actserve.server.engine.llm_engine import LLMEngine  # noqa: E402


def main() -> int:
    budget = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    model_dir = make_model_dir(Path("/tmp/llama3-8b-131k"), {**LLAMA3_8B, "max_position_embeddings": 131328})
    cfg = EngineConfig(
        model=str(model_dir), dtype="bfloat16", load_format="dummy", max_num_seqs=8, max_model_len=131072,
        max_num_batched_tokens=budget, gpu_memory_utilization=0.9,
    )  # fmt: skip
    res: dict[str, Any] = {"budget": budget, "max_model_len": 131072, "gpu": torch.cuda.get_device_name()}
    t0 = time.perf_counter()
    eng = LLMEngine(cfg)
    res["engine_start_s"] = time.perf_counter() - t0
    res["kv_blocks"] = eng.blocks.num_blocks
    res["kv_tokens"] = eng.blocks.num_blocks * eng.block_size
    res["kv_gb"] = eng.runner.kv_bytes / 1e9
    res["weights_gb"] = eng.loaded.weights_bytes / 1e9
    res["step_activation_gb"] = eng.loaded.step_activation_bytes / 1e9
    vocab = eng.model_info.vocab_size
    time_to_first_token(eng, random_prompts(1, 512, vocab, 1)[0])  # warm-up
    torch.cuda.reset_peak_memory_stats()
    for n in (32768, 131000):
        res[f"ttft_{n}_s"] = time_to_first_token(eng, random_prompts(1, n, vocab, n)[0])
        print(f"prompt {n}: TTFT {res[f'ttft_{n}_s']:.2f} s", flush=True)
    res["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    res["total_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    print(json.dumps(res, indent=1))
    text = json.dumps(res, indent=1) + "\n"
    (Path(__file__).parent / "results" / "chunked_prefill.json").write_text(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "chunked_prefill.json").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
