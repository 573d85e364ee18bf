"""Activation-sparsity quality (issue 14): held-out perplexity and greedy agreement vs dense for the four
methods of the `sparsity` plugin (teal, chess, r_sparse, coreinfer) at sparsity levels 0.25 / 0.40 /
0.50 / 0.70 (`--levels`), on TinyStories-656K and SmolLM2-135M-Instruct. CPU, float32.

Calibration: `interventions/sparsity/calibrate.py` (what `actserve sparsity calibrate --text FILE` runs:
TEAL, CHESS and R-Sparse) through our engine on each model's calibration split of bench/data/fp4_quality
(the FP4 bench's text, manifest.json: split and sha256), never on the held-out split it is scored on.
Each site's own level comes from the greedy allocation (allocation.py: probes of every site over the
last PROBE_TOKENS tokens of the calibration split, KL to dense; `--probe-tokens 0`: every site at the
level, the papers' rule). CoreInfer needs none (its token share beta = 0.2 is the paper's default).

- Perplexity: transformers (AutoModelForCausalLM, float32, not our engine) with the tests' independent
  references of each method (tests/engine_utils.py `HFTeal`, tests/sparsity_utils.py `HFChess`,
  `HFRSparse`, `HFCoreInfer`) from the artifact's tables. Teacher forcing as served: the threshold
  methods sparsify every generated token's forward, including the K/V it writes, and keep only the
  prompt dense; here the "prompt" is each sequence's first token, the one not scored. CoreInfer needs a
  prompt to choose its core neurons from: its first CORE_PROMPT tokens (dense), the rest scored with the
  FFN on the core neurons only; its ratio is against dense perplexity over the same positions. Held-out
  sequences as bench/fp4_quality.py cuts them (SmolLM2: windows of 512 tokens of The Rust Programming
  Language; TinyStories: one sampled story per sequence). "ratio_95ci": paired bootstrap over sequences.
  "achieved": the method's achieved sparsity over the scored text: the share of the multiply-adds of its
  sites saved, each site's zero share weighed by its weights' size (TEAL: the four projections; CHESS:
  the q part of qkv, o, the up rows of the masked FFN channels, the down columns of the down input's
  zeros; R-Sparse: the four projections, net of the low-rank path; CoreInfer: the FFN neurons dropped).
  "weights_skipped": the share of all decoder projection weights a decode step at that level need not
  read (levels of different methods skip different amounts: CHESS keeps k, v and gate dense, CoreInfer
  sparsifies the FFN only).
- "top1_agreement": teacher-forced, the share of scored positions where the sparse model's most likely
  next token is the dense model's.
- Greedy agreement: our engine serving the calibration (`--sparsity-calibration`), requests
  `{"sparsity": {"method": m, "level": s}}` vs plain ones: the first PROMPT_TOKENS tokens of held-out
  sequences as prompts (dense prefill, as served), GEN_TOKENS greedy tokens; "agreement" is the share of
  generated positions holding dense's token, "common_prefix" the mean number of tokens before the first
  difference.
- The best method (`ppl_ratio_best_s40_<model>`): chosen before the held-out run, by perplexity ratio at
  0.40 on a slice of the calibration split (SELECT_SEQUENCES), then scored on the held-out split.
- `--dense-quantiles MODELS`: TEAL also at its plain thresholds (no correction for the sparsity upstream).
- `--select-only`: calibration and the selection slice only (every method at every level), written to
  bench/results/sparsity_selection.json (`--out`): where rules are compared; it reads no held-out text.
- `--calibration-cache DIR`: keep each model's calibration as DIR/<model>.safetensors; where one is there
  (made on the same calibration text), reuse its dense histograms, methods' statistics and probe costs
  and make only the allocation and the correction again with the current code (calibrate.py
  `reallocate`): minutes instead of SmolLM2's hour of probes. "calibration_reused" says which it was.

    python bench/sparsity_quality.py [--levels 0.25,0.4,0.5,0.7] [--smollm2-windows 8] [--models ...]
        [--probe-tokens N] [--select-only] [--methods teal,chess] [--calibration-cache DIR] [--out FILE]
Writes bench/results/sparsity_quality.json and prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actserve.interventions.sparsity.allocation import PROBE_LEVELS
from actserve.interventions.sparsity.artifact import (
    SparsityCalibration,
    load_calibration,
    save_calibration,
)
from actserve.interventions.sparsity.calibrate import PROBE_TOKENS, calibrate, reallocate, text_windows
from actserve.interventions.sparsity.coreinfer import TOKEN_FRACTION, core_size
from actserve.interventions.sparsity.plugin import levels
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.offline import generate
from actserve.server.engine.sampling_params import SamplingParams
from actserve.server.models.default_model import ensure_default_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the FP4 bench's data helpers and the tests' references

from bench.fp4_quality import (  # noqa: E402
    DATA,
    TINY,
    WINDOW,
    batches,
    perplexity,
    ratio_interval,
    read_docs,
    sequences,
)
from tests.engine_utils import HFTeal  # noqa: E402
from tests.sparsity_utils import HFChess, HFCoreInfer, HFRSparse  # noqa: E402

OUT = ROOT / "bench" / "results" / "sparsity_quality.json"
SELECT_OUT = ROOT / "bench" / "results" / "sparsity_selection.json"
LEVELS = (0.25, 0.40, 0.50, 0.70)
METHODS = ("teal", "chess", "r_sparse", "coreinfer")
GOAL = 1.05  # issue 14: at 40 %, perplexity within +5 % of dense for the best method
PROMPT_TOKENS, GEN_TOKENS, GREEDY_PROMPTS = 32, 32, 16
CORE_PROMPT = 32  # CoreInfer's prompt in the perplexity runs: the core set comes from these tokens
CORRECTION_TOKENS = {"tinystories": 2048, "smollm2": 1024}  # SmolLM2: 18 levels x 1024 tokens per method
# calibration-split sequences the best method is picked on
SELECT_SEQUENCES = {"tinystories": 24, "smollm2": 3}
Reference = Callable[[float], AbstractContextManager[Any]]


def references(model: Any, cal: SparsityCalibration) -> dict[str, Reference]:
    """method -> (level -> the transformers reference at that level, from the calibration's tables)."""
    lv = levels()
    assert cal.chess is not None and cal.rsparse is not None
    teal, chess = cal.thresholds(lv), cal.chess.thresholds(lv, cal.counts, cal.edges)
    rs_thr, rs_ranks = cal.rsparse.thresholds(lv, cal.edges), cal.rsparse.ranks(lv)
    up_mean, svd = cal.chess.up_mean, {}  # the SVDs once per model, not once per level
    n = model.config.intermediate_size
    return {
        "teal": lambda s: HFTeal(model, teal[round(s * 100)]),
        "chess": lambda s: HFChess(model, chess[round(s * 100)], up_mean),
        "r_sparse": lambda s: HFRSparse(
            model, rs_thr[round(s * 100)], rs_ranks[round(s * 100)], cal.rsparse.alpha, svd=svd
        ),
        "coreinfer": lambda s: HFCoreInfer(model, core_size(s, n), TOKEN_FRACTION, prompt_len=CORE_PROMPT),
    }


def scored(
    model: Any,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    ref: AbstractContextManager[Any] | None,
    start: int,
) -> dict[str, Any]:
    """Per-sequence NLL [n, 2] (sum, count) of the tokens at positions >= start + 1 (predicted from rows >=
    start), the argmax token at those positions, and with a reference the method's achieved sparsity."""
    rows, top1 = [], []
    with torch.inference_mode(), ref or nullcontext() as h:
        for ids, mask in data:
            if h is not None:
                h.valid = mask.reshape(-1).bool()
            logits = model(input_ids=ids, attention_mask=mask).logits[:, start:-1].float()
            target = ids[:, start + 1 :]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            keep = mask[:, start + 1 :].double()
            rows.append(torch.stack([(nll.double() * keep).sum(1), keep.sum(1)], dim=1))
            top1.append(logits.argmax(-1)[mask[:, start + 1 :].bool()])
    out: dict[str, Any] = {"nll": torch.cat(rows), "top1": torch.cat(top1)}
    if h is not None:
        out["achieved"] = h.sparsity()
    return out


GREEDY = SamplingParams(max_tokens=GEN_TOKENS, min_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)


def agreement(
    engine: LLMEngine, prompts: list[list[int]], method: str, level: float, dense: list[list[int]]
) -> dict[str, float]:
    """Greedy tokens of `method` at `level` vs dense ones: share of equal positions, mean common prefix."""
    spec = {"sparsity": {"method": method, "level": level}}
    outs = generate(engine, prompts, GREEDY, [spec] * len(prompts), tag=f"{method}{level}_")
    same = [sum(a == b for a, b in zip(o, d, strict=True)) / len(d) for o, d in zip(outs, dense, strict=True)]
    prefix = []
    for o, d in zip(outs, dense, strict=True):
        k = next((i for i, (a, b) in enumerate(zip(o, d, strict=True)) if a != b), len(d))
        prefix.append(k)
    return {"agreement": sum(same) / len(same), "common_prefix": sum(prefix) / len(prefix)}


def weights_skipped(config: Any, method: str, level: float) -> float:
    """The share of the decoder projections' weights a decode step at `level` need not read, from the
    model's shapes (what makes levels of different methods comparable): TEAL and R-Sparse (its budget)
    s of all; CHESS s of q, o, up and down (k, v, gate stay dense); CoreInfer s of gate, up, down."""
    h, n = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    total = h * (q + 2 * kv) + q * h + 3 * n * h
    part = {"chess": h * q + q * h + 2 * n * h, "coreinfer": 3 * n * h}.get(method, total)
    return round(level * part / total, 4)


def start_of(method: str) -> int:
    return CORE_PROMPT if method == "coreinfer" else 0


def select_best(
    model: Any,
    refs: dict[str, Reference],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    levels_: tuple[float, ...] = (0.40,),
) -> dict:
    """Perplexity ratio at 0.40 of every method on calibration-split sequences; the lowest is the best.
    Other `levels_` (--select-only) are reported beside it, with the achieved sparsity."""
    base = {start: scored(model, data, None, start)["nll"] for start in {start_of(m) for m in METHODS}}
    out: dict[str, Any] = {}
    for s in levels_:
        ratios, achieved = {}, {}
        for m in METHODS:
            got = scored(model, data, refs[m](s), start_of(m))
            ratios[m] = round(perplexity(got["nll"]) / perplexity(base[start_of(m)]), 4)
            achieved[m] = round(got["achieved"], 4)
        out[f"ppl_ratio_s{round(s * 100)}_calibration"] = ratios
        out[f"achieved_s{round(s * 100)}_calibration"] = achieved
    ratios = out["ppl_ratio_s40_calibration"]
    return {**out, "best": min(ratios, key=lambda m: ratios[m])}


def cached_calibration(path: Path, cal_seqs: list[list[int]], probe_tokens: int) -> SparsityCalibration:
    """The kept calibration at `path`, checked to be of this calibration text (its tokens and sequences)
    and made with probes of `probe_tokens` tokens (SystemExit otherwise: delete it to calibrate again)."""
    cal = load_calibration(path)
    tokens, probes = sum(map(len, cal_seqs)), cal.info.get("allocation", {}).get("probe_tokens")
    if (cal.tokens, cal.info.get("sequences"), probes) != (tokens, len(cal_seqs), probe_tokens or None):
        raise SystemExit(
            f"{path}: made on {cal.tokens} tokens in {cal.info.get('sequences')} sequences with {probes} "
            f"probe tokens, not this text's {tokens} in {len(cal_seqs)} with {probe_tokens}: delete it to "
            "recalibrate"
        )
    return cal


def run_model(
    key: str, path: Path, manifest: dict[str, Any], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    split = manifest["split"][key]
    tok = AutoTokenizer.from_pretrained(path)
    windows = args.smollm2_windows if key == "smollm2" else None
    batch = 2 if key == "smollm2" else 8
    held_seqs = sequences(key, tok, read_docs(split["heldout"], manifest), windows)
    if key == "tinystories":  # every k-th story: all four openings
        step = max(1, len(held_seqs) // args.tinystories_stories)
        held_seqs = held_seqs[::step][: args.tinystories_stories]
    heldout = batches(held_seqs, batch)
    calib_docs = read_docs(split["calibration"], manifest)
    # calibration through our engine (float32 CPU), as `actserve sparsity calibrate --text` does
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", num_kv_blocks=1024))
    cal_seqs = text_windows(eng.tokenizer, calib_docs, WINDOW)
    cached = args.calibration_cache / f"{key}.safetensors" if args.calibration_cache else None
    reused = cached is not None and cached.exists()
    if cached is not None and reused:
        cal = reallocate(
            eng, cached_calibration(cached, cal_seqs, args.probe_tokens), cal_seqs,
            CORRECTION_TOKENS[key], progress=False,
        )  # fmt: skip
    else:
        cal = calibrate(
            eng, cal_seqs, correction_tokens=CORRECTION_TOKENS[key], progress=False,
            methods=("chess", "r_sparse"), probe_tokens=args.probe_tokens or None,
        )  # fmt: skip
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_calibration(cal, cached)
    calib_s = time.perf_counter() - t0
    art = tmp / f"{key}.safetensors"
    save_calibration(cal, art)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = references(model, cal)
    t0 = time.perf_counter()
    pick = sequences(key, tok, calib_docs, None)[: SELECT_SEQUENCES[key]]
    selection = select_best(
        model, refs, batches(pick, batch), tuple(args.levels) if args.select_only else (0.40,)
    )
    select_s = time.perf_counter() - t0
    res: dict[str, Any] = {
        "model": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name,
        "data": {split[r]: manifest["files"][split[r]]["sha256"] for r in ("calibration", "heldout")},
        "calibration_tokens": cal.tokens,
        "correction_tokens": cal.info["correction"]["tokens"],
        "calibration_s": round(calib_s, 1),
        "calibration_reused": reused,
        "r_sparse_alpha_mean_by_projection": cal.info["r_sparse"]["alpha_mean_by_projection"],
        "allocation": {k: v for k, v in cal.info.get("allocation", {}).items() if k != "probe_kl"},
        "selection": {**selection, "sequences": len(pick), "seconds": round(select_s, 1)},
        "heldout_sequences": len(held_seqs),
        "methods": {},
    }
    print(f"{key:<12} selection {selection}", flush=True)
    if args.select_only:
        return res
    t0 = time.perf_counter()
    base = {start: scored(model, heldout, None, start) for start in (0, CORE_PROMPT)}
    res["heldout_tokens_scored"] = int(base[0]["nll"][:, 1].sum())
    res["dense_ppl"] = perplexity(base[0]["nll"])
    res["dense_ppl_after_core_prompt"] = perplexity(base[CORE_PROMPT]["nll"])
    # greedy: dense tokens once, then each method and level, on our engine serving the artifact
    served = LLMEngine(
        EngineConfig(model=str(path), device="cpu", dtype="float32", num_kv_blocks=1024,
                     plugin_options={"sparsity": {"calibration": str(art)}})
    )  # fmt: skip
    prompts = [s[:PROMPT_TOKENS] for s in held_seqs[:GREEDY_PROMPTS]]
    dense_tokens = generate(served, prompts, GREEDY, tag="dense")
    runs: list[tuple[str, Reference]] = [(m, refs[m]) for m in args.methods.split(",")]
    if key in args.dense_quantiles.split(","):
        plain = dataclasses.replace(cal, grid=None, quantiles=None).thresholds(levels())
        runs.append(("teal_dense_quantiles", lambda s: HFTeal(model, plain[round(s * 100)])))
    for method, ref in runs:
        rows: dict[str, Any] = {}
        start = start_of(method)
        for s in args.levels:
            got = scored(model, heldout, ref(s), start)
            ppl, dense = perplexity(got["nll"]), base[start]
            row = {
                "ppl": ppl,
                "ppl_ratio": ppl / perplexity(dense["nll"]),
                "ratio_95ci": ratio_interval(got["nll"], dense["nll"]),
                "top1_agreement": round(float((got["top1"] == dense["top1"]).double().mean()), 4),
                "achieved": round(got["achieved"], 4),
                "weights_skipped": weights_skipped(model.config, method.split("_dense")[0], s),
            }
            if method in METHODS:  # served
                row |= {
                    k: round(v, 4) for k, v in agreement(served, prompts, method, s, dense_tokens).items()
                }
            rows[f"{s:.2f}"] = row
            print(f"{key:<12} {method:<20} {s:.2f} x{row['ppl_ratio']:.4f} achieved {got['achieved']:.4f}",
                  flush=True)  # fmt: skip
        res["methods"][method] = rows
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default=",".join(f"{s:g}" for s in LEVELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--smollm2-windows", type=int, default=8, help=f"held-out windows of {WINDOW} tokens")
    ap.add_argument("--tinystories-stories", type=int, default=60, help="held-out stories scored (of 120)")
    ap.add_argument("--models", default="tinystories,smollm2")
    ap.add_argument(
        "--dense-quantiles", default="", help="models also scored at TEAL's uncorrected thresholds"
    )
    ap.add_argument(
        "--probe-tokens", type=int, default=PROBE_TOKENS,
        help="the allocation's probe text (0: every site at the level)",
    )  # fmt: skip
    ap.add_argument("--select-only", action="store_true", help="calibration and the selection slice only")
    ap.add_argument(
        "--calibration-cache", type=Path, default=None,
        help="keep calibrations here; reuse one found there (the allocation and correction made again)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.probe_tokens < 0 or args.probe_tokens == 1:
        ap.error("--probe-tokens: 0 (every site at the level) or at least 2")
    args.out = args.out or (SELECT_OUT if args.select_only else OUT)
    args.levels = [float(x) for x in args.levels.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    manifest = json.loads((DATA / "manifest.json").read_text())
    paths = {"tinystories": TINY, "smollm2": ensure_default_model()}
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            key: run_model(key, paths[key], manifest, args, Path(tmp)) for key in args.models.split(",")
        }
    doc: dict[str, Any] = {
        "command": shlex.join(["python", "bench/sparsity_quality.py", *sys.argv[1:]]),
        "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {n: version(n) for n in ("torch", "transformers")},
        "sparsified": {
            "teal": "the inputs of every decoder projection (q/k/v and gate/up share one threshold)",
            "chess": "q and o projection inputs, FFN channels (per-channel thresholds), then the down input "
            "(threshold on |silu(gate)·up|); k/v and gate dense",
            "r_sparse": "every projection input; the dropped part through the weight's top singular vectors "
            "(score |x|*||W[:, j]||, |x| where alpha = 1)",
            "coreinfer": f"FFN neurons outside the core set of the first {CORE_PROMPT} tokens",
        },
        "allocation": (
            f"each site's own level from a greedy allocation (allocation.py) on probes of every site at "
            f"{list(PROBE_LEVELS)} over the last {args.probe_tokens} tokens of the calibration split (KL to "
            "dense); the level is the multiply-add-weighted share of the method's sites saved"
            if args.probe_tokens
            else "every site at the level (the papers' rule)"
        ),
        "float": "float32; every scored position sparse (CoreInfer: after its prompt)",
        "data_manifest": "bench/data/fp4_quality/manifest.json",
        "data_split": manifest["split"],
        "greedy": {"prompts": GREEDY_PROMPTS, "prompt_tokens": PROMPT_TOKENS, "generated_tokens": GEN_TOKENS},
        "goal": f"at 40 % sparsity, perplexity <= {GOAL} x dense for the best method",
        "best_rule": "lowest perplexity ratio at 0.40 on calibration-split sequences, before held-out runs",
    }
    if args.select_only:
        doc |= {"models": results, "runtime_s": round(time.perf_counter() - started, 1)}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}, {doc['runtime_s']} s")
        for key, r in results.items():
            for k, v in r["selection"].items():
                print(f"{key:<12} {k:<30} {v}")
        return
    for key, r in results.items():
        for method, rows in r["methods"].items():
            for level, row in rows.items():
                doc[f"ppl_ratio_{method}_s{round(float(level) * 100)}_{key}"] = row["ppl_ratio"]
        best = r["selection"]["best"]
        if "0.40" in r["methods"].get(best, {}):
            doc[f"best_method_s40_{key}"] = best
            doc[f"ppl_ratio_best_s40_{key}"] = r["methods"][best]["0.40"]["ppl_ratio"]
    if "ppl_ratio_best_s40_smollm2" in doc:
        doc["goal_met_s40_smollm2"] = doc["ppl_ratio_best_s40_smollm2"] <= GOAL
    doc["models"] = results
    doc["runtime_s"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}, {doc['runtime_s']} s")
    head = ("model", "method", "level", "ppl", "x dense", "95% CI", "achieved", "top1", "greedy")
    print("{:<12} {:<20} {:>5} {:>9} {:>8} {:>19} {:>8} {:>6} {:>6}".format(*head))
    for key, r in results.items():
        print(f"{key:<12} {'dense':<20} {0:>5.2f} {r['dense_ppl']:>9.4f} {1:>8.4f}")
        for method, rows in r["methods"].items():
            for level, f in rows.items():
                lo, hi = f["ratio_95ci"]
                agree = f"{f['agreement']:>6.3f}" if "agreement" in f else f"{'-':>6}"
                print(
                    f"{key:<12} {method:<20} {level:>5} {f['ppl']:>9.4f} {f['ppl_ratio']:>8.4f}  "
                    f"[{lo:.4f}, {hi:.4f}] {f['achieved']:>8.4f} {f['top1_agreement']:>6.3f} {agree}"
                )


if __name__ == "__main__":
    main()
