"""Per-layer W4A16 GEMV on the Llama-3-8B projection shapes (issue 13, `fp4_gemv_speedup_b1`): the FP4
kernels of kernels/fp4_gemm.py (NVFP4 and MXFP4, a small launch-config sweep) against torch's bf16
`F.linear` (cuBLAS), our bf16 decode GEMV, and torch's int4 tinygemm (group 128: gpt-fast's best int4
path), each timed from a CUDA graph of repeated calls (no launch gaps), at M = 1 and 8 rows. Each FP4
result is checked against the dequantize-then-matmul reference first. Prints a table last; writes JSON.

    python bench/fp4_gemv.py --out bench/results/fp4_gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import graph_time_us  # noqa: E402
from shapes import LLAMA3_8B  # noqa: E402

from actserve.kernels.fp4_gemm import Fp4Config, fp4_gemv  # noqa: E402
from actserve.kernels.fp4_ref import fp4_matmul_ref, quantize_rtn  # noqa: E402
from actserve.kernels.gemv import gemv  # noqa: E402


def layer_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(N, K) of one decoder layer's packed projections."""
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    hd = h // int(cfg["num_attention_heads"])
    kv = int(cfg["num_key_value_heads"]) * hd
    return {
        "qkv_proj": (h + 2 * kv, h),
        "o_proj": (h, h),
        "gate_up_proj": (2 * inter, h),
        "down_proj": (h, inter),
    }


def int4_tinygemm(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torch's int4 weight-only matmul (group 128), or None where this torch's private API differs."""
    try:
        n, k = w.shape
        g = w.float().view(n, k // 128, 128)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
        zero = lo + 8 * scale  # tinygemm dequantizes (q - 8) * scale + zero
        sz = torch.cat([scale, zero], -1).view(n, k // 128, 2).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        return lambda x: torch._weight_int4pack_mm(x, packed, 128, sz)
    except (RuntimeError, TypeError, AttributeError) as e:
        print(f"int4 tinygemm unavailable: {str(e)[:120]}", flush=True)
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/fp4_gemv.json")
    ap.add_argument("--rows", default="1,8")
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    configs = [
        Fp4Config(block_n=bn, block_k=bk, num_warps=nw, num_stages=st)
        for bn, bk, nw, st in itertools.product((16, 32, 64), (256, 512), (4, 8), (2, 3))
    ]
    res: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv),
        "device": torch.cuda.get_device_name(),
    }
    rows_out: list[dict[str, Any]] = []
    for name, (n, k) in layer_shapes(LLAMA3_8B).items():
        w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) / k**0.5
        int4 = int4_tinygemm(w)
        fp4 = {kind: quantize_rtn(w.float(), kind) for kind in ("nvfp4", "mxfp4")}
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
            row: dict[str, Any] = {"proj": name, "n": n, "k": k, "m": m}
            row["torch_bf16_us"] = graph_time_us(lambda x=x, w=w: F.linear(x, w))
            row["gemv_bf16_us"] = graph_time_us(lambda x=x, w=w: gemv(x, w))
            row["int4_tinygemm_us"] = graph_time_us(lambda x=x, f=int4: f(x)) if int4 is not None else None
            for kind, q in fp4.items():
                want = fp4_matmul_ref(x.float(), q).float()
                best, best_cfg = float("inf"), None
                for cfg in configs:
                    try:
                        got = fp4_gemv(x, q, cfg=cfg).float()
                    except Exception as e:  # out of resources for this tile: not a candidate
                        print(f"{name} m={m} {kind} {cfg}: {type(e).__name__}", flush=True)
                        continue
                    err = ((got - want).norm() / want.norm()).item()
                    assert err < 1e-2, (name, m, kind, cfg, err)
                    t = graph_time_us(lambda x=x, q=q, cfg=cfg: fp4_gemv(x, q, cfg=cfg))
                    if t < best:
                        best, best_cfg = t, cfg
                row[f"{kind}_us"] = best
                row[f"{kind}_config"] = best_cfg.__dict__ if best_cfg is not None else None
                row[f"{kind}_default_us"] = graph_time_us(lambda x=x, q=q: fp4_gemv(x, q))
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    res["rows"] = rows_out
    for m in sorted({r["m"] for r in rows_out}):
        sel = [r for r in rows_out if r["m"] == m]
        bf16 = sum(r["torch_bf16_us"] for r in sel)
        for kind in ("nvfp4", "mxfp4"):
            res[f"{kind}_layer_speedup_m{m}"] = bf16 / sum(r[f"{kind}_us"] for r in sel)
        if all(r["int4_tinygemm_us"] for r in sel):
            res[f"int4_layer_speedup_m{m}"] = bf16 / sum(r["int4_tinygemm_us"] for r in sel)
    res["fp4_gemv_speedup_b1"] = res.get("nvfp4_layer_speedup_m1")
    head = ("proj", "m", "bf16 us", "gemv us", "int4 us", "nvfp4 us", "mxfp4 us", "nvfp4 x")
    print("\n" + "".join(f"{h:>13}" for h in head))
    for r in rows_out:
        int4_us = r["int4_tinygemm_us"] or float("nan")
        cells = (r["torch_bf16_us"], r["gemv_bf16_us"], int4_us, r["nvfp4_us"], r["mxfp4_us"])
        print(
            f"{r['proj']:>13}{r['m']:>13}" + "".join(f"{c:>13.1f}" for c in cells),
            f"{r['torch_bf16_us'] / r['nvfp4_us']:>12.2f}",
        )
    print({k: round(v, 3) for k, v in res.items() if k.endswith(("_m1", "_m8", "_b1")) and v is not None})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
