"""The paged-prefill attention kernel on the Llama-3-8B attention shape (32 query heads, 8 KV heads, head
dim 128, bf16, 16-token KV blocks in a shuffled block table), one chunk of `nq` new rows after cached
context, against torch's SDPA (flash) on the same problem with the context already contiguous (the
gather it needs is timed apart): time and attention TFLOP/s per launch config, output checked against
SDPA. Picks the config with the least total time over the cases.

    python bench/paged_prefill_kernel.py --out bench/results/paged_prefill_kernel.json
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from actserve.kernels.paged_prefill import LaunchConfig, paged_prefill, prefill_meta, tile_positions

HQ, HK, DIM, BS = 32, 8, 128, 16
# (context tokens, new query rows): the last chunk of a 32k prompt at budgets 2048 and 512, a chunk early
# in a prompt, and a short suffix after a cached 3.9k prefix
CASES = [(32768, 2048), (32768, 512), (4096, 2048), (4096, 196)]
OLD_KERNEL = Path(".carry/old_paged_prefill.py")  # the previous kernel, when carried (baseline)


def attention_flops(ctx: int, nq: int) -> float:
    """Multiply-adds x 2 of QK^T and PV over the allowed (causal) pairs only."""
    pairs = nq * (ctx - nq) + nq * (nq + 1) / 2
    return 4.0 * DIM * HQ * pairs


def make_case(ctx: int, nq: int, seed: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = ctx // BS + 8
    kv = torch.randn(2, blocks * BS, HK, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    table = torch.randperm(blocks, device="cuda", generator=g)[: ctx // BS].int().unsqueeze(0)
    q = torch.randn(nq, HQ, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    pos = torch.arange(ctx, device="cuda")
    slots = table[0, pos // BS].long() * BS + pos % BS
    return {"q": q, "k": kv[0], "v": kv[1], "table": table, "slots": slots}


def sdpa(c: dict[str, Any], ctx: int, nq: int, gather: bool) -> torch.Tensor:
    k, v = (c["k"][c["slots"]], c["v"][c["slots"]]) if gather else (c["kc"], c["vc"])
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (c["q"], k, v))
    ks, vs = (t.repeat_interleave(HQ // HK, dim=1) for t in (ks, vs)) if c.get("repeat") else (ks, vs)
    o = F.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=causal_lower_right(nq, ctx), scale=DIM**-0.5, enable_gqa=not c.get("repeat")
    )
    return o.squeeze(0).transpose(0, 1)


def time_sdpa(c: dict[str, Any], ctx: int, nq: int) -> dict[str, Any]:
    c["kc"], c["vc"] = c["k"][c["slots"]], c["v"][c["slots"]]
    try:
        ref = sdpa(c, ctx, nq, gather=False)
    except RuntimeError as e:  # no GQA in this backend: repeat K/V heads
        print(f"sdpa enable_gqa failed ({str(e)[:80]}); repeating heads", flush=True)
        c["repeat"] = True
        ref = sdpa(c, ctx, nq, gather=False)
    return {
        "ref": ref,
        "sdpa_ms": do_bench(lambda: sdpa(c, ctx, nq, gather=False)),
        "sdpa_gather_ms": do_bench(lambda: sdpa(c, ctx, nq, gather=True)),
    }


def run_kernel(
    fn: Any, c: dict[str, Any], ctx: int, nq: int, launch: LaunchConfig | None
) -> tuple[float, float]:
    """(ms, relative error against SDPA) of one kernel and launch config."""
    if launch is None:  # the old module: its own fixed tiling
        meta = fn.prefill_meta([ctx], [nq], c["q"].device, fn.tile_positions(HQ // HK))
        call = lambda: fn.paged_prefill(c["q"], c["k"], c["v"], c["table"], meta, DIM**-0.5, BS)  # noqa: E731
    else:
        meta = prefill_meta([ctx], [nq], c["q"].device, tile_positions(HQ // HK, launch.rows))
        call = lambda: paged_prefill(  # noqa: E731
            c["q"], c["k"], c["v"], c["table"], meta, DIM**-0.5, BS, launch=launch
        )
    out = call()
    err = ((out.float() - c["ref"].float()).norm() / c["ref"].float().norm()).item()
    return do_bench(call), err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/paged_prefill_kernel.json")
    args = ap.parse_args()
    configs = [
        LaunchConfig(rows, bn, w, st)
        for rows, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
        if not (rows == 128 and bn == 128 and w == 4)
    ]
    old = None
    if OLD_KERNEL.exists():
        spec = importlib.util.spec_from_file_location("old_paged_prefill", OLD_KERNEL)
        assert spec and spec.loader
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old  # its dataclass looks itself up there
        spec.loader.exec_module(old)
    res: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv),
        "device": torch.cuda.get_device_name(),
    }
    cases = []
    totals: dict[str, float] = {}
    for i, (ctx, nq) in enumerate(CASES):
        c = make_case(ctx, nq, i)
        base = time_sdpa(c, ctx, nq)
        tf = attention_flops(ctx, nq) / 1e9
        row: dict[str, Any] = {
            "ctx": ctx,
            "nq": nq,
            "sdpa_ms": base["sdpa_ms"],
            "sdpa_gather_ms": base["sdpa_gather_ms"],
        }
        row["sdpa_tflops"] = tf / base["sdpa_ms"]
        c["ref"] = base["ref"]
        if old is not None:
            row["old_ms"], row["old_err"] = run_kernel(old, c, ctx, nq, None)
        for cfg in configs:
            name = f"r{cfg.rows}_n{cfg.block_n}_w{cfg.num_warps}_s{cfg.num_stages}"
            try:
                ms, err = run_kernel(None, c, ctx, nq, cfg)
            except Exception as e:  # out of shared memory etc.: the config is not a candidate
                print(f"{name}: {type(e).__name__} {str(e)[:100]}", flush=True)
                totals[name] = float("inf")
                continue
            assert err < 2e-2, (name, ctx, nq, err)
            row[name] = ms
            totals[name] = totals.get(name, 0.0) + ms
        cases.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("r")}), flush=True)
        del c
        torch.cuda.empty_cache()
    best = min(totals, key=totals.get)  # type: ignore[arg-type]
    res["cases"], res["totals_ms"], res["best"] = cases, totals, best
    head = ("ctx", "nq", "sdpa ms", "+gather", "old ms", "best ms", "best TF/s", "sdpa TF/s")
    print("\n" + "".join(f"{h:>10}" for h in head))
    for r in cases:
        tf = attention_flops(r["ctx"], r["nq"]) / 1e9
        cells = (r["sdpa_ms"], r["sdpa_gather_ms"], r.get("old_ms", float("nan")), r[best])
        print(f"{r['ctx']:>10}{r['nq']:>10}" + "".join(f"{x:>10.3f}" for x in cells), end="")
        print(f"{tf / r[best]:>10.0f}{r['sdpa_tflops']:>10.0f}")
    print(f"best config: {best}; top 5: {sorted(totals.items(), key=lambda kv: kv[1])[:5]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
