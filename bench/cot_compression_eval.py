"""Does ASC CoT compression shorten SmolLM2-135M-Instruct's answers to held-out word problems? (issue 4)

Builds the ASC direction from 120 generated verbose/concise solution pairs at each swept layer (one
pass), calibrates γ against per-token KL on 16 training questions (teacher-forced along their unsteered
greedy answers, same 256-token cap), then generates greedy answers (EOS or the cap) to held-out problems
(never used to build or calibrate anything) unsteered and with `{"cot_compression": {"kl_budget": ε}}`
requests through the engine, for every (configuration, ε) swept. Per configuration: mean generated tokens and
the reduction against unsteered, median, answers that hit the cap (mostly loops), accuracy (the final
number parsed from the answer equals the problem's), and the per-token KL actually measured on the
held-out problems at that γ (teacher-forced along the whole unsteered answers), beside the budget. The
headline configuration is chosen by a fixed rule from a dev-split run on problems of their own
(`--split dev`, `--dev-result`, see DEV_NOTE), never from these held-out results; every swept
configuration is reported.

    python bench/cot_compression_eval.py [--sweep "15:0.1,0.3 on12w16x2@15:0.1"] [--problems 200]
    python bench/cot_compression_eval.py --split dev --out /tmp/dev.json --sweep "..."  # dev split first
    python bench/cot_compression_eval.py --dev-result /tmp/dev.json   # held-out; headline from the dev run
A sweep entry is [PREFIX@...]LAYER:BUDGETS, each prefix a name: a POSITION, where the pairs' residuals
are read when building the direction: "last" (end-of-turn token, ASC's choice, the default) or
"solution_mean" (averaged over the solution tokens); a verbose SOURCE: "template" (the English step-by-step
template, the default) or "model" (the model's own greedy answer to the training question, same token cap,
as the ASC paper builds it); "model_cut", for the concise side: the model's own answer cut after the line
with its first final answer, or "model_brief": its answer when the question asks it to be brief (default:
the math-notation template); an ONSET "onLwTxW": the artifact's onset push, the same pairs' direction
read at layer L, added with strength γ·W to the first T generated tokens (artifact.Onset). E.g.
"model@solution_mean@15:0.1,0.3" or "on12w16x2@15:0.1".
`--split dev` runs the same measurement on `dev_problems` (a third seed, disjoint from the training and
held-out problems) instead of the held-out problems. Writes bench/results/cot_compression.json and prints
the table last. float32, on `--device` (cpu or cuda). Measured: the default sweep on 200 problems took
65-105 s per split on an H200; one configuration on 60 problems took 272 s on 2 CPU cores (timings_s
in each JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from actserve.interventions.cot_compression.build import (
    BRIEF_INSTRUCTION,
    CONCISE_SOURCES,
    READ_POSITIONS,
    VERBOSE_SOURCES,
    ConciseSource,
    LayerDirection,
    ReadPosition,
    VerboseSource,
    asc_directions,
    brief_solutions,
    build_artifact,
    calibration_set,
    concise_texts,
    model_solutions,
    prompt_ids,
)
from actserve.interventions.cot_compression.measure import Continuation, KLMeter, answer_stats, generate
from actserve.interventions.cot_compression.problems import (
    cut_after_answer,
    dev_problems,
    heldout_problems,
    train_problems,
)
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.models.default_model import ensure_default_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "cot_compression.json"
DEV_NOTE = (
    "The headline is not picked by hand: with --dev-result DEV.json (the JSON written by `--split dev`: "
    "the same sweep code run on dev_problems, a seed of their own sharing no problem with the training or "
    "held-out sets; calibration on training questions 0-15), it is the swept configuration that, ON THE DEV "
    "SPLIT, reached >= 30% shorter with its measured KL within budget at the smallest KL budget (ties: the "
    "larger dev reduction); if none did, the one with the largest dev reduction within budget. The dev "
    "rows are copied into this file under 'dev'. Without --dev-result there is no headline."
)
DEFAULT_SWEEP = "15:0.1,0.2 on12w16x2@15:0.05,0.1,0.2 on12w16x2.5@15:0.05,0.1,0.2"
CALIB_PROMPTS, CALIB_TOKENS = 16, 256  # as served: KL per token grows along a steered continuation


OnsetSpec = tuple[int, int, float] | None  # (layer, tokens, weight) of an artifact's onset push, or none
Config = tuple[VerboseSource, ConciseSource, ReadPosition, int, OnsetSpec]  # pairs, read-out, layer, onset
Key = tuple[str, str, str, int, OnsetSpec, float]  # a row: a config and its KL budget
KEY_NAMES = ("verbose_source", "concise_source", "position", "layer", "onset", "kl_budget")
ONSET_PREFIX = re.compile(r"on(\d+)w(\d+)x(\d+(?:\.\d+)?)")  # "on12w16x2": layer 12, 16 tokens, weight 2


def sweep(value: str) -> dict[Config, list[float]]:
    """Parse "15:0.02,0.05 model@solution_mean@12:0.05 on12w16x2@15:0.1" into {("template", "template",
    "last", 15, None): [0.02, 0.05], ("model", "template", "solution_mean", 12, None): [0.05], ("template",
    "template", "last", 15, (12, 16, 2.0)): [0.1]} (config: KL budgets; the verbose source, the concise
    source ("model_cut", "model_brief" or the default "template"), the position and an onset push
    ("onLAYERwTOKENSxWEIGHT") are named prefixes)."""
    out: dict[Config, list[float]] = {}
    for part in value.split():
        head, budgets = part.split(":")
        *prefixes, layer = head.split("@")
        source, concise, position = "template", "template", "last"
        onset: OnsetSpec = None
        for name in prefixes:
            if m := ONSET_PREFIX.fullmatch(name):
                onset = (int(m[1]), int(m[2]), float(m[3]))
            elif name in VERBOSE_SOURCES:
                source = name
            elif name in CONCISE_SOURCES:
                concise = name
            elif name in READ_POSITIONS:
                position = name
            else:
                raise argparse.ArgumentTypeError(
                    f"prefix must be a position {READ_POSITIONS}, a verbose source {VERBOSE_SOURCES}, a "
                    f"concise source {CONCISE_SOURCES[1:]} or an onset like on12w16x2, got {name!r}"
                )
        key = (source, concise, position, int(layer), onset)
        out[key] = [float(b) for b in budgets.split(",")]  # type: ignore[index]
    return out


def label(config: Config) -> str:
    source, concise, position, layer, onset = config
    return (
        f"L{layer}"
        + ("" if onset is None else f" +onset L{onset[0]} t<{onset[1]} x{onset[2]:g}")
        + ("" if position == "last" else f" {position}")
        + ("" if source == "template" else f" {source}-verbose")
        + ("" if concise == "template" else f" {concise}-concise")
    )


def row_key(r: dict[str, Any]) -> Key:
    """A row's configuration; rows of runs from before the source options are template ones."""
    onset = r.get("onset")
    return (
        r.get("verbose_source") or "template",
        r.get("concise_source") or "template",
        r["position"],
        r["layer"],
        None if onset is None else (int(onset[0]), int(onset[1]), float(onset[2])),
        r["kl_budget"],
    )


def choose_headline(dev_rows: list[dict[str, Any]], swept: set[Key]) -> Key | None:
    """The DEV_NOTE rule, applied to the rows of a `--split dev` result, among configurations swept here."""
    ok = [r for r in dev_rows if r["kl_budget"] is not None and row_key(r) in swept and r["kl_within_budget"]]
    hits = [r for r in ok if r["reduction_pct"] >= 30]
    best = (
        min(hits, key=lambda r: (r["kl_budget"], -r["reduction_pct"]))
        if hits
        else max(ok, key=lambda r: r["reduction_pct"], default=None)
    )
    return None if best is None else row_key(best)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", type=sweep, default=sweep(DEFAULT_SWEEP), help=f'default "{DEFAULT_SWEEP}"')
    ap.add_argument("--split", choices=["heldout", "dev"], default="heldout", help="problems to answer")
    ap.add_argument("--problems", type=int, default=None, help="held-out: 200 (>= 50); dev: 200")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the engine's device)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--dev-result", type=Path, default=None, help="a --split dev JSON: picks the headline")
    args = ap.parse_args()
    t0 = time.monotonic()
    torch.manual_seed(0)
    engine = LLMEngine(
        EngineConfig(
            model=str(ensure_default_model()), device=args.device, dtype="float32", max_num_seqs=256,
            kv_cache_memory_gb=3.0 if args.device == "cpu" else 16.0,
        )
    )  # fmt: skip
    tok, runner, info = engine.tokenizer, engine.runner, engine.model_info
    train = train_problems(120)
    if args.split == "dev":  # their own seed: neither training nor held-out problems
        held = dev_problems(args.problems or 200)
    else:
        held = heldout_problems(args.problems or 200)
    timings: dict[str, float] = {}

    t = time.monotonic()
    configs: list[Config] = list(args.sweep)
    own: list[str] = []  # the model's own answers to the training questions, generated once if needed
    if any(c[0] == "model" or c[1] == "model_cut" for c in configs):
        own = model_solutions(engine, train, args.max_tokens)
        timings["model_answers"] = time.monotonic() - t
    brief: list[str] = []  # its answers when asked to be brief (model_brief@)
    if any(c[1] == "model_brief" for c in configs):
        brief = brief_solutions(engine, train, args.max_tokens)
        timings["brief_answers"] = time.monotonic() - t
    verbose: dict[str, list[str] | None] = {"template": None, "model": own}
    dirs: dict[Config, LayerDirection] = {}
    at: dict[tuple[str, str, str, int], LayerDirection] = {}  # (kind of pairs, layer) -> direction
    for kind in dict.fromkeys(c[:3] for c in configs):  # one pass per kind of pairs for all its layers
        layers = {c[3] for c in configs if c[:3] == kind}
        layers |= {c[4][0] for c in configs if c[:3] == kind and c[4] is not None}
        got = asc_directions(
            runner, tok, train, sorted(layers), progress=False, position=kind[2], verbose=verbose[kind[0]],
            concise=concise_texts(own, brief, kind[1]), concise_source=kind[1],
        )  # fmt: skip
        at.update({(*kind, layer): got[layer] for layer in layers})
    dirs = {c: at[(*c[:3], c[3])] for c in configs}
    timings["directions"] = time.monotonic() - t
    t = time.monotonic()
    calib = calibration_set(engine, train[:CALIB_PROMPTS], CALIB_TOKENS)
    arts = {
        c: build_artifact(
            engine,
            c[3],
            train=train,
            direction_=dirs[c],
            calib=calib,
            budgets=tuple(args.sweep[c]),
            onset=c[4],
            onset_direction=None if c[4] is None else at[(*c[:3], c[4][0])],
        )  # fmt: skip
        for c in configs
    }
    timings["calibration"] = time.monotonic() - t
    # a budget above what the direction reaches at the largest allowed strength is reported, not run
    budgets = {c: [b for b in args.sweep[c] if b <= arts[c].max_kl] for c in configs}
    unreachable = [
        {"config": label(c), "kl_budget": b, "max_kl": arts[c].max_kl}
        for c in configs
        for b in args.sweep[c]
        if b > arts[c].max_kl
    ]
    for u in unreachable:
        print(
            f"skipped {u['config']} kl_budget={u['kl_budget']}: above max KL {u['max_kl']:.4f}",
            file=sys.stderr,
        )

    prompts = [prompt_ids(tok, p.question) for p in held]
    answers = [p.answer for p in held]
    n = len(prompts)
    rows: list[dict[str, Any]] = []
    base: list[list[int]] = []
    t = time.monotonic()
    for i, c in enumerate(configs):
        # swapped between runs, never while one is in flight
        engine.registry.plugins["cot_compression"].artifact = arts[c]  # type: ignore[attr-defined]
        specs: list[dict[str, Any] | None] = [None] * n if i == 0 else []
        specs += [{"cot_compression": {"kl_budget": b}} for b in budgets[c] for _ in range(n)]
        outs = generate(engine, prompts * (len(specs) // n), args.max_tokens, specs, tag=f"{label(c)}-")
        if i == 0:
            base, outs = outs[:n], outs[n:]
            rows.append({"config": "unsteered", **dict.fromkeys(KEY_NAMES), "gamma": 0.0,
                         **answer_stats(tok, base, answers, args.max_tokens)})  # fmt: skip
        along = [Continuation(p, o) for p, o in zip(prompts, base, strict=True)]
        meter = KLMeter(runner, info, arts[c], along, cache_bytes=(3 if args.device == "cpu" else 24) << 30)
        for k, b in enumerate(budgets[c]):
            gamma = arts[c].gamma_for(b)
            rows.append({
                "config": f"{label(c)} kl_budget={b}", **dict(zip(KEY_NAMES, (*c, b), strict=True)),
                "gamma": gamma, "kl_measured": meter.kl(gamma),
                **answer_stats(tok, outs[k * n : (k + 1) * n], answers, args.max_tokens),
            })  # fmt: skip
    timings["generation_and_kl"] = time.monotonic() - t
    base_mean = rows[0]["mean_tokens"]
    for r in rows:
        r["reduction_pct"] = 100 * (1 - r["mean_tokens"] / base_mean)
        r["kl_within_budget"] = None if r["kl_budget"] is None else r["kl_measured"] <= r["kl_budget"]
    dev = None  # read now, at the end (a dev run may finish while this one runs); missing: no headline
    if args.dev_result and args.dev_result.exists():
        dev = json.loads(args.dev_result.read_text())
    elif args.dev_result:
        print(f"warning: {args.dev_result} not found; no headline", file=sys.stderr)
    swept = {row_key(r) for r in rows[1:]}
    headline = choose_headline(dev["rows"], swept) if dev and dev.get("split") == "dev" else None
    head = next((r for r in rows[1:] if row_key(r) == headline), None)
    timings["total"] = time.monotonic() - t0
    result = {
        "model": "SmolLM2-135M-Instruct (embedded default, float32)",
        "device": "cpu" if args.device == "cpu" else torch.cuda.get_device_name(),
        "command": shlex.join(["python", "bench/cot_compression_eval.py", *sys.argv[1:]]),
        "split": args.split,
        "problems": n,
        "max_tokens": args.max_tokens,
        "train_pairs": len(train),
        "calibration": {"prompts": CALIB_PROMPTS, "max_tokens": CALIB_TOKENS},
        "kl_measured": f"per-token KL at the row's gamma, teacher-forced along the unsteered answers to the "
        f"{args.split} problems (the calibration used training questions 0-{CALIB_PROMPTS - 1})",
        "accuracy": "final number parsed from the answer (after 'answer is'/'Answer:'/'####', else the last "
        "number) equals the problem's; answered = a number was found",
        "headline": None if headline is None else dict(zip(KEY_NAMES, headline, strict=True)),
        "dev_note": DEV_NOTE,
        "headline_row": head,
        "target_met": None
        if head is None
        else bool(head["reduction_pct"] >= 30 and head["kl_within_budget"]),
        "directions": {
            label(c): {**dict(zip(KEY_NAMES, c, strict=False)), **d.stats} for c, d in dirs.items()
        },
        "model_answers": None
        if not own
        else {
            "what": f"greedy answers to the {len(train)} training questions (cap {args.max_tokens} tokens): "
            "the verbose side of model@ pairs; cut after their first final answer, the concise side of "
            "model_cut@ pairs",
            "cut_shorter": sum(cut_after_answer(a) != a for a in own),
            "samples": own[:3],
        },
        "brief_answers": None
        if not brief
        else {
            "what": f"greedy answers to the {len(train)} training questions asked with {BRIEF_INSTRUCTION!r} "
            f"(cap {args.max_tokens} tokens): the concise side of model_brief@ pairs, read after the plain "
            "question",
            "mean_chars": sum(map(len, brief)) / len(brief),
            "samples": brief[:3],
        },
        "artifacts": {
            label(c): {"gammas": a.gammas, "kls": a.kls, "vFv": a.info["calibration"]["vFv"]}
            for c, a in arts.items()
        },
        "rows": rows,
        "unreachable_budgets": unreachable,
        "dev": None
        if dev is None
        else {
            "command": dev["command"],
            "problems": dev["problems"],
            "rows": [{k: v for k, v in r.items() if k != "samples"} for r in dev["rows"]],
        },
        "timings_s": timings,
        "platform": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{args.split} problems: {n}, cap {args.max_tokens} tokens, total {timings['total']:.0f} s")
    print(f"{'config':<36}{'gamma':>7}{'KL measured':>14}{'mean tok':>10}{'reduction':>11}{'median':>8}"
          f"{'at cap':>8}{'accuracy':>10}{'answered':>10}")  # fmt: skip
    for r in rows:
        kl = "" if r["kl_budget"] is None else f"{r['kl_measured']:.4f}/{r['kl_budget']:g}"
        print(f"{r['config']:<36}{r['gamma']:>7.3f}{kl:>14}{r['mean_tokens']:>10.1f}"
              f"{r['reduction_pct']:>10.1f}%{r['median_tokens']:>8.0f}{r['hit_cap']:>8}"
              f"{r['accuracy']:>10.1%}{r['answered']:>10.1%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
