"""One MoE layer's experts on the GPU (issue 15): the fused MoE kernel (kernels/moe.py: decode path, grouped
path, and the path the engine picks) against a plain torch loop over experts (transformers' experts
forward: per expert, gather its rows, two F.linear, index_add), at the expert shapes of Mixtral-8x7B
(8 experts of 4096 x 14336, top-2) and Qwen3-30B-A3B (128 experts of 2048 x 768, top-8), 1 / 8 / 64 /
2048 rows, bf16.

Weights and routers are RANDOM (bf16, normal): a random router routes near-uniformly, so the distinct
experts a step reads are the most a batch can need (the pessimistic case for batches > 1); real routers
are skewed and batches share more experts. Each kernel is first checked against the plain-torch reference
(kernels/moe_ref.py). The fused kernel is timed from a CUDA graph of repeated calls (no launch gaps),
cycling through copies of the layer (so no call finds its experts in L2 from the last); the torch loop
syncs with the host (it reads which experts were hit), so it is timed eagerly with CUDA events, as it
runs. "GB/s" is the bytes of the experts the call really reads (distinct experts hit x bytes per expert)
over the time; the H200's HBM3e peaks at 4.8 TB/s (a device copy measures about 4.3 TB/s). Prints a table
last; writes JSON.

    python bench/moe_kernel.py --out bench/results/moe_kernel.json [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import graph_time_us  # noqa: E402

from actserve.kernels import moe  # noqa: E402
from actserve.kernels.moe import DecodeConfig, GroupedConfig, fused_moe, pick_decode, pick_grouped  # noqa: E402
from actserve.kernels.moe_ref import expert_slots, fused_moe_ref, route_topk  # noqa: E402

SHAPES = {
    "mixtral": {"hidden": 4096, "inter": 14336, "experts": 8, "top_k": 2},
    "qwen3": {"hidden": 2048, "inter": 768, "experts": 128, "top_k": 8},
}
ROWS = (1, 8, 64, 2048)
L2_FLUSH = 512 << 20  # expert bytes a rotation reads at least: many times the H200's 60 MB L2
HBM_PEAK = 4.8e12


def torch_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor):
    """transformers' experts forward (MixtralExperts.forward), as it runs in eager mode."""
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    mask = F.one_hot(ids, num_classes=w13.shape[0]).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        pos, rows = torch.where(mask[e])
        gate_up = F.linear(x[rows], w13[e])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w2[e]) * wts[rows, pos, None]
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def event_time_us(fn: Callable[[], Any], reps: int = 10) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def layer(shape: dict[str, int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    w13 = torch.empty(e, 2 * i, h, device="cuda", dtype=torch.bfloat16).normal_(0, h**-0.5, generator=g)
    w2 = torch.empty(e, h, i, device="cuda", dtype=torch.bfloat16).normal_(0, i**-0.5, generator=g)
    return w13, w2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


DECODE_SWEEP = [
    DecodeConfig(bn, bk, nw, 3) for bn, bk, nw in itertools.product((8, 16, 32), (256, 512), (4, 8))
]
GROUPED_SWEEP = [
    GroupedConfig(bm, bn, bk, nw, st)
    for bm, bn, bk, nw, st in [
        (16, 64, 64, 4, 3), (16, 128, 64, 4, 4), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3),
        (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3),
    ]
]  # fmt: skip


# the decode path's gate/up and down launches, swept one at a time (`--decode-sweep`)
UP_SWEEP = [
    DecodeConfig(bn, bk, nw, st)
    for bn, bk, nw, st in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (2, 3, 4))
    if 2048 <= bn * bk <= 16384
]
DOWN_SWEEP = [
    DecodeConfig(bn, bk, nw, st, tp)
    for bn, bk, nw, st, tp in itertools.product((4, 8, 16, 32), (128, 256, 512), (4, 8), (3,), (1, 256, 1024))
]


def decode_sweep(name: str, shape: dict[str, int], layers: list[Any], m: int, g: torch.Generator) -> dict:
    """The decode path's gate/up config swept with the default down, then down with the best gate/up;
    each checked against the reference first. Returns the default's time, the best pair and the top 5."""
    case = Case(shape, layers, m, g)
    w13, w2 = layers[0]
    _, wts, slots = case.routed[0]
    want = fused_moe_ref(case.x, w13, w2, slots, wts)
    reps = max(20, len(layers))

    def timed(up: DecodeConfig, down: DecodeConfig) -> float:
        got = fused_moe(case.x, w13, w2, slots, wts, path="decode", decode_cfg=up, down_cfg=down)
        assert rel_err(got, want) < 1e-2, (name, m, up, down)
        return graph_time_us(case.fused("decode", decode_cfg=up, down_cfg=down), reps=reps)

    up0, down0 = pick_decode(shape["hidden"], shape["inter"], m)
    t0 = time.time()
    default = timed(up0, down0)
    ups = sorted(((timed(c, down0), c) for c in UP_SWEEP), key=lambda tc: tc[0])
    downs = sorted(((timed(ups[0][1], c), c) for c in DOWN_SWEEP), key=lambda tc: tc[0])
    read = min(m * shape["top_k"], shape["experts"]) * 3 * shape["hidden"] * shape["inter"] * 2
    best = downs[0][0]
    row = {
        "model": name, "rows": m, "default_us": default, "default": [str(up0), str(down0)], "best_us": best,
        "best_up": str(ups[0][1]), "best_down": str(downs[0][1]),
        "best_hbm_frac": read / (best * 1e-6) / HBM_PEAK,
        "up_top5": [(round(t, 2), str(c)) for t, c in ups[:5]],
        "down_top5": [(round(t, 2), str(c)) for t, c in downs[:5]], "sweep_s": time.time() - t0,
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


class Case:
    """m rows through `copies` copies of one layer, each with its own random routing; calls cycle."""

    def __init__(self, shape: dict[str, int], layers: list[tuple[torch.Tensor, torch.Tensor]], m: int,
                 g: torch.Generator) -> None:  # fmt: skip
        self.k, self.layers = shape["top_k"], layers
        self.x = torch.randn(m, shape["hidden"], device="cuda", dtype=torch.bfloat16, generator=g)
        self.routed = []
        for _ in layers:
            logits = torch.randn(m, shape["experts"], device="cuda", generator=g)
            ids, wts = route_topk(logits, self.k, renormalize=True)
            self.routed.append((ids, wts, expert_slots(ids, None)))
        self.cycle = itertools.cycle(range(len(layers)))

    def fused(self, path: str = "auto", **kw: Any) -> Callable[[], Any]:
        def call() -> Any:
            c = next(self.cycle)
            _, wts, slots = self.routed[c]
            return fused_moe(self.x, *self.layers[c], slots, wts, path=path, active_k=self.k, **kw)

        return call

    def loop(self) -> Any:
        c = next(self.cycle)
        ids, wts, _ = self.routed[c]
        return torch_loop(self.x, *self.layers[c], ids, wts)


def bench_rows(name: str, shape: dict[str, int], layers: list[Any], m: int, g: torch.Generator, sweep: bool):
    case = Case(shape, layers, m, g)
    k = shape["top_k"]
    distinct = sum(int(torch.unique(r[0]).numel()) for r in case.routed) / len(layers)
    row: dict[str, Any] = {
        "model": name,
        "rows": m,
        "distinct_experts": distinct,
        "layer_copies": len(layers),
    }
    w13, w2 = layers[0]
    ids, wts, slots = case.routed[0]
    x = case.x
    paths = ("decode", "grouped") if m <= 64 else ("grouped",)
    e = shape["experts"]
    # the kernel first, on memory filled with NaN (an entry it fails to write shows), then the reference
    got = {}
    for path in paths:
        poison = torch.full((m * k, shape["hidden"]), float("nan"), device="cuda")
        del poison
        got[path] = fused_moe(x, w13, w2, slots, wts, path=path)
    want = fused_moe_ref(x, w13, w2, slots, wts)
    for path in paths:
        err = rel_err(got[path], want)
        row[f"{path}_rel_err"] = err
        assert err < 1e-2, (name, m, path, err)
    row["torch_loop_rel_err"] = rel_err(torch_loop(x, w13, w2, ids, wts), want)
    reps = max(20, len(layers))
    row["auto_path"] = "decode" if moe.takes_decode(m, k, e) else "grouped"
    row["fused_us"] = graph_time_us(case.fused(), reps=reps)
    row["fused_eager_us"] = event_time_us(case.fused())
    for path in paths:
        row[f"{path}_us"] = graph_time_us(case.fused(path), reps=reps)
    row["torch_loop_us"] = event_time_us(case.loop)
    read = distinct * 3 * shape["hidden"] * shape["inter"] * 2
    row["expert_bytes_read"] = read
    row["fused_gbps"] = read / row["fused_us"] / 1e3
    row["fused_hbm_frac"] = read / (row["fused_us"] * 1e-6) / HBM_PEAK
    row["speedup_vs_torch_loop"] = row["torch_loop_us"] / row["fused_us"]
    if sweep:
        t0 = time.time()
        if m <= 8:
            timed = [
                (graph_time_us(case.fused("decode", decode_cfg=c), reps=reps), str(c)) for c in DECODE_SWEEP
            ]
            row["decode_sweep_best"] = min(timed)
        found = []
        for c in GROUPED_SWEEP:
            try:
                got = fused_moe(x, w13, w2, slots, wts, path="grouped", grouped_cfg=c)
            except Exception as ex:  # out of shared memory for this tile
                print(f"{c}: {type(ex).__name__}", flush=True)
                continue
            if rel_err(got, want) < 1e-2:
                found.append((graph_time_us(case.fused("grouped", grouped_cfg=c), reps=reps), c))
        row["grouped_sweep_best"] = str(min(found, key=lambda t: t[0])) if found else None
        row["grouped_default_config"] = str(pick_grouped(m * k, e))
        row["sweep_s"] = time.time() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/moe_kernel.json")
    ap.add_argument("--sweep", action="store_true", help="also time a few launch configs per path")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument(
        "--decode-sweep",
        default=None,
        help="row counts (comma-separated): sweep the decode launches",
    )
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    res: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "note": "random bf16 weights and random routers (near-uniform routing: the most distinct experts "
        "per batch, the pessimistic case)",
        "decode_max_rows": moe.DECODE_MAX_ROWS,
        "decode_limit_rows": moe.DECODE_LIMIT_ROWS,
    }
    rows_out: list[dict[str, Any]] = []
    for name in args.models.split(","):
        shape = SHAPES[name]
        e, h, i, k = shape["experts"], shape["hidden"], shape["inter"], shape["top_k"]
        expert_bytes = 3 * h * i * 2
        copies = max(1, -(-L2_FLUSH // (k * expert_bytes)))  # the b1 call's bytes x copies >= L2_FLUSH
        copies = min(copies, max(1, int(8e9 // (e * expert_bytes))))  # at most ~8 GB of layers
        layers = [layer(shape, g) for _ in range(copies)]
        if args.decode_sweep:
            for m in map(int, args.decode_sweep.split(",")):
                res.setdefault("decode_sweep", []).append(decode_sweep(name, shape, layers, m, g))
            continue
        for m in ROWS:
            row = bench_rows(name, shape, layers, m, g, args.sweep)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        del layers
        torch.cuda.empty_cache()
    res["rows"] = rows_out
    if args.decode_sweep:
        Path(args.out).write_text(json.dumps(res, indent=1))
        for r in res["decode_sweep"]:
            print(f"{r['model']} m{r['rows']}: default {r['default_us']:.1f} us, best {r['best_us']:.1f} us "
                  f"({r['best_hbm_frac']:.2f} of peak) up {r['best_up']} down {r['best_down']}")  # fmt: skip
        return
    for r in rows_out:
        res[f"moe_fused_vs_torch_{r['model']}_m{r['rows']}"] = r["speedup_vs_torch_loop"]
        res[f"moe_fused_hbm_frac_{r['model']}_m{r['rows']}"] = r["fused_hbm_frac"]
    head = ("model", "rows", "experts", "fused us", "decode us", "grouped us", "torch us", "x torch", "GB/s")
    print("\n" + "".join(f"{c:>11}" for c in head))
    for r in rows_out:
        cells = [r["fused_us"], r.get("decode_us"), r.get("grouped_us"), r["torch_loop_us"]]
        print(
            f"{r['model']:>11}{r['rows']:>11}{r['distinct_experts']:>11.1f}"
            + "".join(f"{c if c is not None else float('nan'):>11.1f}" for c in cells)
            + f"{r['speedup_vs_torch_loop']:>11.2f}{r['fused_gbps']:>11.0f}"
        )
    print(res["note"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
