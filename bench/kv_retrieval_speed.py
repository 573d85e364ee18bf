"""Decode speed of KV retrieval at long contexts (issue 16): Llama-3-8B's shape with random bf16 weights,
full attention in the same run, 32k / 64k / 128k contexts, batch 1 and 4, a 2048-token ActQKV budget,
the host tier (CPU) off and on, and the GPU KV memory a retrieving sequence holds; random and stable
K/V (below) in one engine, full attention measured once.

No prompt is prefilled (a 128k prefill per row would take the whole time budget and decides nothing
here): each row's blocks are allocated and the whole KV cache and the plugin's block summaries are
filled with random values, then the rows decode one token per step through the engine's decode path
(`ModelRunner._decode`: CUDA graphs, the plugin's hooks and, with the tier, the recall of each layer's
chosen host blocks within the step). A step is timed on the host from launch to the logits being ready
(torch.cuda.synchronize), median of --steps after --warmup; then --steps more are launched back to back
with one sync at the end (`pipelined_ms`: each step's host work overlaps the previous step's device work,
as in the served engine with `overlap_steps`; keys `kvr_pipelined_speedup_*`). "tier" rows first run two
decode steps, then move their cold blocks to the host (what the engine does after a step) and warm up
again; their `churn` is the share of the blocks read per step that came from the host (recalled /
retrieved).

Random K/V makes steps choose many new blocks (the tier's worst case). Stable K/V (`--kv stable`,
`--stable-kv`) keeps the block summaries' and keys' energy in the slowly rotating rotary dimensions (a
rotation of under 1e-3 rad per position), scaling the others by --drift: scores then drift from step
to step as the query moves, as on real text, where bench/results/kv_retrieval_churn.json measured 4-9 %
of the blocks read per step recalled; the JSON reports the churn each gives. Keys: `kvr_speedup_*`,
`kvr_tier_speedup_*`, `kvr_tier_churn_*`, `kvr_gpu_kv_ratio_*` (stable K/V: suffix `_stable`).

GPU KV memory of a retrieving row with the tier on, as a fraction of full attention's (its whole
context's K/V): its blocks still on the GPU (sink, window) + the GPU blocks reserved for its slot
(where recalled blocks land) + the summaries of all its blocks (resident on the GPU, indexed by block
id). Prefill still reads the whole context, so a server needs GPU room for one prompt being prefilled;
what the tier saves is the memory of the sequences that decode.

`--lag 0,1` measures the retrieving rows at each lag (`kv_retrieval.lag`; default the schema's default,
one step stale): keys of the default lag unsuffixed, of others suffixed `_lag0` / `_lag1`; full
attention once. `--tier-kv stable` runs the tier rows on stable K/V only. `--select 2048/8,4096/16`
measures the retrieving rows with each (chunk, warps) of the `select` kernel (graphs captured again for
each; keys of configurations other than the kernel's default suffixed `_sel4096x16`; a third number
splits each row over programs of that many columns, `SELECT_SPLIT`: `--select 2048/8,2048/8/1024`, suffix
`_sel2048x8s1024`): at batch 1 the step tracks the side stream's selection
(bench/results/kv_select_speed_key_tile.log). `--recall-programs 4,16,128` measures each configuration
with the host tier's recall on that many programs in all (kernels/kv_tier.py `RECALL_PROGRAMS`; keys of
others than the default suffixed `_rp4`; bench/results/kv_tier_recall_programs.json).

    python bench/kv_retrieval_speed.py --out bench/results/kv_retrieval_speed.json   # H200, < 4 minutes
    python bench/kv_retrieval_speed.py --cpu-smoke [--kv random|stable] [--lag 0,1]   # tiny, on the CPU
    python bench/kv_retrieval_speed.py --contexts 131072 --lag 0,1 --tier-kv stable   # lag 0 against 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shapes import LLAMA3_8B, make_model_dir  # noqa: E402

from actserve.interventions.kv_retrieval.schema import DEFAULT_LAG  # noqa: E402
from actserve.kernels import kv_retrieval as kern  # noqa: E402
from actserve.kernels import kv_tier as tier_kern  # noqa: E402
from actserve.server.engine.config import EngineConfig  # noqa: E402
from actserve.server.engine.llm_engine import LLMEngine  # noqa: E402
from actserve.server.engine.sampling_params import SamplingParams  # noqa: E402
from actserve.server.engine.sequence import Sequence  # noqa: E402

TINY = {
    **LLAMA3_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 2048,
}


DRIFT = 0.0  # stable K/V: the fast rotary dimensions zeroed (see the module docstring)


def dims_scale(config: dict[str, Any], drift: float, cutoff: float = 1e-3) -> torch.Tensor:
    """Per head dimension: 1 where the rotary embedding turns by less than `cutoff` rad per position (the
    slow dimensions: a block's score barely moves from one step to the next), `drift` elsewhere. Default
    rotary only (rotate-half layout: dimensions j and j + head_dim / 2 share a frequency)."""
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    inv = float(config.get("rope_theta", 10000.0)) ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    half = torch.where(inv < cutoff, 1.0, drift)
    return torch.cat([half, half]).float()


def fill_kv(eng: LLMEngine, config: dict[str, Any], stable: bool, drift: float) -> None:
    """Random K/V everywhere (no prompt is prefilled) and random block summaries; `stable`: keys and
    summaries scaled by `dims_scale` (their energy in the slow rotary dimensions)."""
    gen = torch.Generator(device=eng.model_info.device).manual_seed(0)
    plugin = eng.registry.plugin("kv_retrieval")
    st = getattr(plugin, "state", None)
    summaries = [t for t in ((st.rep, st.kmin, st.kmax) if st is not None else ()) if t is not None]
    scale = dims_scale(config, drift).to(eng.model_info.device)
    for c in eng.runner.kv_caches:
        c.normal_(generator=gen)
        if stable:
            c[0].mul_(scale.to(c.dtype))  # keys [slots, kv heads, head dim]
    for t in summaries:
        t.normal_(generator=gen)
        if stable:  # one scale for min and max keeps min <= max where it was
            t.mul_(scale.to(t.dtype))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_rows(eng: LLMEngine, batch: int, ctx: int, spec: dict[str, Any] | None, tag: str) -> list[Sequence]:
    """`batch` sequences with `ctx` tokens of K/V (random) and one generated token, ready to decode."""
    rng = random.Random(ctx + batch)
    vocab = eng.model_info.vocab_size
    seqs = []
    for i in range(batch):
        plans = eng.registry.prepare(spec)
        prompt = [rng.randrange(3, vocab) for _ in range(ctx)]
        s = Sequence(f"{tag}{i}", prompt, SamplingParams(max_tokens=4096), [], interventions=plans)
        s.output_token_ids = [rng.randrange(3, vocab)]
        eng.blocks.allocate(s, s.num_tokens)
        s.num_computed = ctx
        eng.registry.activate(plans)
        seqs.append(s)
    return seqs


def drop_rows(eng: LLMEngine, seqs: list[Sequence]) -> None:
    for s in seqs:
        eng.blocks.release(s)
        eng.registry.release(s.interventions)


@torch.inference_mode()
def decode_step(eng: LLMEngine, seqs: list[Sequence]) -> float:
    """One decode step of `seqs` (ms, launch to logits ready); then each row takes a token."""
    dev = eng.model_info.device
    for s in seqs:
        eng.blocks.allocate(s, s.num_tokens)
    sync(dev)
    t = time.perf_counter()
    logits = eng.runner._decode(seqs)
    sync(dev)
    ms = 1e3 * (time.perf_counter() - t)
    del logits
    for s in seqs:
        s.output_token_ids.append(7)
    return ms


def pipelined_ms(eng: LLMEngine, seqs: list[Sequence], steps: int) -> float:
    """Mean ms of `steps` decode steps launched back to back, one sync at the end: each step's host work
    (inputs, row inputs, graph launch) overlaps the previous step on the device, as in the served engine
    (`overlap_steps`), where `decode_step`'s launch-to-logits time also counts it."""
    dev = eng.model_info.device
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        for s in seqs:
            eng.blocks.allocate(s, s.num_tokens)
        eng.runner._decode(seqs)
        for s in seqs:
            s.output_token_ids.append(7)
    sync(dev)
    return 1e3 * (time.perf_counter() - t) / steps


def current_config() -> tuple[int, int, int, int]:
    """(`select`'s chunk, warps, split; the recall's programs) as the kernels' modules set them now."""
    return kern.SELECT_CHUNK, kern.SELECT_WARPS, kern.SELECT_SPLIT, tier_kern.RECALL_PROGRAMS


DEFAULT_CONFIG = current_config()  # the kernels' defaults (`use_select` changes the current one)


def sel_name(sel: tuple[int, ...]) -> str:
    """A configuration (chunk, warps, split, recall programs), as `--select` / `--recall-programs` give it."""
    name = "/".join(str(v) for v in (sel[:3] if sel[2] else sel[:2]))
    return name if sel[3] == DEFAULT_CONFIG[3] else f"{name} rp{sel[3]}"


def use_select(eng: LLMEngine, sel: tuple[int, ...]) -> None:
    """`select`'s (chunk, warps, split) and the recall's programs from here on: the plugin's decode graphs
    are captured again with them."""
    kern.SELECT_CHUNK, kern.SELECT_WARPS, kern.SELECT_SPLIT, tier_kern.RECALL_PROGRAMS = sel
    graphs = eng.runner.graphs
    if graphs is not None:
        for key in [k for k in graphs.graphs if k[0]]:  # variants with plugins; the plain ones stay
            del graphs.graphs[key]


def offload(eng: LLMEngine, seqs: list[Sequence]) -> None:
    """What the engine does after a step: cold blocks of these rows to the host tier."""
    running = eng.scheduler.running
    eng.scheduler.running = list(seqs)
    try:
        eng._offload_cold()
    finally:
        eng.scheduler.running = running


def measure(
    eng: LLMEngine,
    batch: int,
    ctx: int,
    mode: str,
    spec: dict[str, Any],
    a: argparse.Namespace,
    kind: str = "",
) -> dict[str, Any]:
    seqs = make_rows(eng, batch, ctx, None if mode == "full" else spec, f"{mode}{ctx}b{batch}-")
    try:
        for _ in range(a.warmup):
            decode_step(eng, seqs)
        row: dict[str, Any] = {"context": ctx, "batch": batch, "mode": mode}
        if mode == "tier":
            while len(seqs[0].output_token_ids) < 3:
                decode_step(eng, seqs)
            offload(eng, seqs)
            for _ in range(a.warmup):
                decode_step(eng, seqs)
            info = eng.model_info
            kv_block = 2 * info.num_layers * info.num_kv_heads * info.head_dim * eng.block_size * 2
            plugin = eng.registry.plugin("kv_retrieval")
            assert plugin is not None
            side = plugin.kv_block_bytes()
            s = seqs[0]
            on_gpu = sum(1 for b in s.block_table if b < eng.blocks.num_blocks)
            reserved = plugin.width  # type: ignore[attr-defined]
            full_bytes = len(s.block_table) * kv_block
            held = (on_gpu + reserved) * kv_block + len(s.block_table) * side
            row.update(gpu_blocks=on_gpu, host_blocks=len(s.block_table) - on_gpu, reserved_blocks=reserved)
            row["gpu_kv_ratio"] = held / full_bytes
        asked = a.profile.split(";")
        lag = f"lag{spec['kv_retrieval'].get('lag', DEFAULT_LAG)}" if mode != "full" else ""
        if any(x in asked for x in (f"{ctx},{batch},{mode}", f"{ctx},{batch},{mode},{kind}",
                                     f"{ctx},{batch},{mode},{kind},{lag}")):  # fmt: skip
            from decode_profile import profile_calls

            trace = f"{a.trace}/kv_{ctx}_b{batch}_{mode}_{kind}_{lag}.json" if a.trace else None
            row["profile"] = profile_calls(lambda: decode_step(eng, seqs), 3, trace)
            print(
                f"profile {ctx} b{batch} {mode} {kind} {lag}: {json.dumps(row['profile'])[:1500]}", flush=True
            )
        graphs0 = eng.runner.graph_steps
        plugin = eng.registry.plugin("kv_retrieval")
        before = plugin.stats() if plugin is not None else {}
        times = [decode_step(eng, seqs) for _ in range(a.steps)]
        row["graph_steps"] = eng.runner.graph_steps - graphs0
        if mode == "tier" and plugin is not None:  # the share of the blocks read that came from the host
            after = plugin.stats()
            read = after["retrieved_blocks"] - before["retrieved_blocks"]
            recalled = after["recalled_blocks"] - before["recalled_blocks"]
            row["churn"] = recalled / read if read else None
            assert eng.host_tier is not None
            row["recalled_mb_per_step"] = recalled * eng.host_tier.layer_block_bytes / a.steps / 1e6
        row["step_ms"] = statistics.median(times)
        row["step_ms_min"] = min(times)
        row["tok_s"] = 1e3 * batch / row["step_ms"]
        row["pipelined_ms"] = pipelined_ms(eng, seqs, a.steps)
        return row
    finally:
        drop_rows(eng, seqs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU, short contexts")
    ap.add_argument("--contexts", default=None, help="default 32768,65536,131072 (smoke: 512,1024)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--budget", type=int, default=None, help="budget_tokens (default 2048; smoke 128)")
    ap.add_argument("--method", default="actqkv")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--offload-gb", type=float, default=None, help="host tier size (default: enough)")
    ap.add_argument(
        "--kv",
        default="random,stable",
        help="random and/or stable (--stable-kv: stable only) K/V, one engine",
    )
    ap.add_argument("--stable-kv", action="store_true", help="= --kv stable: churn as on real text")
    ap.add_argument("--drift", type=float, default=DRIFT, help="stable K/V: scale of the fast dimensions")
    ap.add_argument(
        "--recall-programs",
        default=None,
        help="the host tier's recall programs in all (kernels/kv_tier.py RECALL_PROGRAMS) to measure, e.g. "
        "4,16,128, each with every --select configuration; keys of others suffixed _rpN",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--profile",
        default="",
        help="CTX,BATCH,MODE[,KV[,lagN]][;...]: also profile those steps' kernels (CUDA)",
    )
    ap.add_argument("--trace", default=None, help="a folder for chrome traces of the --profile steps")
    ap.add_argument("--lag", default=str(DEFAULT_LAG), help="kv_retrieval lag(s) to measure, e.g. 0,1")
    ap.add_argument("--tier-kv", default=None, help="the K/V kinds that run the tier rows (default: all)")
    ap.add_argument(
        "--select",
        default=None,
        help="`select` configurations CHUNK/WARPS to measure in the step, e.g. 2048/8,4096/16 (default: the "
        "kernel's; CHUNK/WARPS/SPLIT: split over programs of SPLIT columns); keys of others suffixed "
        "_selCHUNKxWARPS[sSPLIT]",
    )
    a = ap.parse_args()
    kinds = ["stable"] if a.stable_kv else a.kv.split(",")
    if not kinds or any(k not in ("random", "stable") for k in kinds):
        ap.error(f"--kv: a list of random and stable, got {a.kv!r}")
    lags = [int(x) for x in a.lag.split(",")]
    if not lags or any(x not in (0, 1) for x in lags):
        ap.error(f"--lag: a list of 0 and 1, got {a.lag!r}")
    tier_kinds = kinds if a.tier_kv is None else a.tier_kv.split(",")
    default_sel = DEFAULT_CONFIG
    try:
        rps = [int(x) for x in a.recall_programs.split(",")] if a.recall_programs else [default_sel[3]]
    except ValueError:
        rps = []
    if not rps or min(rps) < 1:
        ap.error(f"--recall-programs: a list of positive counts, got {a.recall_programs!r}")
    try:
        given = (
            [[int(v) for v in x.split("/")] for x in a.select.split(",")] if a.select else [default_sel[:3]]
        )
        sels = [tuple(v + [0] if len(v) == 2 else v) for v in map(list, given)]
    except ValueError:
        sels = []
    if not sels or any(
        len(x) != 3
        or x[0] < 16
        or x[0] & (x[0] - 1)
        or x[1] not in (1, 2, 4, 8, 16)
        or (x[2] and x[2] < 4)
        or x[2] & (x[2] - 1)
        for x in sels
    ):
        ap.error(
            f"--select: CHUNK/WARPS[/SPLIT] (a power-of-two chunk >= 16, warps 1-16, a power-of-two split "
            f">= 4 or 0), got {a.select!r}"
        )
    sels = [(*x, rp) for x in sels for rp in rps]
    smoke = a.cpu_smoke
    contexts = [int(x) for x in (a.contexts or ("512,1024" if smoke else "32768,65536,131072")).split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    budget = a.budget or (128 if smoke else 2048)
    if smoke:
        a.steps, a.warmup = min(a.steps, 4), min(a.warmup, 2)
    config = dict(TINY if smoke else LLAMA3_8B)
    top = max(contexts) + a.warmup * 3 + a.steps + 64
    config["max_position_embeddings"] = top
    model_dir = make_model_dir(Path(tempfile.mkdtemp()) / "kvr-model", config)
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * 128 * (4 if smoke else 2)
    if smoke:
        per_token = 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * 32 * 4
    need_gb = max(batches) * top * per_token / 2**30
    offload_gb = a.offload_gb if a.offload_gb is not None else need_gb * 1.01 + 0.01
    slots = max(batches)
    cfg = EngineConfig(
        model=str(model_dir), device="cpu" if smoke else "cuda", dtype="float32" if smoke else "bfloat16",
        load_format="dummy", max_num_seqs=max(batches), max_model_len=top, enable_prefix_caching=False,
        gpu_memory_utilization=0.9, kv_offload_gb=offload_gb, overlap_steps=False,
        num_kv_blocks=(max(batches) * top // 16 + 64) if smoke else None,
        plugin_options={"kv_retrieval": {"methods": a.method, "max_budget_tokens": budget, "slots": slots}},
    )  # fmt: skip
    t0 = time.time()
    eng = LLMEngine(cfg)
    print(f"engine ready in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for kind in kinds:
        fill_kv(eng, config, kind == "stable", a.drift)
        for ctx in contexts:
            for b in batches:
                # full attention reads every block whatever their values: measured once
                runs: list[tuple[str, int, tuple[int, ...] | None]] = []
                runs += [("full", lags[0], None)] if kind == kinds[0] else []
                for sel in sels:
                    for lag in lags:  # steps without the tier recall nothing: one kvr run per select
                        runs += [("kvr", lag, sel)] if sel[3] == rps[0] else []
                        runs += [("tier", lag, sel)] if kind in tier_kinds else []
                for mode, lag, sel in runs:
                    if sel is not None and sel != current_config():
                        use_select(eng, sel)
                    spec: dict[str, Any] = {
                        "kv_retrieval": {"method": a.method, "budget_tokens": budget, "lag": lag}
                    }
                    if smoke:  # the defaults (sink 64, window 256) do not fit the smoke's budget
                        spec["kv_retrieval"].update(sink_tokens=16, window_tokens=32)
                    r = measure(eng, b, ctx, mode, spec, a, kind)
                    r["kv"], r["lag"], r["select"] = kind, lag, list(sel) if sel else None
                    rows.append(r)
                    churn = f", churn {r['churn']:.3f}" if r.get("churn") is not None else ""
                    lagged = f"lag {lag} {sel_name(sel)}" if sel else " " * 5
                    print(
                        f"[{time.time() - t0:5.0f}s] {kind:<6} ctx {ctx:>6} b{b} {mode:<4} {lagged} "
                        f"{r['step_ms']:8.2f} ms/step ({r['tok_s']:8.1f} tok/s, "
                        f"{r['graph_steps']}/{a.steps} from graphs{churn})",
                        flush=True,
                    )
    res: dict[str, Any] = {
        "bench": "kv_retrieval_speed",
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else "cpu",
        "model": "tiny llama (smoke)" if smoke else "Llama-3-8B shape, random bf16 weights",
        "method": a.method,
        "budget_tokens": budget,
        "kv": kinds,
        "default_lag": DEFAULT_LAG,
        "stable_kv_drift": a.drift,
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }
    by = {
        (
            r["kv"], r["context"], r["batch"], r["mode"], r["lag"] if r["mode"] != "full" else None,
            tuple(r["select"]) if r["select"] else None,
        ): r
        for r in rows
    }  # fmt: skip
    res["lags"] = lags
    res["select"] = [list(x) for x in sels]
    cols = f"{'full ms':>9} {'kvr ms':>9} {'tier ms':>9} {'speedup':>8} {'tier x':>7} {'churn':>6}"
    cols += f" {'piped x':>8}"
    print(f"\n{'kv':>6} {'lag':>3} {'select':>7} {'context':>8} {'batch':>5} {cols}")
    nan = float("nan")
    for kind, lag, sel in itertools.product(kinds, lags, sels):
        tag = ("" if kind == "random" else "_stable") + ("" if lag == DEFAULT_LAG else f"_lag{lag}")
        tag += (
            "" if sel[:3] == default_sel[:3] else f"_sel{sel[0]}x{sel[1]}" + (f"s{sel[2]}" if sel[2] else "")
        )
        tag += "" if sel[3] == default_sel[3] else f"_rp{sel[3]}"
        for ctx in contexts:
            for b in batches:
                full = by[(kinds[0], ctx, b, "full", None, None)]
                kr = by[(kind, ctx, b, "kvr", lag, (*sel[:3], rps[0]))]
                f, k = full["step_ms"], kr["step_ms"]
                tr = by.get((kind, ctx, b, "tier", lag, sel))
                t = tr["step_ms"] if tr else nan
                churn = tr.get("churn") if tr else None
                res[f"kvr_speedup_ctx{ctx}_b{b}{tag}"] = f / k
                # steps launched back to back (host work overlapped, as served): full over kvr
                piped = full["pipelined_ms"] / kr["pipelined_ms"]
                res[f"kvr_pipelined_speedup_ctx{ctx}_b{b}{tag}"] = piped
                if tr:
                    res[f"kvr_tier_speedup_ctx{ctx}_b{b}{tag}"] = f / t
                    res[f"kvr_tier_churn_ctx{ctx}_b{b}{tag}"] = churn
                name = sel_name(sel)
                print(
                    f"{kind:>6} {lag:>3} {name:>7} {ctx:>8} {b:>5} {f:9.2f} {k:9.2f} {t:9.2f} "
                    f"{f / k:8.2f} {f / t:7.2f} {churn if churn is not None else nan:6.3f} {piped:8.2f}"
                )
            tr = by.get((kind, ctx, max(batches), "tier", lag, sel))
            if tr:
                res[f"kvr_gpu_kv_ratio_ctx{ctx}{tag}"] = tr["gpu_kv_ratio"]
    for ctx in contexts:
        ratios = [
            r["gpu_kv_ratio"]
            for r in rows
            if r["mode"] == "tier" and r["context"] == ctx and r["batch"] == max(batches)
        ]
        if ratios:  # block counts, whatever the K/V values: also under the unsuffixed key
            res[f"kvr_gpu_kv_ratio_ctx{ctx}"] = ratios[0]
            print(f"GPU KV ratio with the tier at {ctx}: {ratios[0]:.3f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
