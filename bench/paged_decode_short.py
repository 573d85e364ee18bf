"""Short-context decode attention (kernels/paged_decode.py SHORT_TILES): device time of 32 successive
paged-decode launches (a Llama-3-8B decode step's attention: 32 query heads, 8 KV heads, head dim 128,
bf16, blocks of 16) from a CUDA graph, per batch, context and table width (the graph's max_model_len),
for each SHORT_TILES (contexts of at most that many 64-token tiles attended by one program per sequence
and KV head, no merge work) and with the step's tables read before the PDL wait (static) or after.
Prints a table (us per launch) and the SHORT_TILES with the least summed time; writes JSON.

    python bench/paged_decode_short.py --out bench/results/paged_decode_short.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import graph_time_us  # noqa: E402

HQ, HK, DIM, BS, LAYERS = 32, 8, 128, 16, 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/paged_decode_short.json")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--contexts", default="64,128,256,512,1024")
    ap.add_argument("--widths", default="2048,131072", help="table widths in tokens (max_model_len)")
    ap.add_argument("--short", default="0,2,4,8,16", help="SHORT_TILES values")
    args = ap.parse_args()
    from actserve.kernels import paged_decode as pd

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    widths = [int(x) for x in args.widths.split(",")]
    shorts = [int(x) for x in args.short.split(",")]
    nblocks = max(batches) * max(contexts) // BS + 8
    k = torch.randn(nblocks * BS, HK, DIM, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rows = []
    for width in widths:
        for b in batches:
            q = torch.randn(b, HQ, DIM, device=dev, generator=g, dtype=torch.bfloat16)
            for ctx in contexts:
                tables = torch.zeros(b, width // BS, dtype=torch.int32, device=dev)
                per = ctx // BS
                tables[:, :per] = torch.randperm(nblocks, device=dev, generator=g)[: b * per].view(b, per)
                lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
                for short in shorts:
                    for static in (False, True):
                        pd.SHORT_TILES = short

                        def step(q=q, tables=tables, lens=lens, static=static) -> None:
                            for _ in range(LAYERS):
                                pd.paged_decode(q, k, v, tables, lens, 0.088, BS, static_inputs=static)

                        us = graph_time_us(step, reps=5, rounds=5) / LAYERS
                        rows.append(dict(width=width, batch=b, ctx=ctx, short=short, static=static, us=us))
    print(
        f"{'width':>7} {'b':>2} {'ctx':>5} "
        + " ".join(f"{f's{s}' + ('e' if st else ''):>7}" for s in shorts for st in (False, True))
    )
    for width in widths:
        for b in batches:
            for ctx in contexts:
                cells = [r["us"] for r in rows if (r["width"], r["batch"], r["ctx"]) == (width, b, ctx)]
                print(f"{width:>7} {b:>2} {ctx:>5} " + " ".join(f"{c:7.2f}" for c in cells))
    totals = {
        f"{s}{'_static' if st else ''}": sum(r["us"] for r in rows if r["short"] == s and r["static"] == st)
        for s in shorts
        for st in (False, True)
    }
    best = min(totals, key=totals.__getitem__)
    print("summed us per launch over the grid:", {k: round(v, 1) for k, v in totals.items()}, "best:", best)
    res = {
        "bench": "paged_decode_short",
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "shape": "Llama-3-8B attention (32 q heads, 8 kv heads, head dim 128, bf16, blocks of 16)",
        "rows": rows,
        "summed_us": totals,
        "best": best,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
