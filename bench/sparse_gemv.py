"""Per-layer sparse GEMV on the Llama-3-8B projection shapes (issue 14, `sparse_gemv_speedup_s50_b1`):
kernels/sparse_gemv.py (each way of summing its K splits) against torch's bf16 `F.linear` (cuBLAS), our
dense decode GEMV (kernels/gemv.py, weight [N, K]), the same GEMV after the plugin's masking pass (what a
sparse row cost before the kernel), and the sparse kernel without a threshold on the transposed weight
[K, N] (the dense-weight-layout question). Rows 1, 2, 4, 8, 16; sparsity 0, 0.25, 0.4, 0.5, 0.75.

Activations are random normal, each row's threshold its level's quantile of |x|, so every row is sparse
at exactly the level and rows are independent: the union of 2-16 rows' active inputs is as large as it
can be (1 - s^rows of the inputs), the worst case for batching. Each call is timed from a CUDA graph of
repeated calls cycling through copies of the weights (none is read from L2; bench/fp4_gemv.py), after a
correctness check of every variant against kernels/sparse_gemv_ref.py on these shapes (the run aborts on
a mismatch). The down projection is also timed on its engine input, the fused [gate | up] row
(silu_mul=True; `down_silu` rows). `--sweep` times launch configs of the sparse kernel first; `--quick`
runs rows 1 and 8 at 0 / 0.5. Prints tables last; writes JSON (`--out`) whose figures include
`sparse_gemv_speedup_s{25,40,50,75}_b{1,8,16}`: one layer's four projections, torch bf16 time over the
sparse kernel's (default config), and `sparse_pays_up_to_b_s{..}`: the most rows at which it still wins.

TEAL's own kernel (`--teal-src FILE`: its kernels/sparse_gemv.py, which is not part of this repository)
runs in the same process on fp16 copies of the same weights and inputs, one row, as TEAL serves it
(W^T storage, a scalar threshold, fp16 atomics; its autotuning runs before the timed graphs): keys
`teal_gemv_speedup_s{..}_b1`, torch bf16 time over TEAL's, summed over the same four projections.

    python bench/sparse_gemv.py --out bench/results/sparse_gemv.json [--teal-src TEAL_SPARSE_GEMV_PY]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import graph_time_us  # noqa: E402
from fp4_gemv import layer_shapes, n_copies  # noqa: E402
from shapes import LLAMA3_8B  # noqa: E402

from actserve.kernels.gemv import gemv  # noqa: E402
from actserve.kernels.silu_mul import silu_mul  # noqa: E402
from actserve.kernels.sparse_gemv import ACCUMS, SparseGemvConfig, pick_config, sparse_gemv  # noqa: E402
from actserve.kernels.sparse_gemv_ref import silu_mul_ref_rounded, sparse_gemv_ref  # noqa: E402

ROWS = (1, 2, 4, 8, 16)
Kernel = Callable[..., torch.Tensor]
LEVELS = (0.0, 0.25, 0.4, 0.5, 0.75)


def thresholds(x: torch.Tensor, level: float) -> torch.Tensor:
    """[rows] float32: each row's `level` quantile of |x| (0 at level 0: the row stays dense)."""
    if level == 0:
        return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    return torch.quantile(x.float().abs(), level, dim=1).contiguous()


def rotating(fn: Callable[[Any], torch.Tensor], copies: list[Any]) -> float:
    """graph_time_us of fn(w), each captured call on the next of the weight copies."""
    it = itertools.cycle(copies)
    return graph_time_us(lambda: fn(next(it)), reps=max(20, len(copies)))


def check(
    x: torch.Tensor, wt: torch.Tensor, thr: torch.Tensor, silu: bool, cfg: SparseGemvConfig, what: str
) -> None:
    """Abort the run unless sparse_gemv equals its reference here (relative Frobenius error < 1e-2)."""
    want = sparse_gemv_ref(x, wt, thr, silu_mul=silu).float()
    got = sparse_gemv(x, wt, thr, silu_mul=silu, cfg=cfg).float()
    err = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
    if not err < 1e-2:
        sys.exit(f"WRONG {what} {cfg}: relative error {err:.3g}; aborting")


def sweep_configs(m: int) -> list[SparseGemvConfig]:
    if m == 1:
        grid = itertools.product((64, 128, 256), (16, 32, 64), (4, 8), (1, 3), (528, 1056, 2112, 4224))
        return [
            SparseGemvConfig(block_n=bn, block_k=bk, num_warps=nw, loop_stages=ls, programs=p)
            for bn, bk, nw, ls, p in grid
        ]
    grid = itertools.product((32, 64, 128), (32, 64), (4, 8), (3, 4), (528, 1056, 2112))
    return [
        SparseGemvConfig(block_n=bn, block_k=bk, num_warps=nw, num_stages=st, programs=p)
        for bn, bk, nw, st, p in grid
    ]


def sweep(
    name: str, x: torch.Tensor, wts: list[torch.Tensor], thr: torch.Tensor, silu: bool
) -> list[dict[str, Any]]:
    """Every config of `sweep_configs` (serial sums) on one shape: checked, then timed."""
    out = []
    for cfg in sweep_configs(x.shape[0]):
        try:
            check(x, wts[0], thr, silu, cfg, name)
        except Exception as e:  # out of resources for this tile: not a candidate
            print(f"{name} {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
            continue
        t = rotating(lambda w, c=cfg: sparse_gemv(x, w, thr, silu_mul=silu, cfg=c), wts)
        out.append({"config": cfg.__dict__, "us": t})
    out.sort(key=lambda r: r["us"])
    for r in out[:3]:
        print(f"sweep {name} m={x.shape[0]}: {r['us']:.1f} us {r['config']}", flush=True)
    return out


def load_teal(path: str | None) -> Kernel | None:
    """TEAL's `splitk_sparse_gemv` from its source file, or None."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("teal_sparse_gemv", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.splitk_sparse_gemv


def teal_us(teal: Kernel, x: torch.Tensor, wts: list[torch.Tensor], level: float) -> tuple[float, float]:
    """TEAL's kernel on fp16 copies (x [1, K]; its weight argument is W [N, K] with K-major storage,
    i.e. W^T contiguous), and its relative error against the reference (fp32 sums); its autotuning runs
    on the first call."""
    x16 = x.half()[None]  # [1, 1, K]
    thr = float(thresholds(x16[0], level)[0])
    w16 = [w.half().t() for w in wts]
    want = sparse_gemv_ref(x16[0], w16[0].t(), torch.tensor([thr], device=x.device)).float()
    got = teal(x16, w16[0], thr, round(level * 100))[0].float()
    err = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
    if not err < 0.1:  # its K splits meet in fp16 atomic adds: a few percent off, by design
        sys.exit(f"WRONG TEAL kernel: relative error {err:.3g}; aborting")
    t = rotating(lambda w: teal(x16, w, thr, round(level * 100)), w16)
    del w16
    return t, err


def measure(
    name: str, n: int, k: int, x: torch.Tensor, ws: list[torch.Tensor], wts: list[torch.Tensor],
    levels: tuple, teal: Kernel | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One projection at x's rows: the dense baselines once, the sparse kernel (each way of summing its
    K splits) at each level."""
    m, silu = x.shape[0], name == "down_silu"
    act = silu_mul_ref_rounded(x) if silu else x
    base: dict[str, Any] = {"proj": name, "n": n, "k": k, "m": m}
    if silu:  # the engine's dense down projection: the fused silu·mul GEMV for one row
        base["torch_bf16_us"] = rotating(lambda w: F.linear(silu_mul_ref_rounded(x), w), ws)
        base["gemv_us"] = rotating(
            lambda w: gemv(x, w, silu_mul=True) if m == 1 else gemv(silu_mul(x), w), ws
        )
    else:
        base["torch_bf16_us"] = rotating(lambda w: F.linear(x, w), ws)
        base["gemv_us"] = rotating(lambda w: gemv(x, w), ws)
    base["dense_t_us"] = rotating(lambda w: sparse_gemv(x, w, silu_mul=silu), wts)
    half = thresholds(act, 0.5)
    base["mask_gemv_us"] = rotating(lambda w: gemv(act.masked_fill(act.abs() < half[:, None], 0), w), ws)
    rows = []
    for level in levels:
        thr = thresholds(act, level)
        row = dict(base, level=level, active=1 - level**m if level else 1.0)
        for accum in ACCUMS:
            cfg = replace(pick_config(m, n, k), accum=accum)
            row[f"sparse_{accum}_us"] = rotating(
                lambda w, c=cfg, t=thr: sparse_gemv(x, w, t, silu_mul=silu, cfg=c), wts
            )
        row["sparse_us"] = row[f"sparse_{pick_config(m, n, k).accum}_us"]
        if m == 1 and teal is not None and not silu:
            row["teal_fp16_us"], row["teal_rel_err"] = teal_us(teal, x, wts, level)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/sparse_gemv.json")
    ap.add_argument("--quick", action="store_true", help="rows 1 and 8, levels 0 and 0.5")
    ap.add_argument("--sweep", action="store_true", help="time launch configs first (rows 1, 8, 16)")
    ap.add_argument("--teal-src", help="TEAL's kernels/sparse_gemv.py, to time its kernel in the same run")
    args = ap.parse_args()
    teal = load_teal(args.teal_src)
    rows_set, levels = ((1, 8), (0.0, 0.5)) if args.quick else (ROWS, LEVELS)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    res: dict[str, Any] = {
        "command": "python " + shlex.join(sys.argv),
        "device": torch.cuda.get_device_name(),
    }
    table: list[dict[str, Any]] = []
    sweeps: dict[str, Any] = {}
    shapes = dict(layer_shapes(LLAMA3_8B))
    shapes["down_silu"] = shapes["down_proj"]
    for name, (n, k) in shapes.items():
        silu = name == "down_silu"
        w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) / k**0.5
        count = n_copies(2 * n * k)
        ws = [w] + [w.clone() for _ in range(count - 1)]
        wts = [c.t().contiguous() for c in ws]
        for m in rows_set:
            x = torch.randn(m, 2 * k if silu else k, device=dev, generator=g, dtype=torch.bfloat16)
            act = silu_mul_ref_rounded(x) if silu else x  # what the thresholds see
            for level in (0.5,):  # the correctness gate, every accumulation and the dense variant
                thr = thresholds(act, level)
                for accum in ACCUMS:
                    check(x, wts[0], thr, silu, replace(pick_config(m, n, k), accum=accum), f"{name} m={m}")
                check(x, wts[0], torch.zeros_like(thr), silu, pick_config(m, n, k), f"{name} m={m} dense")
            if args.sweep and m in (1, 8, 16) and not silu:
                sweeps[f"{name}_m{m}"] = sweep(name, x, wts, thresholds(act, 0.5), silu)
            table += measure(name, n, k, x, ws, wts, levels, teal)
        del ws, wts
        torch.cuda.empty_cache()
    res["rows"], res["sweep"] = table, sweeps
    for m in (1, 8, 16):  # one config per row count: the least time summed over the layer's projections
        runs = [v for key, v in sweeps.items() if key.endswith(f"_m{m}")]
        sums: dict[str, list[Any]] = {}
        for run in runs:
            for r in run:
                entry = sums.setdefault(json.dumps(r["config"], sort_keys=True), [0.0, 0])
                entry[0] += r["us"]
                entry[1] += 1
        full = {c: t for c, (t, count) in sums.items() if count == len(runs)}
        if full:
            best = min(full, key=lambda c: full[c])
            res[f"sweep_best_m{m}"] = {"config": json.loads(best), "layer_us": full[best]}
            print(f"sweep best for {m} rows: {full[best]:.1f} us per layer, {best}", flush=True)
    layer = [p for p in shapes if p != "down_silu"]

    def total(level: float, m: int, key: str) -> float | None:
        sel = [r for r in table if r["level"] == level and r["m"] == m and r["proj"] in layer]
        return sum(r[key] for r in sel) if len(sel) == len(layer) else None

    for level, m in itertools.product(levels, rows_set):
        torch_t, sparse_t = total(level, m, "torch_bf16_us"), total(level, m, "sparse_us")
        if torch_t is None or sparse_t is None:
            continue
        tag = f"s{round(level * 100)}_b{m}"
        res[f"sparse_gemv_speedup_{tag}"] = torch_t / sparse_t
        res[f"gemv_speedup_b{m}"] = torch_t / total(level, m, "gemv_us")  # type: ignore[operator]
        res[f"dense_t_speedup_b{m}"] = torch_t / total(level, m, "dense_t_us")  # type: ignore[operator]
        for accum in ACCUMS:
            res[f"sparse_{accum}_speedup_{tag}"] = torch_t / total(level, m, f"sparse_{accum}_us")  # type: ignore[operator]
        if all("teal_fp16_us" in r for r in table if r["m"] == m and r["proj"] in layer):
            res[f"teal_gemv_speedup_{tag}"] = torch_t / total(level, m, "teal_fp16_us")  # type: ignore[operator]
    for level in levels:
        if level:
            wins = [m for m in rows_set if res.get(f"sparse_gemv_speedup_s{round(level * 100)}_b{m}", 0) > 1]
            res[f"sparse_pays_up_to_b_s{round(level * 100)}"] = max(wins, default=0)
    head = ("proj", "m", "level", "torch", "gemv", "dense_t", "mask+gemv", *ACCUMS, "x torch")
    print("\n" + "".join(f"{h:>12}" for h in head))
    for r in table:
        cells = [r["torch_bf16_us"], r["gemv_us"], r["dense_t_us"], r["mask_gemv_us"]]
        cells += [r[f"sparse_{a}_us"] for a in ACCUMS]
        print(
            f"{r['proj']:>12}{r['m']:>12}{r['level']:>12}" + "".join(f"{c:>12.1f}" for c in cells),
            f"{r['torch_bf16_us'] / r['sparse_us']:>11.2f}",
        )
    print("\nlayer (qkv + o + gate_up + down), torch bf16 us / sparse us:")
    for level, m in itertools.product(levels, rows_set):
        key = f"sparse_gemv_speedup_s{round(level * 100)}_b{m}"
        if key in res:
            torch_t = total(level, m, "torch_bf16_us")
            print(f"  level {level:<5} rows {m:>2}: {res[key]:.2f}x (torch {torch_t:.1f} us)")
    print({k: round(v, 3) for k, v in res.items() if isinstance(v, float)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
