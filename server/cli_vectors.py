"""`actserve vectors train ...`: train a steering vector from example files and write it to a file.

Examples: `--positive FILE --negative FILE` (one example per line; blank lines are skipped; paired by
line unless `--unpaired`) or `--pairs FILE.jsonl` (one `{"positive": ..., "negative": ...}` per line).
The output format follows the suffix of `--out`: `.safetensors` or `.gguf` (repeng / llama.cpp
control vector); both load with `actserve serve --steering-vectors DIR` or `POST /v1/steering/vectors`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_vectors_parser(sub: Any) -> None:
    """Register `vectors train` on the top-level subparsers of `actserve`."""
    v = sub.add_parser("vectors", help="steering vectors: train from examples")
    vsub = v.add_subparsers(dest="vectors_command", required=True)
    t = vsub.add_parser("train", help="train a steering vector (positive minus negative) from examples")
    t.add_argument("--model", default=None, help="local HF folder or hub id (default: embedded SmolLM2-135M)")
    t.add_argument("--positive", type=Path, help="text file, one positive example per line")
    t.add_argument("--negative", type=Path, help="text file, one negative example per line")
    t.add_argument("--pairs", type=Path, help='JSONL file of {"positive": ..., "negative": ...}')
    t.add_argument(
        "--unpaired", action="store_true", help="positive/negative lines are not pairs (mean_diff)"
    )
    t.add_argument("--layers", default="all", help="comma-separated layer indices, or 'all' (default)")
    t.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca_diff"])
    t.add_argument("--position", default="last", choices=["last", "mean"], help="last token or token mean")
    t.add_argument("--name", required=True, help="vector name, stored in the file")
    t.add_argument("--out", required=True, type=Path, help="output file: NAME.safetensors or NAME.gguf")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    t.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass")


def parse_layers(value: str) -> list[int] | None:
    if value.strip().lower() == "all":
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers: comma-separated integers or 'all', got {value!r}") from None


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_pairs(path: Path) -> tuple[list[str], list[str]]:
    positive, negative = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            positive.append(row["positive"])
            negative.append(row["negative"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f'--pairs {path}:{n}: expected {{"positive": ..., "negative": ...}}') from None
    return positive, negative


def examples(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.pairs is not None:
        if args.positive or args.negative or args.unpaired:
            raise ValueError("--pairs: give either --pairs or --positive and --negative (not both)")
        return read_pairs(args.pairs)
    if args.positive is None or args.negative is None:
        raise ValueError("give --pairs FILE.jsonl, or both --positive FILE and --negative FILE")
    return read_lines(args.positive), read_lines(args.negative)


def write_vector(
    path: Path, directions: dict[int, Any], hint: str, name: str, layers: int, meta: dict[str, str]
) -> None:
    from actserve.interventions.steering import formats

    write = {".safetensors": formats.write_safetensors, ".gguf": formats.write_gguf}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(write(directions, hint, name, layers, meta))


def train(args: argparse.Namespace) -> int:
    from actserve.interventions.steering.library import LibraryError, check_name
    from actserve.interventions.steering.train import TrainingError, train_vector
    from actserve.server.engine.config import EngineConfig
    from actserve.server.engine.llm_engine import LLMEngine
    from actserve.server.models.loader import ModelLoadError

    try:
        check_name(args.name, "--name")
        if args.out.suffix not in (".safetensors", ".gguf"):
            raise ValueError(f"--out: the file name must end in .safetensors or .gguf, got {args.out.name!r}")
        positive, negative = examples(args)
        layers = parse_layers(args.layers)
        # an engine, not just the model: its runner's collect mode (on its KV cache) runs the forwards
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
        vec = train_vector(
            engine.runner,
            engine.tokenizer,
            positive,
            negative,
            layers=layers,
            method=args.method,
            position=args.position,
            paired=not args.unpaired,
            batch_tokens=args.batch_tokens,
            max_tokens=engine.model_info.max_model_len,
            progress=True,
        )
        info = engine.model_info
        hint = info.model_type or info.architecture
        write_vector(args.out, vec.directions, hint, args.name, info.num_layers, vec.metadata())
    except (TrainingError, LibraryError, ModelLoadError, ValueError, OSError) as e:
        print(f"actserve vectors train: error: {e}", file=sys.stderr)
        return 2
    print(f"{'layer':>5} {'norm':>10} {'gap':>10} {'sep':>6} {'pair_acc':>8} {'expl_var':>8}")
    for layer, s in sorted(vec.stats.items()):
        cells = [s.separation, s.pair_accuracy, s.explained_variance]
        sep, acc, ev = ("-" if x is None else f"{x:.2f}" for x in cells)
        print(f"{layer:5d} {s.norm:10.4g} {s.projection_gap:10.4g} {sep:>6} {acc:>8} {ev:>8}")
    counts = f"{vec.num_positive} positive, {vec.num_negative} negative"
    print(f"wrote {args.out} ({vec.method}, {len(vec.directions)} layers, {counts})")
    if args.out.suffix == ".gguf" and 0 in vec.directions:
        print("note: llama.cpp refuses direction.0 (it never steers layer 0); repeng and actserve read it")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.vectors_command == "train":
        return train(args)
    raise AssertionError(args.vectors_command)
