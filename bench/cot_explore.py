"""Where does ASC compress SmolLM2-135M-Instruct's answers? A wide dev-split sweep (issue 4).

The committed eval (bench/cot_compression_eval.py) judges a few CoT compression configurations by KL
budget. This script looks wider and faster, on a GPU if there is one: the ASC direction (mean concise −
verbose residual of the 120 template pairs) read at several layers and positions, applied through plain
steering requests with explicit strengths γ, optionally only in a window of generated tokens, at several
layers at once, or on the prompt too. Every configuration answers the same `dev_problems` (their own seed,
disjoint from the training and held-out problems) greedily to EOS or the cap, and its per-token KL is
measured teacher-forced along the unsteered answers to those problems (`KLMeter`, the same definition
the calibration uses). It only explores: what it finds becomes a CoT compression artifact option, and the
committed figures come from the eval script.

    python bench/cot_explore.py --device cuda --out /tmp/explore.json [--problems 200] [--quick]
Prints a table per configuration (γ, KL, mean/median tokens, reduction, at cap, accuracy) and rewrites
the JSON after every configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from actserve.interventions.cot_compression.build import asc_directions, prompt_ids
from actserve.interventions.cot_compression.measure import Continuation, KLMeter, answer_stats, generate
from actserve.interventions.cot_compression.problems import (
    dev_problems,
    train_problems,
)
from actserve.interventions.steering.plugin import SteeringPlugin
from actserve.interventions.steering.schema import SteeringSpec
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.models.default_model import ensure_default_model


@dataclass
class Part:
    """The directions read at `position` for each of `layers`, each scaled by γ·weight / len(layers)."""

    layers: list[int]
    weight: float = 1.0
    position: str = "last"
    window: tuple[int, int | None] | None = None
    phases: list[str] = field(default_factory=lambda: ["generation"])

    def vector(self, dirs: dict[tuple[str, int], torch.Tensor], gamma: float) -> dict[str, Any]:
        return {
            "directions": {str(k): dirs[(self.position, k)].tolist() for k in self.layers},
            "scale": gamma * self.weight / len(self.layers),
            "phases": self.phases,
            "window": None if self.window is None else list(self.window),
        }


@dataclass
class Config:
    """One steering request per problem: every part at strength γ (one vector each)."""

    name: str
    parts: list[Part]
    gammas: list[float]

    def spec(self, dirs: dict[tuple[str, int], torch.Tensor], gamma: float) -> dict[str, Any]:
        return {"vectors": [p.vector(dirs, gamma) for p in self.parts]}


def one(name: str, layer: int, gammas: list[float], **kw: Any) -> Config:
    return Config(name, [Part([layer], **kw)], gammas)


def configs(quick: bool) -> list[Config]:
    if quick:  # a CPU smoke run of the script itself
        return [
            one("L15", 15, [0.5]),
            Config("L12 w0-8 x2 + L15", [Part([12], 2.0, window=(0, 8)), Part([15])], [0.5]),
        ]
    out: list[Config] = []
    # 1st GPU sweep (bench/results/cot_explore_1.json): a window of the first 16 generated tokens at
    # layer 12 shortened the median most (125 -> 74 tokens at γ 1.0), continuous layer 15 steering cut
    # the answers that loop to the cap (31 -> 11 of 200); here: windows around that, and both at once
    for w in (8, 16, 24, 32):
        out.append(one(f"L12 w0-{w}", 12, [0.8, 1.0, 1.25, 1.5], window=(0, w)))
    for k in (10, 11, 13, 14):
        out.append(one(f"L{k} w0-16", k, [0.8, 1.0, 1.25, 1.5], window=(0, 16)))
    for k in (13, 14, 16):
        out.append(one(f"L{k}", k, [0.3, 0.45, 0.6]))
    for ratio in (1.5, 2.0, 2.5, 3.0):
        out.append(
            Config(
                f"L12 w0-16 x{ratio} + L15",
                [Part([12], ratio, window=(0, 16)), Part([15])],
                [0.3, 0.4, 0.5, 0.6],
            )
        )
    out.append(
        Config("L12 w0-16 x2.5 + L15 w16-", [Part([12], 2.5, window=(0, 16)), Part([15], window=(16, None))],
               [0.3, 0.4, 0.5])
    )  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="two tiny configurations (a smoke run)")
    ap.add_argument("--match", default="", help="only configurations whose name matches this regex")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.monotonic()
    engine = LLMEngine(
        EngineConfig(
            model=str(ensure_default_model()), device=args.device, dtype=args.dtype, max_num_seqs=256,
            kv_cache_memory_gb=16.0 if args.device == "cuda" else 2.0,
        )
    )  # fmt: skip
    tok, runner, info = engine.tokenizer, engine.runner, engine.model_info
    train, dev = train_problems(120), dev_problems(args.problems)
    plan = [c for c in configs(args.quick) if re.search(args.match, c.name)]
    dirs: dict[tuple[str, int], torch.Tensor] = {}
    parts = [p for c in plan for p in c.parts]
    for position in dict.fromkeys(p.position for p in parts):
        layers = sorted({k for p in parts if p.position == position for k in p.layers})
        got = asc_directions(runner, tok, train, layers, progress=False, position=position)  # type: ignore[arg-type]
        dirs.update({(position, k): d.direction for k, d in got.items()})
    prompts = [prompt_ids(tok, p.question) for p in dev]
    answers = [p.answer for p in dev]
    base = generate(engine, prompts, args.max_tokens, tag="base")
    along = [Continuation(p, o) for p, o in zip(prompts, base, strict=True)]
    kl_plugin = SteeringPlugin(info, slots=4)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "bench/cot_explore.py", *sys.argv[1:]]),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "problems": len(dev),
        "max_tokens": args.max_tokens,
        "unsteered": answer_stats(tok, base, answers, args.max_tokens),
        "rows": [],
    }
    u = result["unsteered"]
    print(f"unsteered: mean {u['mean_tokens']:.1f} median {u['median_tokens']} at cap {u['hit_cap']} "
          f"acc {u['accuracy']:.1%} first answer {u['first_answer_mean']:.1f}", flush=True)  # fmt: skip
    meter: KLMeter | None = None
    for c in plan:

        def steer(gamma: float, c: Config = c) -> tuple[SteeringPlugin, Any]:
            spec = SteeringSpec.model_validate(c.spec(dirs, gamma))
            return kl_plugin, kl_plugin.prepare(spec, "steering")

        if meter is None:
            meter = KLMeter(runner, info, None, along, cache_bytes=24 << 30, steer=steer)
        meter.set_steer(steer)
        for gamma in c.gammas:
            t = time.monotonic()
            spec = {"steering": c.spec(dirs, gamma)}
            step = 256 // len(c.parts)  # every part takes a steering slot per request, 256 in all
            outs = [
                o
                for i in range(0, len(prompts), step)
                for o in generate(
                    engine,
                    prompts[i : i + step],
                    args.max_tokens,
                    [spec] * len(prompts[i : i + step]),
                    tag=f"{c.name}-{gamma}-{i}-",
                )
            ]
            row = {
                "config": c.name, "parts": [dataclasses.asdict(p) for p in c.parts], "gamma": gamma,
                "kl": meter.kl(gamma),
                **answer_stats(tok, outs, answers, args.max_tokens),
            }  # fmt: skip
            row["reduction_pct"] = 100 * (1 - row["mean_tokens"] / u["mean_tokens"])
            row["seconds"] = time.monotonic() - t
            result["rows"].append(row)
            print(f"{c.name:<26}{gamma:>5.2f} KL {row['kl']:.4f} mean {row['mean_tokens']:6.1f} "
                  f"({row['reduction_pct']:+5.1f}%) med {row['median_tokens']:5.1f} cap {row['hit_cap']:3d}"
                  f" acc {row['accuracy']:.1%} first {row['first_answer_mean']:.1f} [{row['seconds']:.1f}s]",
                  flush=True)  # fmt: skip
            result["seconds"] = time.monotonic() - t0
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
