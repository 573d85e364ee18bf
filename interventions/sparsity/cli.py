"""`actserve sparsity calibrate [--model DIR] [--out FILE]`: the calibration the `sparsity` intervention
needs (histograms of every projection input; artifact.py). Without --out it is written beside the model
(DIR/actserve-sparsity.safetensors), where `actserve serve` finds it.

Heavy imports happen in `run`, so `actserve --help` and `actserve serve` do not pay for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_sparsity_parser(sub: Any) -> None:
    """Register `sparsity calibrate` on the top-level subparsers of `actserve`."""
    s = sub.add_parser("sparsity", help="activation sparsity (TEAL, CHESS, R-Sparse): calibrate a model")
    ssub = s.add_subparsers(dest="sparsity_command", required=True)
    c = ssub.add_parser("calibrate", help="histograms of |x| at every projection input over calibration text")
    c.add_argument("--model", default=None, help="local HF folder or hub id (default: embedded SmolLM2-135M)")
    c.add_argument(
        "--out", type=Path, default=None,
        help="artifact file (default: actserve-sparsity.safetensors in the model folder, where serve looks)",
    )  # fmt: skip
    c.add_argument(
        "--text", type=Path, action="append", default=None, metavar="FILE",
        help="calibration text: JSON lines with a 'text' field, or a plain text file; repeatable "
        "(default: the model's own samples continuing a few fixed openings)",
    )  # fmt: skip
    c.add_argument("--samples", type=int, default=32, help="generated sequences when no --text is given")
    c.add_argument("--sample-tokens", type=int, default=256, help="tokens generated per sequence")
    c.add_argument("--seed", type=int, default=0, help="sampling seed of the generated text")
    c.add_argument("--window", type=int, default=512, help="longest sequence cut from a --text document")
    c.add_argument(
        "--correction-tokens", type=int, default=2048,
        help="calibration tokens that run once per level 0.05..0.90 to correct each projection's threshold "
        "for the sparsity before it (one forward each; 0: none, the dense quantiles)",
    )  # fmt: skip
    c.add_argument(
        "--methods", default="chess,r_sparse",
        help="methods calibrated beside TEAL (whose histograms every calibration makes): chess, r_sparse, "
        "comma-separated, or none (coreinfer needs no calibration)",
    )  # fmt: skip
    c.add_argument(
        "--rank-fraction", type=float, default=0.125,
        help="R-Sparse: the low-rank factors stored per projection, at most this share of its weight's size",
    )  # fmt: skip
    c.add_argument(
        "--probe-tokens", type=int, default=None,
        help="tokens of calibration text each allocation probe reads (one forward per site and probe level: "
        "each site's own level comes from them; default 512 with the correction, which it needs); 0: every "
        "site at the requested level (the papers' rule)",
    )  # fmt: skip
    c.add_argument("--batch-tokens", type=int, default=4096, help="tokens per calibration forward")
    c.add_argument("--device", default="auto", help="auto, cpu or cuda")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    import logging

    from actserve.interventions.sparsity.artifact import default_path, save_calibration
    from actserve.interventions.sparsity.calibrate import (
        PROBE_TOKENS,
        calibrate,
        generated_windows,
        read_texts,
        text_windows,
    )
    from actserve.interventions.sparsity.plugin import levels
    from actserve.server.contract import PROJECTIONS
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (
        min(args.samples, args.sample_tokens, args.window, args.batch_tokens) < 1
        or min(args.correction_tokens, args.probe_tokens or 0) < 0
        or args.probe_tokens == 1
    ):
        print(
            "error: --samples, --sample-tokens, --window, --batch-tokens must be positive; "
            "--correction-tokens at least 0; --probe-tokens 0 or at least 2",
            file=sys.stderr,
        )
        return 2
    if args.probe_tokens and not args.correction_tokens:
        print("error: --probe-tokens needs the correction (--correction-tokens > 0)", file=sys.stderr)
        return 2
    if args.probe_tokens is None:
        args.probe_tokens = PROBE_TOKENS if args.correction_tokens else 0
    methods = tuple(m for m in args.methods.split(",") if m and m != "none")
    if not set(methods) <= {"chess", "r_sparse"} or not 0 < args.rank_fraction <= 1:
        print("error: --methods takes chess, r_sparse or none; --rank-fraction is in (0, 1]", file=sys.stderr)
        return 2
    try:
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
        out = args.out or default_path(engine.model_info.path)
        if args.text:
            window = min(args.window, engine.max_model_len)
            seqs = text_windows(engine.tokenizer, read_texts(args.text), window)
            source: dict[str, Any] = {"text": [str(p) for p in args.text], "window": window}
        else:
            tokens = min(args.sample_tokens, engine.max_model_len - 16)
            seqs = generated_windows(engine, args.samples, tokens, args.seed, None)
            source = {"generated": {"samples": args.samples, "tokens": tokens, "seed": args.seed}}
        cal = calibrate(
            engine, seqs, args.batch_tokens, info={"source": source},
            correction_tokens=args.correction_tokens or None, methods=methods,
            rank_fraction=args.rank_fraction, probe_tokens=args.probe_tokens or None,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_calibration(cal, out)
    except OSError as e:
        hint = "pass --out FILE, then serve with --sparsity-calibration FILE"
        print(f"error: cannot write {out} ({e}); {hint}", file=sys.stderr)
        return 2
    shown = (25, 50, 70)  # level indices: mean threshold over layers, per projection
    at = {f"{i / 100:.2f}": [round(float(t), 5) for t in row.mean(0)] for i, row in zip(
        shown, cal.thresholds(levels()[list(shown)]), strict=True)}  # fmt: skip
    summary = {
        "out": str(out),
        "model": cal.model,
        "tokens": cal.tokens,
        "source": source,
        "mean_threshold_by_projection": {"projections": list(PROJECTIONS), **at},
        "methods": cal.info.get("methods", ["teal"]),
    }
    if cal.rsparse is not None:
        summary["r_sparse_alpha_by_projection"] = cal.info["r_sparse"]["alpha_mean_by_projection"]
    if "allocation" in cal.info:
        key = next(k for k in cal.info["allocation"] if k.startswith("mean_level_by_site"))
        summary[key] = {m: [round(v, 3) for v in row] for m, row in cal.info["allocation"][key].items()}
    print(json.dumps(summary, indent=2))
    return 0
