"""Which grammar engine backs structured outputs: xgrammar vs llguidance, token-mask time on this CPU.

For each JSON Schema of bench/data/json_schemas.json (its first `--schemas`), `--batch` matchers replay
the tokens of the schema's valid instance (JSON with separators ", " and ": ", tokenized by the embedded
default model's tokenizer, SmolLM2-135M-Instruct): per step the whole batch's next-token bitmask
[batch, ceil(vocab/32)] int32 is filled in one call (each engine's batched, multi-threaded API), then
every matcher consumes its token. Reported: schema compile time, and per step the mask time for the
batch and per row.

    python bench/grammar_engines.py [--batch 64] [--schemas 30] [--out bench/results/grammar_engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_tokenizer() -> tuple[Any, int, list[int]]:
    from transformers import AutoConfig, AutoTokenizer

    from actserve.server.models.default_model import ensure_default_model

    path = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    return tok, config.vocab_size, eos


def run_xgrammar(tok: Any, vocab: int, eos: list[int], schemas: list[dict], batch: int) -> dict[str, Any]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, max_threads=os.cpu_count() or 1, cache_enabled=False)
    setup = time.perf_counter() - t0
    batcher = xgr.BatchGrammarMatcher(max_threads=os.cpu_count() or 1)
    out: dict[str, Any] = {"setup_s": setup, "schemas": []}
    for s in schemas:
        t0 = time.perf_counter()
        grammar = compiler.compile_json_schema(json.dumps(s["schema"]), any_whitespace=False)
        compile_s = time.perf_counter() - t0
        matchers = [xgr.GrammarMatcher(grammar) for _ in range(batch)]
        mask = xgr.allocate_token_bitmask(batch, vocab)
        steps = []
        for t in s["tokens"] + [eos[0]]:
            t0 = time.perf_counter()
            batcher.batch_fill_next_token_bitmask(matchers, mask)
            steps.append(time.perf_counter() - t0)
            assert (mask[0, t // 32] >> (t % 32)) & 1, f"xgrammar refuses token {t} of {s['name']}"
            if t == eos[0]:
                break
            for m in matchers:
                assert m.accept_token(t)
        out["schemas"].append({"name": s["name"], "compile_s": compile_s, "steps": steps})
    return out


def run_llguidance(tok: Any, vocab: int, eos: list[int], schemas: list[dict], batch: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos[0])
    executor = llguidance.LLExecutor()
    setup = time.perf_counter() - t0
    out: dict[str, Any] = {"setup_s": setup, "schemas": []}
    for s in schemas:
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(s["schema"]),
            defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        )
        first = llguidance.LLMatcher(lltok, grammar)  # compiles the grammar against the tokenizer
        compile_s = time.perf_counter() - t0
        assert not first.is_error(), first.get_error()
        matchers = [first] + [llguidance.LLMatcher(lltok, grammar) for _ in range(batch - 1)]
        mask = lt.allocate_token_bitmask(batch, vocab)
        steps = []
        for t in s["tokens"] + [eos[0]]:
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
            steps.append(time.perf_counter() - t0)
            assert (mask[0, t // 32] >> (t % 32)) & 1, f"llguidance refuses token {t} of {s['name']}"
            if t == eos[0]:
                break
            for m in matchers:
                assert m.consume_token(t), m.get_error()
        out["schemas"].append({"name": s["name"], "compile_s": compile_s, "steps": steps})
    return out


def summarize(res: dict[str, Any], batch: int) -> dict[str, Any]:
    steps = [x for s in res["schemas"] for x in s["steps"]]
    return {
        "setup_s": round(res["setup_s"], 3),
        "compile_ms_mean": round(1e3 * statistics.mean(s["compile_s"] for s in res["schemas"]), 2),
        "mask_ms_per_step_mean": round(1e3 * statistics.mean(steps), 3),
        "mask_ms_per_step_p50": round(1e3 * statistics.median(steps), 3),
        "mask_ms_per_step_max": round(1e3 * max(steps), 3),
        "mask_us_per_row_mean": round(1e6 * statistics.mean(steps) / batch, 2),
        "steps": len(steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--schemas", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench/results/grammar_engines.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tok, vocab, eos = load_tokenizer()
    schemas = json.loads((ROOT / "bench/data/json_schemas.json").read_text())[: args.schemas]
    for s in schemas:
        s["tokens"] = tok.encode(json.dumps(s["instance"]), add_special_tokens=False)
    results: dict[str, Any] = {}
    for name, fn in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance)):
        fn(tok, vocab, eos, schemas[:1], args.batch)  # warm-up (thread pools, caches)
        results[name] = summarize(fn(tok, vocab, eos, schemas, args.batch), args.batch)
    print(f"batch {args.batch}, {len(schemas)} schemas, {os.cpu_count()} CPU cores, vocab {vocab}")
    cols = [
        "setup_s",
        "compile_ms_mean",
        "mask_ms_per_step_mean",
        "mask_ms_per_step_p50",
        "mask_us_per_row_mean",
    ]
    print(f"{'engine':<12}" + "".join(f"{c:>24}" for c in cols))
    for name, r in results.items():
        print(f"{name:<12}" + "".join(f"{r[c]:>24}" for c in cols))
    doc = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {n: version(n) for n in results},
        "batch": args.batch,
        "schemas": [s["name"] for s in schemas],
        "vocab": vocab,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
