"""Structured outputs on the embedded default model (SmolLM2-135M-Instruct): do constrained outputs
parse and validate, and do they finish?

Each JSON Schema of bench/data/json_schemas.json (30: nested objects, arrays, enums, bounded numbers,
required fields, patterns) becomes one chat request asking for such an object, constrained by the
`structured_output` intervention (what `response_format: json_schema` maps to), all in one batch of an
in-process engine, greedy or sampled, at `--max-tokens` 256. Reported: the share of outputs finishing
with "stop" (target >= 90%) and, of those, the share that parse as JSON and validate with `jsonschema`
(target 100%).

    python bench/structured_outputs.py [--schemas 30] [--temperature 0] [--out FILE.json]

`--throughput` (e.g. on CUDA, `--device cuda --model DIR --load-format dummy --batch 64`) compares the
decode-step time of a batch of constrained requests with the same batch unconstrained, each twice in
one process, over the steps where every row runs; it also counts CUDA-graph and eager decode steps.

`--overhead-only` measures just the cost per decode step (`--overhead-tokens` steps): the plugin's own
time (matchers, bitmasks, masking) against the whole step, written to `--out`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.offline import make_sequences, run_sequences
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.models.default_model import ensure_default_model

ROOT = Path(__file__).resolve().parent.parent


def prompt_ids(tok: Any, item: dict[str, Any]) -> list[int]:
    text = (
        f"Write one example '{item['name']}' record as a JSON object following this JSON Schema:\n"
        f"{json.dumps(item['schema'])}"
    )
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tok.encode(chat, add_special_tokens=False)


def check(text: str, schema: dict[str, Any]) -> str | None:
    """None when `text` parses and validates, else why not."""
    import jsonschema  # here, not at the top: the GPU machine has none (--throughput does without)

    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        return f"invalid: {e.message}"
    return None


def throughput(eng: LLMEngine, prompts: list[list[int]], items: list[dict[str, Any]], args: Any) -> None:
    """Median decode-step time and tokens/s, plain vs constrained, twice each, all rows running."""
    n = args.overhead_tokens
    runs: list[dict[str, Any]] = []
    for rep in range(2):
        for name in ("plain", "constrained"):
            cons = name == "constrained"
            specs = [{"structured_output": {"json_schema": it["schema"]}} for it in items] if cons else None
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=not cons)
            r = eng.runner
            graph0, eager0, chained0 = r.graph_steps, r.eager_decode_steps, eng.chained_steps
            seqs = make_sequences(eng, prompts, params, specs, f"{name}{rep}-")
            steps: list[float] = []
            outs = run_sequences(eng, seqs, steps)
            alive = min(len(s.output_token_ids) for s in seqs)
            decode = sorted(steps[2:alive])  # skip the prefill and the first decode
            med = decode[len(decode) // 2] if decode else float("nan")
            stopped = [
                (it, o) for it, o, s in zip(items, outs, seqs, strict=True) if s.finish_reason == "stop"
            ]
            valid = (  # None where jsonschema is missing (the GPU machine; its weights are random there)
                sum(
                    check(eng.tokenizer.decode(o, skip_special_tokens=True), it["schema"]) is None
                    for it, o in stopped
                )
                if importlib.util.find_spec("jsonschema")
                else None
            )
            runs.append(
                {"run": name, "rep": rep, "median_decode_step_ms": round(med, 3),
                 "tokens_per_s": round(len(prompts) / med * 1e3, 1), "steps_measured": len(decode),
                 "graph_steps": r.graph_steps - graph0, "eager_decode_steps": r.eager_decode_steps - eager0,
                 "chained_steps": eng.chained_steps - chained0, "stopped": len(stopped),
                 "valid_of_stopped": valid}
            )  # fmt: skip
            print(json.dumps(runs[-1]))
    plain = [x["median_decode_step_ms"] for x in runs if x["run"] == "plain"]
    cons = [x["median_decode_step_ms"] for x in runs if x["run"] == "constrained"]
    summary = {"batch": len(prompts), "plain_step_ms": min(plain), "constrained_step_ms": min(cons),
               "throughput_cost": round(1 - min(plain) / min(cons), 4)}  # fmt: skip
    print(json.dumps(summary, indent=1))
    doc = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "device": args.device,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "model": args.model or "embedded default", "load_format": args.load_format,
        "summary": summary, "runs": runs,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", args.out)


def overhead(eng: LLMEngine, prompts: list[list[int]], items: list[dict[str, Any]], args: Any) -> None:
    """What the constraint costs per decode step: the plugin's own host and device time (advancing the
    matchers and filling the bitmasks; masking the logits) against the whole step, while every row of the
    batch is still running (a plain vs constrained step-time difference is noise on a shared CPU)."""
    from actserve.interventions.structured_output import plugin as so_plugin

    plug = eng.registry.plugin("structured_output")
    spent: list[float] = []

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent.append(time.perf_counter() - t)

        return wrapper

    plug.fill_row_inputs = timed(plug.fill_row_inputs)  # type: ignore[method-assign]
    so_plugin.MaskHook.apply = timed(so_plugin.MaskHook.apply)  # type: ignore[method-assign]
    specs: list[dict[str, Any] | None] = [
        {"structured_output": {"json_schema": it["schema"]}} for it in items
    ]
    params = SamplingParams(max_tokens=args.overhead_tokens, temperature=0.0)
    seqs = make_sequences(eng, prompts, params, specs, "o")
    steps: list[float] = []
    per_step: list[float] = []
    run_sequences(eng, seqs, steps)
    # fill + apply per step: two entries per step
    per_step = [a + b for a, b in zip(spent[::2], spent[1::2], strict=True)]
    alive = min(len(s.output_token_ids) for s in seqs)  # steps 1 .. alive-1 decode the whole batch
    step_ms = [1e3 * x for x in per_step[1:alive]]
    whole_ms = steps[1:alive]
    result = {
        "batch": len(prompts),
        "decode_steps_measured": len(step_ms),
        "plugin_ms_per_step_mean": round(sum(step_ms) / len(step_ms), 3),
        "plugin_us_per_row_mean": round(1e3 * sum(step_ms) / len(step_ms) / len(prompts), 2),
        "step_ms_mean": round(sum(whole_ms) / len(whole_ms), 1),
        "plugin_share_of_step": round(sum(step_ms) / sum(whole_ms), 4),
    }
    print(json.dumps(result, indent=1))
    doc = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "note": "CPU shared with other jobs: step times are inflated; the plugin time is its own",
        "result": result,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemas", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/structured_outputs.json"))
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--batch", type=int, default=0, help="requests (schemas repeated); default: one each")
    ap.add_argument("--overhead-tokens", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    items = json.loads((ROOT / "bench/data/json_schemas.json").read_text())[: args.schemas]
    model = args.model or str(ensure_default_model())
    kv = {"num_kv_blocks": 2048} if args.device == "cpu" else {}
    eng = LLMEngine(EngineConfig(model=model, device=args.device, load_format=args.load_format, **kv))
    tok = eng.tokenizer
    if args.batch:
        items = [items[i % len(items)] for i in range(args.batch)]
    if args.throughput:
        throughput(eng, [prompt_ids(tok, it) for it in items], items, args)
        return
    if args.overhead_only:
        overhead(eng, [prompt_ids(tok, it) for it in items], items, args)
        return
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    specs: list[dict[str, Any] | None] = [
        {"structured_output": {"json_schema": it["schema"]}} for it in items
    ]
    t0 = time.perf_counter()
    seqs = make_sequences(eng, [prompt_ids(tok, it) for it in items], params, specs, "s")
    prepare_s = time.perf_counter() - t0
    steps: list[float] = []
    t0 = time.perf_counter()
    outs = run_sequences(eng, seqs, steps)
    wall = time.perf_counter() - t0
    rows = []
    for it, seq, out in zip(items, seqs, outs, strict=True):
        text = tok.decode(out, skip_special_tokens=True)
        problem = check(text, it["schema"])
        reason = seq.finish_reason
        rows.append(
            {"name": it["name"], "finish_reason": reason, "tokens": len(out), "valid": problem is None,
             "problem": problem, "text": text}
        )  # fmt: skip
        print(f"{it['name']:<18} {reason:<7} {len(out):>4} tok  {'ok' if problem is None else problem}")
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    summary = {
        "requests": len(rows),
        "stop_share": len(stopped) / len(rows),
        "valid_share_of_stop": sum(r["valid"] for r in stopped) / max(1, len(stopped)),
        "valid_share_of_all": sum(r["valid"] for r in rows) / len(rows),
        "generated_tokens": sum(r["tokens"] for r in rows),
        "wall_s": round(wall, 2),
        "prepare_s": round(prepare_s, 3),
        "steps": len(steps),
    }
    print(json.dumps(summary, indent=1))
    doc = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "model": "SmolLM2-135M-Instruct (embedded default, float32)",
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "note": "all schemas in one batch on an in-process engine; greedy unless --temperature > 0",
        "summary": summary,
        "outputs": rows,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
