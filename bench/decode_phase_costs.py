"""What a batch-1 decode step pays per dependent launch, and what an L2 prefetch buys a GEMV that follows
a latency-bound stretch (issue 15: Qwen3-30B-A3B all resident sits at 0.6 of its roofline with 12
launches per layer, 4 of them weight-streaming GEMVs). Everything runs inside CUDA graphs, as served.

- `chain`: N dependent one-row add+RMSNorm launches (hidden 2048): us per launch, with and without PDL.
- `gemv`: a one-row GEMV at Qwen3-30B-A3B's qkv / o_proj shapes over enough weight copies that each
  launch reads HBM (cold), after a spin kernel of `--gap-us` (HBM idle, as during rope and attention),
  with a standalone L2 prefetch before that gap, and with the GEMV before the gap prefetching it
  (`gemv(prefetch=...)`, the served pattern); each gap case minus the gap alone.

    python bench/decode_phase_costs.py --out bench/results/decode_phase_costs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def graph_us(fn: Callable[[], None], per: int, reps: int = 30) -> float:
    """Median us per `per` units of one replay of a CUDA graph of fn."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(1e3 * a.elapsed_time(b) / per)
    return statistics.median(times)


def chain(n: int) -> dict[str, float]:
    from actserve.kernels.pdl import pdl_suspended
    from actserve.kernels.steer_rmsnorm import add_steer_rmsnorm

    h = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(2048, device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        x = h
        for _ in range(n):
            x, _ = add_steer_rmsnorm(None, x, w, 1e-6)

    out = {"pdl_us_per_launch": graph_us(run, n)}
    with pdl_suspended():
        out["no_pdl_us_per_launch"] = graph_us(run, n)
    return out


def gemv_case(n: int, k: int, gap_cycles: int, budget_bytes: int) -> dict[str, float]:
    from actserve.kernels.gemv import gemv
    from actserve.kernels.l2_prefetch import l2_prefetch

    copies = max(4, budget_bytes // (2 * n * k))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    before = [torch.randn(5120, 2048, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    xb = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)

    def sleep() -> None:
        torch.cuda._sleep(gap_cycles)

    res = {"copies": copies, "mb": 2 * n * k / 1e6}
    res["cold_back_to_back_us"] = graph_us(lambda: [gemv(x, w) for w in ws] and None, copies)
    res["hot_us"] = graph_us(lambda: [gemv(x, ws[0]) for _ in ws] and None, copies)
    gap = graph_us(lambda: [sleep() for _ in ws] and None, copies)
    res["gap_us"] = gap
    res["after_gap_us"] = graph_us(lambda: [(sleep(), gemv(x, w)) for w in ws] and None, copies) - gap
    pf = graph_us(lambda: [(l2_prefetch(w), sleep()) for w in ws] and None, copies)
    res["prefetched_after_gap_us"] = (
        graph_us(lambda: [(l2_prefetch(w), sleep(), gemv(x, w)) for w in ws] and None, copies) - pf
    )
    plain = graph_us(lambda: [(gemv(xb, b), sleep()) for b in before] and None, copies)
    res["gemv_before_us"] = plain - gap
    res["after_gemv_gap_us"] = (
        graph_us(
            lambda: [(gemv(xb, b), sleep(), gemv(x, w)) for b, w in zip(before, ws, strict=True)] and None,
            copies,
        )
        - plain
    )
    with_pf = graph_us(
        lambda: [(gemv(xb, b, prefetch=w), sleep()) for b, w in zip(before, ws, strict=True)] and None, copies
    )
    res["gemv_before_prefetching_us"] = with_pf - gap
    res["prefetched_by_gemv_after_gap_us"] = (
        graph_us(
            lambda: (
                [(gemv(xb, b, prefetch=w), sleep(), gemv(x, w)) for b, w in zip(before, ws, strict=True)]
                and None
            ),
            copies,
        )
        - with_pf
    )
    ref = gemv(x, ws[0])
    changed = (gemv(xb, before[0], prefetch=ws[0]) != gemv(xb, before[0])).any() or (
        gemv(x, ws[0]) != ref
    ).any()
    res["prefetch_changes_result"] = bool(changed)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=200)
    ap.add_argument("--gap-us", type=float, default=8.0)
    ap.add_argument("--out", default="/tmp/decode_phase_costs.json")
    args = ap.parse_args()
    clock_ghz = (
        torch.cuda.get_device_properties(0).clock_rate / 1e6
        if hasattr(torch.cuda.get_device_properties(0), "clock_rate")
        else 1.98
    )
    cycles = int(args.gap_us * clock_ghz * 1e3)
    res = {"device": torch.cuda.get_device_name(0), "gap_cycles": cycles, "chain": chain(args.chain)}
    print(f"chain of add+RMSNorm: {res['chain']['pdl_us_per_launch']:.2f} us/launch with PDL, "
          f"{res['chain']['no_pdl_us_per_launch']:.2f} without")  # fmt: skip
    for name, (n, k) in {"qkv": (5120, 2048), "o_proj": (2048, 4096)}.items():
        r = gemv_case(n, k, cycles, 400 << 20)
        res[name] = r
        print(f"{name} {r['mb']:.1f} MB: cold {r['cold_back_to_back_us']:.2f} us, hot {r['hot_us']:.2f}, "
              f"after a {r['gap_us']:.1f} us gap {r['after_gap_us']:.2f}, "
              f"prefetched {r['prefetched_after_gap_us']:.2f}; "
              f"after a GEMV + gap {r['after_gemv_gap_us']:.2f}, that GEMV prefetching it "
              f"{r['prefetched_by_gemv_after_gap_us']:.2f} (it: {r['gemv_before_us']:.2f} -> "
              f"{r['gemv_before_prefetching_us']:.2f}); changed: {r['prefetch_changes_result']}")  # fmt: skip
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
