"""How much a retrieving request's block choice changes from one decode step to the next on real text
(issue 16, the host tier): the share of the blocks a step reads that its previous step did not, which is
what the host tier must copy back per step. The H200 speed bench fills the KV cache with random values,
where every step chooses new blocks (its worst case); this measures a real model on real text.

SmolLM2-135M-Instruct on the CPU (float32), the host tier on (`--kv-offload-gb`), one request per method:
a prompt of --context tokens of the FP4 bench's held-out text (The Rust Programming Language, human
written; bench/data/fp4_quality/manifest.json), then --steps greedy tokens with a 2048-token budget. After
the first decode steps the request's cold blocks are on the host; from then on, per step, the plugin's
counters give the blocks retrieved (over all layers) and the blocks recalled from the host (over all
layers; a block already staged for the slot is not copied again). `churn` = recalled / retrieved over
the measured steps. `recall_mb_per_step_llama3_8b` scales that to Llama-3-8B's shape (32 layers, a
16-token block's K/V 64 KiB per layer) at this run's blocks per layer, an estimate, and
`recall_ms_at_55gbs` the copy time at the H200's measured 55 GB/s host-to-device bandwidth.

    python bench/kv_retrieval_churn.py --out bench/results/kv_retrieval_churn.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actserve.server.engine.config import EngineConfig  # noqa: E402
from actserve.server.engine.llm_engine import LLMEngine  # noqa: E402
from actserve.server.engine.offline import make_sequences  # noqa: E402
from actserve.server.engine.sampling_params import SamplingParams  # noqa: E402
from actserve.server.models.default_model import default_model_dir  # noqa: E402

TEXT = REPO / "bench/data/fp4_quality/smollm2_heldout.jsonl"
LAYER_BLOCK_BYTES_8B = 2 * 16 * 8 * 128 * 2  # K and V of one 16-token block, one layer, bf16
LAYERS_8B = 32
H2D_BYTES_PER_S = 55.3e9  # bench/results/moe_offload.json, measured on the H200


def prompt_tokens(tok: Any, n: int) -> list[int]:
    docs = [json.loads(line)["text"] for line in TEXT.read_text().splitlines() if line.strip()]
    ids = tok.encode("\n\n".join(docs))
    if len(ids) < n:
        raise SystemExit(f"{TEXT} has {len(ids)} tokens, fewer than --context {n}")
    return ids[:n]


def run(eng: LLMEngine, prompt: list[int], method: str, budget: int, steps: int, skip: int) -> dict[str, Any]:
    """Step one request; counters per decode step once `skip` decode steps have passed."""
    plugin = eng.registry.plugin("kv_retrieval")
    assert plugin is not None
    params = SamplingParams(max_tokens=steps + skip, temperature=0.0, ignore_eos=True)
    spec = {"kv_retrieval": {"method": method, "budget_tokens": budget}}
    (seq,) = make_sequences(eng, [prompt], params, [spec], tag=f"{method}-")
    eng.add(seq)
    per_step: list[tuple[float, float]] = []
    last: tuple[float, float] | None = None
    while eng.has_work():
        eng.step()
        made = len(seq.output_token_ids)
        st = plugin.stats()
        now = (st.get("retrieved_blocks", 0.0), st.get("recalled_blocks", 0.0))
        if made > skip and last is not None:
            per_step.append((now[0] - last[0], now[1] - last[1]))
        if made >= skip:
            last = now
    retrieved = sum(r for r, _ in per_step)
    recalled = sum(c for _, c in per_step)
    layers = eng.model_info.num_layers
    per_layer = retrieved / max(len(per_step), 1) / layers  # blocks a layer reads per step
    churn = recalled / retrieved if retrieved else None
    mb = churn * per_layer * LAYERS_8B * LAYER_BLOCK_BYTES_8B / 1e6 if churn is not None else None
    return {
        "method": method,
        "measured_steps": len(per_step),
        "retrieved_blocks_per_layer_step": per_layer,
        "recalled_blocks": recalled,
        "retrieved_blocks": retrieved,
        "churn": churn,
        "churn_per_step": [c / r if r else None for r, c in per_step],
        "recall_mb_per_step_llama3_8b": mb,
        "recall_ms_at_55gbs": mb * 1e6 / H2D_BYTES_PER_S * 1e3 if mb is not None else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=6144)
    ap.add_argument("--steps", type=int, default=32, help="decode steps measured")
    ap.add_argument("--skip", type=int, default=3, help="decode steps before measuring (blocks move out)")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--methods", default="actqkv,infllm,quest")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    top = args.context + args.steps + args.skip + 16
    cfg = EngineConfig(
        model=str(default_model_dir()), device="cpu", max_model_len=top, max_num_batched_tokens=1024,
        kv_cache_memory_gb=2.0, kv_offload_gb=1.0, enable_prefix_caching=False,
        plugin_options={"kv_retrieval": {"slots": 1, "max_budget_tokens": args.budget}},
    )  # fmt: skip
    eng = LLMEngine(cfg)
    prompt = prompt_tokens(eng.tokenizer, args.context)
    t0 = time.time()
    rows = []
    for m in args.methods.split(","):
        rows.append(run(eng, prompt, m, args.budget, args.steps, args.skip))
        r = rows[-1]
        print(f"[{time.time() - t0:5.0f}s] {m}: churn {r['churn']:.3f} over {r['measured_steps']} steps, "
              f"{r['retrieved_blocks_per_layer_step']:.1f} blocks/layer/step", flush=True)  # fmt: skip
    res = {
        "command": "python " + shlex.join(sys.argv),
        "model": "SmolLM2-135M-Instruct (CPU, float32)",
        "text": "bench/data/fp4_quality/smollm2_heldout.jsonl (held-out split), first --context tokens",
        "context": args.context,
        "budget_tokens": args.budget,
        "rows": rows,
        **{f"kvr_churn_{r['method']}": r["churn"] for r in rows},
    }
    print(f"\n{'method':8} {'churn':>7} {'blocks/layer':>13} {'8B recall MB/step':>18} {'ms at 55 GB/s':>14}")
    for r in rows:
        print(f"{r['method']:8} {r['churn']:7.3f} {r['retrieved_blocks_per_layer_step']:13.1f} "
              f"{r['recall_mb_per_step_llama3_8b']:18.1f} {r['recall_ms_at_55gbs']:14.2f}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
