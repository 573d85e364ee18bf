"""Expert offloading on the H200 (issue 15): batch-1 decode of Mixtral-8x7B- and Qwen3-30B-A3B-shaped models
through the engine with every expert resident, and with 25% / 50% of each layer's experts on the device
(the rest in pinned host memory; `--resident-experts`), against the bounds they should reach, and against
transformers + accelerate CPU offload of the same model in the same run.

- Weights are RANDOM bf16 (`--load-format dummy`), and so are the routers: a random router routes near
  uniformly, the pessimistic case for a cache. A second run skews every router by a Zipf prior: each MoE
  layer's gate gets a bias of -ZIPF_S * ln(rank) per expert (ZIPF_S = 1.0; ranks a seeded random
  permutation per layer), i.e. a prior probability proportional to rank^-1 before the data-dependent logits.
- Fewer layers than the real models (`--mixtral-layers`, default 8 of 32; `--qwen3-layers`, default 12 of
  48): the host holds every expert once pinned (and accelerate's copy where its layout differs), and a
  start must fit the lent machine's 128 GiB and the one-call time limit. Per-token figures scale with the
  layer count; the fractions below do not depend on it.
- Measured in the same run: host -> device bandwidth (pinned, 1 GiB copies), device copy bandwidth
  (read + write), the CPU's time for one expert (the cache's cost model, logged at start).
- All resident (CUDA graphs as served): tok/s vs the roofline of the bytes a token reads (the non-expert
  weights except the embedding table, its top-k experts at every MoE layer, its KV) at the measured
  device copy bandwidth (and at the 4.8 TB/s peak).
- Offloaded, two kinds of engine per resident share (`--modes`):
  - **zero-copy** (the served default): decode steps replay CUDA graphs, a missing expert is read by the
    kernel from pinned host memory, the cache is refilled between steps; per `--admit` value (an expert
    is copied into a slot once it missed that many steps in a row; 0 never);
  - **eager** (`--expert-zero-copy off`: host syncs per layer): per prefetch depth (`--depths`; 0 = plain
    LRU, 1 = ExpertFlow router-ahead prefetch) and CPU compute mode (never / auto / always).
  Each: tok/s, hit rate, prefetch precision and recall (eager), bytes over PCIe per token (copies and
  zero-copy reads), experts run on the CPU per token, peak GPU memory. Bounds: the copy bound = host->
  device bandwidth / PCIe bytes per token (what the transfers allow if nothing else took time), and the
  bound with copies fully hidden behind compute = min(copy bound, the all-resident tok/s of the same run).
  `bound_frac` = tok/s over the latter; `copy_bound_frac` over the former (the pre-zero-copy definition,
  which exceeds 1 x the all-resident speed where copies are few). Both None, with `bound_note` saying
  why, when the counters cannot be trusted (fewer lookups counted than the tokens made, or misses without
  PCIe bytes; bench/moe_bounds.py): a lost byte count must not pass as the all-resident bound.
- accelerate: transformers' model with `infer_auto_device_map` under the GPU memory our 25% engine's
  weights take, `dispatch_model` (the rest offloaded to the CPU, moved per forward), greedy decode.
  Skipped with a message when accelerate is not installed, or with `--skip-accelerate`.

    python bench/moe_offload.py --out bench/results/moe_offload.json [--quick]
    python bench/moe_offload.py --modes zero-copy --admit 0,1,2 --out /tmp/zc.json   # the zero-copy part only
    python bench/moe_offload.py --cpu-smoke --out /tmp/moe_offload_smoke.json   # tiny, CPU, end to end

JSON keys for the issue: moe_resident_roofline_frac_b1_{mixtral,qwen3}, moe_offload25_bound_frac_b1_*
(the served default at 25%: zero copy with the default admit-after, uniform router; over the bound with
copies hidden behind compute), moe_offload25_vs_accelerate_b1_* (the same setting over accelerate).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_runs import random_prompts  # noqa: E402
from moe_bounds import offload_bound  # noqa: E402
from shapes import make_model_dir  # noqa: E402

from actserve.server.engine.config import EngineConfig  # noqa: E402
from actserve.server.engine.llm_engine import LLMEngine  # noqa: E402
from actserve.server.engine.sampling_params import SamplingParams  # noqa: E402
from actserve.server.engine.sequence import Sequence  # noqa: E402

ZIPF_S = 1.0
HBM_PEAK = 4.8e12
PROMPT = 32

MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "torch_dtype": "bfloat16", "sliding_window": None,
}  # fmt: skip
QWEN3 = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}  # fmt: skip
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
SMOKE = {
    "mixtral": {**TINY, "intermediate_size": 96, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3": {
        **TINY,
        "moe_intermediate_size": 48,
        "head_dim": 16,
        "num_experts": 16,
        "num_experts_per_tok": 4,
    },
}

# eager engines (--expert-zero-copy off): (prefetch depth or None for each of --depths, CPU compute)
EAGER_MODES = [(None, "never"), (0, "auto"), (0, "always")]
DEFAULT_ADMIT = 2  # server/models/expert_offload.py DEFAULT_ADMIT_AFTER: the served setting

_ids = [0]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bandwidths(cuda: bool, quick: bool) -> dict[str, float]:
    """Pinned host -> device and device copy (read + write) bandwidth, bytes/s; on the CPU a memory copy."""
    n = (256 if quick else 1024) << 20
    if not cuda:
        a = torch.empty(n // 8, dtype=torch.uint8)
        b = torch.empty_like(a)
        t0 = time.perf_counter()
        for _ in range(4):
            b.copy_(a)
        copy = 2 * a.numel() * 4 / (time.perf_counter() - t0)
        return {"h2d_bytes_per_s": copy / 2, "device_copy_bytes_per_s": copy}
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = {}
    for name, fn, factor in (
        ("h2d_bytes_per_s", lambda: dev.copy_(host, non_blocking=True), 1),
        ("device_copy_bytes_per_s", lambda: dev2.copy_(dev), 2),
    ):
        fn()
        sync()
        start.record()
        for _ in range(5):
            fn()
        end.record()
        sync()
        out[name] = factor * 5 * n / (start.elapsed_time(end) / 1e3)
    return out


def build(model_dir: Path, cuda: bool, **kw: Any) -> LLMEngine:
    """Overlapped (chained) decode steps as CUDA serves them, on the CPU smoke too: the path whose
    statistics issue 15 found uncounted."""
    cfg = EngineConfig(
        model=str(model_dir), device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
        load_format="dummy", max_num_seqs=1, max_model_len=1024, block_size=16, num_kv_blocks=256,
        cuda_graph_prefill_len=0, enable_prefix_caching=False, engine_process="off",
        overlap_steps=True, **kw,
    )  # fmt: skip
    return LLMEngine(cfg)


def zipf_bias(eng: LLMEngine, on: bool, seed: int = 0) -> None:
    """Each MoE layer's gate biased by -ZIPF_S * ln(rank), ranks a seeded permutation per layer (or 0). The
    bias parameter is created once and then written in place, and the decode graphs are captured again
    the first time it appears (a graph captured without a bias would not add it)."""
    g = torch.Generator().manual_seed(seed)
    created = False
    for layer in eng.loaded.model.model.layers:
        if not layer.is_moe:
            continue
        gate = layer.mlp.gate
        e = gate.weight.shape[0]
        if gate.bias is None:
            gate.bias = torch.nn.Parameter(torch.zeros(e, dtype=gate.weight.dtype, device=gate.weight.device))
            gate.bias.requires_grad_(False)
            created = True
        rank = torch.randperm(e, generator=g).float() + 1
        with torch.no_grad():
            gate.bias.copy_(-ZIPF_S * rank.log() if on else torch.zeros(e))
    if created and eng.runner.graphs is not None:
        recapture(eng)


def recapture(eng: LLMEngine) -> None:
    """The engine's decode graphs captured again (after a parameter appeared)."""
    from actserve.server.engine.cuda_graphs import DecodeGraphs

    sync()
    g = eng.runner.graphs
    assert g is not None
    plugins = [gp.plugin for gp in g.plugins.values()]
    eng.runner.graphs = None
    del g.graphs
    eng.runner.graphs = DecodeGraphs(
        g.model, g.kv_caches, g.block_size, eng.runner.max_blocks, g.max_bs, g.dummy_slot, g.fused_table,
        g.width, plugins,
    )  # fmt: skip


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def flush(eng: LLMEngine) -> None:
    offload = getattr(eng.loaded.model, "expert_offload", None)
    if offload is not None:
        offload.flush_stats()  # zero-copy steps' statistics reach the host one step late


def decode(eng: LLMEngine, tokens: int, seed: int) -> dict[str, Any]:
    """One request, batch 1: the prompt's step, then `tokens - 1` decode steps timed; the expert cache's
    counters over the decode steps only."""
    _ids[0] += 1
    prompt = random_prompts(1, PROMPT, eng.model_info.vocab_size, seed)[0]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    eng.add(Sequence(f"d{_ids[0]}", prompt, params, []))
    keep, eng.overlap = eng.overlap, False  # the prompt's step alone: an overlapped engine would chain
    eng.step()  # the first decode step to it, before the clock and the counters start
    eng.overlap = keep
    sync()
    flush(eng)
    tel = eng.loaded.telemetry[0] if eng.loaded.telemetry else None
    before = dict(tel.counters) if tel is not None else {}
    t0 = time.perf_counter()
    while eng.has_work():
        eng.step()
    sync()
    dt = time.perf_counter() - t0
    flush(eng)
    out: dict[str, Any] = {"tok_s": (tokens - 1) / dt, "decode_tokens": tokens - 1}
    if tel is not None:
        d = {k: (tel.counters[k] - before.get(k, 0.0)) / (tokens - 1) for k in tel.counters}
        hits, misses = d["moe_expert_cache_hits"], d["moe_expert_cache_misses"]
        out.update(
            hit_rate=hits / max(1e-9, hits + misses),
            lookups_per_token=hits + misses,
            copy_bytes_per_token=d["moe_expert_copy_bytes"],
            zero_copy_bytes_per_token=d["moe_expert_zero_copy_bytes"],
            pcie_bytes_per_token=d["moe_expert_copy_bytes"] + d["moe_expert_zero_copy_bytes"],
            misses_per_token=misses,
            cpu_experts_per_token=d["moe_cpu_experts"],
            prefetch_precision=ratio(d["moe_prefetch_correct"], d["moe_prefetch_predicted"]),
            prefetch_recall=ratio(d["moe_prefetch_correct"], d["moe_prefetch_used"]),
        )
    return out


def expected_lookups(eng: LLMEngine) -> int:
    """Expert-cache lookups one batch-1 decode token makes: its top_k distinct experts per MoE layer."""
    spec = eng.loaded.spec
    assert spec is not None and spec.moe is not None
    return spec.moe.top_k * sum(1 for layer in eng.loaded.model.model.layers if layer.is_moe)


def token_bytes(eng: LLMEngine, context: int) -> dict[str, float]:
    """Bytes one batch-1 decode token reads: the weights but the embedding table and the experts, its
    top-k experts at every MoE layer, its KV over `context` tokens."""
    model, spec = eng.loaded.model, eng.loaded.spec
    assert spec is not None and spec.moe is not None
    dense = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if "embed_tokens" not in name and ".experts." not in name
    )
    el = torch.tensor([], dtype=eng.model_info.dtype).element_size()
    expert = 3 * spec.hidden_size * spec.moe.intermediate_size * el
    layers = sum(1 for layer in model.model.layers if layer.is_moe)
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * el * context
    return {"dense": dense, "experts": spec.moe.top_k * layers * expert, "kv": kv, "expert_bytes": expert}


def accelerate_run(
    model_dir: Path, offload_eng: LLMEngine, gpu_budget: int, tokens: int, cuda: bool
) -> dict[str, Any] | str:
    """transformers + accelerate's CPU offload of the same shapes under `gpu_budget` bytes of weights on
    the GPU; tok/s of greedy batch-1 decode. Expert tensors alias the engine's host copy when the layouts
    match (transformers 5's fused experts), else random. On the CPU (smoke) everything stays on the CPU:
    the construction and decode run, the figure means nothing."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
        from accelerate.utils import set_module_tensor_to_device
    except ImportError:
        return "skipped: accelerate is not installed (pip install accelerate)"
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    dtype = offload_eng.model_info.dtype
    with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) computed
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers 4.x
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    ours = offload_eng.loaded.model.model.layers
    aliased = 0
    g = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        value = None
        if ".layers." in name and ".experts." in name:
            mine = ours[int(name.split(".layers.")[1].split(".")[0])].mlp.experts
            host = {"gate_up_proj": mine.host_w13, "down_proj": mine.host_w2}.get(name.rsplit(".", 1)[1])
            if host is not None and tuple(host.shape) == tuple(p.shape):
                value, aliased = host, aliased + 1  # the engine's pinned host copy, shared
        if value is None and p.dim() == 1:
            value = torch.ones(p.shape, dtype=dtype)
        elif value is None:
            value = torch.empty(p.shape, dtype=dtype)
            for chunk in value.view(p.shape[0], -1).split(4096):
                chunk.copy_(torch.randn(chunk.shape, generator=g) * 0.02)
        set_module_tensor_to_device(model, name, "cpu", value=value)
    no_split = getattr(model, "_no_split_modules", None) or []
    if cuda:
        device_map = infer_auto_device_map(
            model, max_memory={0: gpu_budget, "cpu": 2**40}, no_split_module_classes=no_split, dtype=dtype
        )
        model = dispatch_model(model, device_map=device_map, main_device=0)
    else:
        device_map = {"": "cpu"}
    model.eval()
    on_cpu = sum(1 for d in device_map.values() if d == "cpu")
    ids = torch.tensor([random_prompts(1, PROMPT, config.vocab_size, 7)[0]], device="cuda" if cuda else "cpu")
    with torch.inference_mode():  # greedy decode by hand: the prompt, one warm-up step, then timed steps
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(tokens):
            if step == 1:
                sync()
                t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        dt = time.perf_counter() - t0
    res = {
        "tok_s": (tokens - 1) / dt,
        "decode_tokens": tokens - 1,
        "gpu_budget_gb": gpu_budget / 1e9,
        "modules_on_cpu": on_cpu,
        "expert_tensors_aliased": aliased,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    }
    del model
    return res


def offload_settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per engine to build: its share, zero copy or not, and the runs on it."""
    out = []
    for share in args.shares:
        if "zero-copy" in args.modes:
            out.append({"share": share, "zero_copy": True, "runs": [{"admit_after": a} for a in args.admit]})
        if "eager" in args.modes:
            runs = []
            for depth, mode in EAGER_MODES:
                for d in args.depths if depth is None else [depth]:
                    runs.append({"prefetch_depth": d, "cpu_compute": mode})
            out.append({"share": share, "zero_copy": False, "runs": runs})
    return out


def run_offloaded(
    name: str,
    model_dir: Path,
    args: argparse.Namespace,
    bw: dict[str, float],
    resident_tok_s: float,
    cuda: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """Every offloading engine and its runs; also the start figures, and the accelerate result (under the
    first 25% engine's GPU weight bytes) when asked."""
    runs: list[dict[str, Any]] = []
    starts: dict[str, Any] = {}
    acc: Any = "skipped (--skip-accelerate)" if args.skip_accelerate else "skipped: no 25% engine was built"
    for plan in offload_settings(args):
        share, zero = plan["share"], plan["zero_copy"]
        tag = f"{share:g}_{'zero_copy' if zero else 'eager'}"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        eng = build(model_dir, cuda, resident_experts=share, expert_zero_copy="on" if zero else "off")
        if not zero:  # eager: counters per step stay with their step (zero copy counts on the device)
            eng.overlap = False
        offload = eng.loaded.model.expert_offload
        cost = offload.cost
        lookups = expected_lookups(eng)
        starts[tag] = {
            "start_s": time.perf_counter() - t0, "graphs": eng.runner.graphs is not None,
            "cost_model": {"h2d_bytes_per_s": cost.bandwidth, "cpu_fixed_s": cost.cpu_fixed,
                           "cpu_per_row_s": cost.cpu_per_row, "measured": cost.measured},
            "host_pinned": bool(cuda and eng.loaded.model.model.layers[0].mlp.experts.host_w13.is_pinned()),
            "slots": offload.slots, "weights_gb": eng.loaded.weights_bytes / 1e9,
        }  # fmt: skip
        for router in args.routers:
            zipf_bias(eng, router == "zipf")
            for run in plan["runs"]:
                if time.perf_counter() > args.deadline and (runs or router != args.routers[0]):
                    print(f"{name}: past --deadline-s, skipping {tag} {run} ({router})", flush=True)
                    continue
                offload.configure(**run)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                slow = run.get("cpu_compute") == "always"  # the CPU runs most experts: slow at Mixtral's size
                decode(eng, 2 if slow else 3, seed=3)  # warm-up: this setting's experts cached
                r = decode(eng, 4 if slow else args.tokens, seed=4)
                r.update(offload_bound(r, bw["h2d_bytes_per_s"], resident_tok_s, lookups))
                if r["bound_note"]:
                    print(f"{name} {tag} {run} ({router}): {r['bound_note']}", flush=True)
                r.update(
                    router=router, resident_share=share, slots=offload.slots, zero_copy=zero,
                    admit_after=offload.config.admit_after if zero else None,
                    prefetch_depth=None if zero else offload.config.prefetch_depth,
                    cpu_compute=offload.config.cpu_compute,
                    resident_expert_gb=offload.resident_bytes() / 1e9,
                    peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                )  # fmt: skip
                runs.append(r)
                print(json.dumps({name: r}), flush=True)
        zipf_bias(eng, False)
        if share == 0.25 and not args.skip_accelerate and not isinstance(acc, dict):
            offload.configure(**plan["runs"][0])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                acc = accelerate_run(model_dir, eng, eng.loaded.weights_bytes, max(3, args.tokens // 4), cuda)
            except Exception as e:  # noqa: BLE001 - the baseline's failure must not lose the rest
                acc = f"failed: {type(e).__name__}: {e}"
            print(json.dumps({name: {"accelerate": acc}}), flush=True)
        del eng, offload
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return runs, starts, acc


def run_model(
    name: str, config: dict[str, Any], args: argparse.Namespace, bw: dict[str, float]
) -> dict[str, Any]:
    cuda = not args.cpu_smoke
    tokens = args.tokens
    res: dict[str, Any] = {"config": {k: v for k, v in config.items() if k != "architectures"}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / name, config)
        # all resident, CUDA graphs as served
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        eng = build(model_dir, cuda)
        res["resident_start_s"] = time.perf_counter() - t0
        decode(eng, 4, seed=1)  # warm-up
        run = decode(eng, tokens, seed=2)
        tb = token_bytes(eng, PROMPT + tokens // 2)
        total = tb["dense"] + tb["experts"] + tb["kv"]
        roof = bw["device_copy_bytes_per_s"] / total
        res["resident"] = {
            **run, "bytes_per_token": total, **{f"{k}_bytes": v for k, v in tb.items()},
            "roofline_tok_s": roof, "roofline_frac": run["tok_s"] / roof,
            "roofline_frac_at_peak": run["tok_s"] / (HBM_PEAK / total),
            "graphs": eng.runner.graphs is not None,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        }  # fmt: skip
        print(json.dumps({name: {"resident": res["resident"]}}), flush=True)
        del eng
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        runs, starts, acc = run_offloaded(name, model_dir, args, bw, run["tok_s"], cuda)
        res["offload"], res["offload_engines"], res["accelerate"] = runs, starts, acc
    res["summary"] = summary(res, args)
    return res


def summary(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The issue's figures from the runs that were made (None where a setting was not measured)."""

    def pick(router: str = "uniform", share: float = 0.25, **want: Any) -> dict[str, Any] | None:
        for r in res["offload"]:
            if (
                r["router"] == router
                and r["resident_share"] == share
                and all(r.get(k) == v for k, v in want.items())
            ):
                return r
        return None

    served = pick(zero_copy=True, admit_after=DEFAULT_ADMIT) or pick(zero_copy=True)
    acc = res["accelerate"]
    out: dict[str, Any] = {
        "resident_roofline_frac": res["resident"]["roofline_frac"],
        "offload25_bound_frac": served["bound_frac"] if served else None,
        "offload25_copy_bound_frac": served["copy_bound_frac"] if served else None,
        "offload25_vs_accelerate": served["tok_s"] / acc["tok_s"]
        if served and isinstance(acc, dict)
        else None,
    }
    for router in args.routers:  # the measurements that choose the defaults
        for share in args.shares:
            zc = {a: pick(router, share, zero_copy=True, admit_after=a) for a in args.admit}
            zc = {a: r for a, r in zc.items() if r}
            if zc:
                out[f"admit_after_tok_s_{router}_{share:g}"] = {a: r["tok_s"] for a, r in zc.items()}
                out[f"admit_after_hit_rate_{router}_{share:g}"] = {a: r["hit_rate"] for a, r in zc.items()}
            eager = {
                d: pick(router, share, zero_copy=False, prefetch_depth=d, cpu_compute="never")
                for d in args.depths
            }
            eager = {d: r for d, r in eager.items() if r}
            if eager:
                out[f"prefetch_depth_tok_s_{router}_{share:g}"] = {d: r["tok_s"] for d, r in eager.items()}
                out[f"prefetch_depth_hit_rate_{router}_{share:g}"] = {
                    d: r["hit_rate"] for d, r in eager.items()
                }
    cpu = pick(zero_copy=False, cpu_compute="auto")
    copy_only = pick(zero_copy=False, prefetch_depth=0, cpu_compute="never")
    if cpu and copy_only and copy_only["copy_bound_tok_s"]:
        out["offload25_eager_auto_over_copy_bound"] = cpu["tok_s"] / copy_only["copy_bound_tok_s"]
    return out


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/moe_offload.json")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, the zero-copy engine at 25%% only")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU, end to end")
    ap.add_argument("--mixtral-layers", type=int, default=8)
    ap.add_argument("--qwen3-layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per measurement")
    ap.add_argument("--models", default="mixtral,qwen3")
    ap.add_argument("--modes", default="zero-copy,eager", help="offloading engines: zero-copy, eager")
    ap.add_argument("--shares", type=floats, default=[0.25, 0.5], help="resident shares, e.g. 0.25,0.5")
    ap.add_argument("--admit", type=ints, default=[0, 1, 2], help="zero copy: admit-after values to measure")
    ap.add_argument("--depths", type=ints, default=[0, 1], help="eager: prefetch depths to measure")
    ap.add_argument("--routers", default="uniform,zipf", help="uniform, zipf (Zipf-skewed gate bias)")
    ap.add_argument("--skip-accelerate", action="store_true", help="no transformers + accelerate baseline")
    ap.add_argument(
        "--deadline-s", type=float, default=420.0,
        help="after this many seconds only each engine's first setting is still measured (one-call limits)",
    )  # fmt: skip
    args = ap.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    args.routers = [r for r in args.routers.split(",") if r]
    for what, got, allowed in (
        ("--modes", args.modes, ("zero-copy", "eager")),
        ("--routers", args.routers, ("uniform", "zipf")),
    ):
        if not got or any(g not in allowed for g in got):
            sys.exit(f"{what} takes a comma-separated subset of {', '.join(allowed)}, got {','.join(got)}")
    if args.quick:
        args.modes, args.shares = ["zero-copy"], [0.25]
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke for the CPU smoke test")
    if args.tokens is None:
        args.tokens = 6 if args.cpu_smoke else (12 if args.quick else 32)
    t_start = time.perf_counter()
    args.deadline = t_start + args.deadline_s
    bw = bandwidths(cuda, args.quick)
    print(json.dumps({"bandwidth": bw}), flush=True)
    out: dict[str, Any] = {
        "argv": sys.argv[1:],
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke: tiny shapes, figures meaningless)",
        "note": "random bf16 weights and routers (near-uniform routing, the pessimistic case) plus a "
        f"Zipf-skewed router (gate bias -{ZIPF_S} ln(rank)); fewer layers than the real models (host "
        "memory, time)",
        "bandwidth": bw,
    }
    models = {
        "mixtral": {**MIXTRAL, "num_hidden_layers": args.mixtral_layers},
        "qwen3": {**QWEN3, "num_hidden_layers": args.qwen3_layers},
    }
    if args.cpu_smoke:
        models = {k: {**v, **SMOKE[k], "num_hidden_layers": 3} for k, v in models.items()}
    for name in args.models.split(","):
        res = run_model(name, models[name], args, bw)
        out[name] = res
        s = res["summary"]
        out[f"moe_resident_roofline_frac_b1_{name}"] = s["resident_roofline_frac"]
        out[f"moe_offload25_bound_frac_b1_{name}"] = s["offload25_bound_frac"]
        out[f"moe_offload25_vs_accelerate_b1_{name}"] = s["offload25_vs_accelerate"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))  # what is done so far, if the rest times out
    out["wall_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    report(out, args)


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    fmt = lambda v: f"{v:6.2f}" if isinstance(v, float) else "     -"  # noqa: E731
    print(
        "\nmodel   setting                        router   tok/s   hit    prec   PCIe MB/tok bound_frac "
        "copy_frac"
    )
    for name in args.models.split(","):
        r = out[name]["resident"]
        print(f"{name:7} all resident                   -        {r['tok_s']:7.1f} roofline "
              f"{r['roofline_tok_s']:.1f} tok/s ({r['roofline_frac']:.2f}; at peak "
              f"{r['roofline_frac_at_peak']:.2f})")  # fmt: skip
        for o in out[name]["offload"]:
            if o["zero_copy"]:
                setting = f"{o['resident_share']:.0%} zero-copy admit={o['admit_after']}"
            else:
                setting = f"{o['resident_share']:.0%} eager d{o['prefetch_depth']} cpu={o['cpu_compute']}"
            print(f"{name:7} {setting:30} {o['router']:8} {o['tok_s']:7.1f} {fmt(o['hit_rate'])} "
                  f"{fmt(o['prefetch_precision'])} {(o.get('pcie_bytes_per_token') or 0) / 1e6:11.1f} "
                  f"{fmt(o['bound_frac'])} {fmt(o['copy_bound_frac'])}")  # fmt: skip
        acc = out[name]["accelerate"]
        print(f"{name:7} accelerate: " + (acc if isinstance(acc, str) else f"{acc['tok_s']:.2f} tok/s"))
    for key in sorted(k for k in out if k.startswith("moe_")):
        print(f"{key} = {out[key]}")
    print(f"wall {out['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
