"""Where an all-resident MoE decode step's time goes on the GPU (issue 15: Qwen3-30B-A3B at batch 1 sits
below its roofline): the engine as `bench/moe_offload.py` builds it (random bf16 weights, fewer layers),
one captured decode step profiled per kernel name (`decode_profile.step_profile`), the same step's
replay time, and its bytes against the copy roofline.

    python bench/moe_step_profile.py --model qwen3 --layers 12 --out /tmp/moe_step.json [--trace DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import step_profile  # noqa: E402
from gpu_bench import copy_bandwidth, graph_replay_ms  # noqa: E402
from moe_offload import MIXTRAL, PROMPT, QWEN3, build, decode, token_bytes  # noqa: E402
from shapes import make_model_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("qwen3", "mixtral"), default="qwen3")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trace", help="folder for a chrome trace of the profiled step")
    ap.add_argument("--out", default="/tmp/moe_step.json")
    args = ap.parse_args()
    config = {**(QWEN3 if args.model == "qwen3" else MIXTRAL), "num_hidden_layers": args.layers}
    bw = copy_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        eng = build(make_model_dir(Path(tmp) / args.model, config), True)
        decode(eng, 4, seed=1)
        run = decode(eng, args.tokens, seed=2)
        tb = token_bytes(eng, PROMPT + args.tokens // 2)
        total = tb["dense"] + tb["experts"] + tb["kv"]
        step = step_profile(eng, 1, args.trace)
        rep = 1e3 * graph_replay_ms(eng, 1)
    res = {
        "model": args.model, "layers": args.layers, "copy_bw_tb_s": bw / 1e12, "tok_s": run["tok_s"],
        "bytes_per_token": total, **{f"{k}_bytes": v for k, v in tb.items()},
        "roofline_us": 1e6 * total / bw, "replay_us": rep, "step_ms_wall": 1e3 / run["tok_s"], "step": step,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{args.model} x{args.layers}: {run['tok_s']:.0f} tok/s ({1e3 / run['tok_s']:.0f} us/step wall), "
          f"graph replay {rep:.0f} us, roofline {res['roofline_us']:.0f} us "
          f"({res['roofline_us'] / rep:.2f} of replay); kernels {step['kernel_us_total']:.0f} us in "
          f"{step['kernels_per_step']:.0f}")  # fmt: skip
    for t in step["top"]:
        print(f"  {t['us']:>8.1f} us  x{t['count']:<4} {t['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
