"""`actserve cot build --model DIR [--layer L] --out FILE`: the ASC artifact for `serve --cot-compression`.

Heavy imports happen in `run`, so `actserve --help` and `actserve serve` do not pay for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _floats(value: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {value!r}") from None
    if not out or any(not 0 < x < 10 for x in out):
        raise argparse.ArgumentTypeError("KL budgets must lie in (0, 10) nats per token")
    return out


def add_cot_parser(sub: Any) -> None:
    """Register `cot build` on the top-level subparsers of `actserve`."""
    c = sub.add_parser("cot", help="chain-of-thought compression (ASC): build the artifact")
    csub = c.add_subparsers(dest="cot_command", required=True)
    b = csub.add_parser("build", help="direction from generated verbose/concise pairs + KL calibration")
    b.add_argument("--model", default=None, help="local HF folder or hub id (default: embedded SmolLM2-135M)")
    b.add_argument("--layer", type=int, default=None, help="ASC layer L (0-based output of layer L)")
    b.add_argument("--out", required=True, type=Path, help="artifact file to write (.safetensors)")
    b.add_argument("--pairs", type=int, default=120, help="training problems (verbose/concise pairs), >= 100")
    b.add_argument("--calib-prompts", type=int, default=16, help="questions whose continuations calibrate KL")
    b.add_argument("--calib-tokens", type=int, default=256, help="tokens generated per calibration prompt")
    b.add_argument(
        "--position",
        choices=["last", "solution_mean"],
        default="last",
        help="read the pairs' residuals at the last token (ASC) or averaged over the solution tokens",
    )
    b.add_argument(
        "--verbose-source",
        choices=["template", "model"],
        default="template",
        help="verbose side of each pair: the English step-by-step template, or the model's own greedy answer",
    )
    b.add_argument(
        "--verbose-tokens",
        type=int,
        default=256,
        help="token cap of the model's own answers (--verbose-source model, --concise-source model_cut)",
    )
    b.add_argument(
        "--concise-source",
        choices=["template", "model_cut", "model_brief"],
        default="template",
        help="concise side: the math-notation template, the model's own answer cut after its final answer, "
        "or its answer when asked to be brief",
    )
    b.add_argument(
        "--onset-layer",
        type=int,
        default=None,
        help="layer of the onset push on the first generated tokens (default: 2/5 of the depth)",
    )
    b.add_argument("--onset-tokens", type=int, default=None, help="generated tokens it covers (16)")
    b.add_argument("--onset-weight", type=float, default=None, help="onset strength / main strength (2.0)")
    b.add_argument("--no-onset", action="store_true", help="the main push alone (plain ASC)")
    b.add_argument("--budgets", type=_floats, default=None, help="KL budgets to bisect, e.g. 0.05,0.1")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    import logging

    from actserve.interventions.cot_compression.artifact import save_artifact
    from actserve.interventions.cot_compression.build import (
        DEFAULT_BUDGETS,
        DEFAULT_ONSET_TOKENS,
        DEFAULT_ONSET_WEIGHT,
        build_artifact,
        default_layer,
        default_onset_layer,
    )
    from actserve.interventions.cot_compression.problems import train_problems
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.pairs < 100:
        print("error: --pairs must be >= 100", file=sys.stderr)
        return 2
    given = [x for x in (args.onset_layer, args.onset_tokens, args.onset_weight) if x is not None]
    if args.no_onset and given:
        print("error: --no-onset with an --onset-* option", file=sys.stderr)
        return 2
    try:
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
        num_layers = engine.model_info.num_layers
        layer = args.layer if args.layer is not None else default_layer(num_layers)
        onset = (
            None
            if args.no_onset
            else (
                args.onset_layer if args.onset_layer is not None else default_onset_layer(num_layers),
                args.onset_tokens if args.onset_tokens is not None else DEFAULT_ONSET_TOKENS,
                args.onset_weight if args.onset_weight is not None else DEFAULT_ONSET_WEIGHT,
            )
        )
        art = build_artifact(
            engine,
            layer,
            train=train_problems(args.pairs),
            calib_prompts=args.calib_prompts,
            calib_tokens=args.calib_tokens,
            budgets=args.budgets or DEFAULT_BUDGETS,
            position=args.position,
            verbose_source=args.verbose_source,
            verbose_tokens=args.verbose_tokens,
            concise_source=args.concise_source,
            onset=onset,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_artifact(art, args.out)
    summary = {
        "out": str(args.out),
        "model": art.model,
        "layer": art.layer,
        "position": art.info["position"],
        "verbose_source": art.info["verbose_source"],
        "concise_source": art.info["concise_source"],
        "onset": art.info["onset"] and {k: v for k, v in art.info["onset"].items() if k != "direction_stats"},
        "direction": art.info["direction_stats"],
        "calibration": [{"gamma": g, "kl": k} for g, k in zip(art.gammas, art.kls, strict=True)],
    }
    print(json.dumps(summary, indent=2))
    return 0
