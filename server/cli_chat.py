"""`actserve chat`: an interactive terminal client of a running server (like `vllm chat`). Each line read
from standard input is a user message; the reply streams to standard output and joins the conversation.
Intervention flags apply to every turn. `/reset` clears the conversation, `/exit` (or end of input)
quits. Built on the Python client (actserve.clients)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from actserve.clients import (
    ActServeClient,
    ActServeError,
    CoTCompression,
    ExpertsPerToken,
    Intervention,
    KVRetrieval,
    Precision,
    Sparsity,
    Steering,
    SteeringVector,
    StructuredOutput,
    build_interventions,
)


def named_vector(text: str) -> SteeringVector:
    """NAME or NAME:SCALE (a stored vector of the server's library)."""
    name, _, scale = text.partition(":")
    try:
        return SteeringVector(name=name, scale=float(scale) if scale else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:SCALE, got {text!r}") from None


def sparsity(text: str) -> Sparsity:
    method, _, level = text.partition(":")
    try:
        spec = Sparsity(method, float(level))  # type: ignore[arg-type]
        spec.to_dict()
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected METHOD:LEVEL (e.g. teal:0.5): {e}") from None
    return spec


def kv_retrieval(text: str) -> KVRetrieval:
    method, _, budget = text.partition(":")
    try:
        spec = KVRetrieval(method=method or None, budget_tokens=int(budget) if budget else None)  # type: ignore[arg-type]
        spec.to_dict()
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected METHOD[:BUDGET_TOKENS] (e.g. quest:1024): {e}") from None
    return spec


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_chat_parser(sub: Any) -> None:
    c = sub.add_parser("chat", help="chat with a running server from the terminal (interventions by flag)")
    c.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's base URL")
    c.add_argument("--api-key", default=None, help="API key (default: $ACTSERVE_API_KEY)")
    c.add_argument("--model", default=None, help="model name (default: the server's)")
    c.add_argument("--system-prompt", default=None, help="a system message before the conversation")
    c.add_argument(
        "-q", "--quick", default=None, metavar="MESSAGE", help="send one message, print the reply, exit"
    )
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--seed", type=int, default=None)
    i = c.add_argument_group("interventions (every turn)")
    i.add_argument("--steer", type=named_vector, action="append", default=[], metavar="NAME[:SCALE]",
                   help="steer with a stored vector (repeatable)")  # fmt: skip
    cot = i.add_mutually_exclusive_group()
    cot.add_argument("--cot-strength", type=float, default=None, metavar="G", help="cot_compression strength")
    cot.add_argument(
        "--cot-kl-budget", type=float, default=None, metavar="KL", help="cot_compression kl_budget"
    )
    i.add_argument("--precision", default=None, choices=["bf16", "none", "fp4", "nvfp4", "mxfp4"],
                   help="weights the matmuls use")  # fmt: skip
    i.add_argument("--sparsity", type=sparsity, default=None, metavar="METHOD:LEVEL", help="e.g. teal:0.5")
    i.add_argument("--experts-per-token", type=int, default=None, metavar="K", help="MoE top_k")
    i.add_argument("--kv-retrieval", type=kv_retrieval, default=None, metavar="METHOD[:BUDGET]",
                   help="e.g. quest:1024")  # fmt: skip
    out = i.add_mutually_exclusive_group()
    out.add_argument(
        "--json-schema", type=json_object, default=None, metavar="JSON", help="structured output"
    )
    out.add_argument("--regex", default=None, help="structured output: the reply matches this regex")
    out.add_argument("--choice", nargs="+", default=None, help="structured output: the reply is one of these")
    i.add_argument("--interventions", type=json_object, default=None, metavar="JSON",
                   help="any other interventions, as the request's JSON")  # fmt: skip


def interventions(args: argparse.Namespace) -> dict[str, Any] | None:
    """The request's `interventions` from the flags (None: plain)."""
    parts: list[Intervention] = []
    if args.steer:
        parts.append(Steering(args.steer))
    if args.cot_strength is not None or args.cot_kl_budget is not None:
        parts.append(CoTCompression(strength=args.cot_strength, kl_budget=args.cot_kl_budget))
    if args.precision is not None:
        parts.append(Precision(args.precision))
    if args.sparsity is not None:
        parts.append(args.sparsity)
    if args.experts_per_token is not None:
        parts.append(ExpertsPerToken(args.experts_per_token))
    if args.kv_retrieval is not None:
        parts.append(args.kv_retrieval)
    if args.json_schema is not None or args.regex is not None or args.choice is not None:
        parts.append(StructuredOutput(json_schema=args.json_schema, regex=args.regex, choice=args.choice))
    merged = build_interventions(interventions=parts) or {}
    for key, spec in (args.interventions or {}).items():
        if key in merged:
            raise SystemExit(f"chat: intervention {key!r} given by a flag and in --interventions")
        merged[key] = spec
    return merged or None


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    try:
        spec = interventions(args)
    except ValueError as e:
        raise SystemExit(f"chat: {e}") from None
    params = {k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None}
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    history: list[dict[str, Any]] = list(system)
    interactive = stdin.isatty() and args.quick is None
    with ActServeClient(args.url, api_key=args.api_key, model=args.model) as client:
        lines = iter([args.quick]) if args.quick is not None else stdin
        while True:
            if interactive:
                stdout.write("> ")
                stdout.flush()
            line = next(lines, None)
            if line is None:
                break
            message = line.rstrip("\n")
            if message.strip() in ("/exit", "/quit"):
                break
            if message.strip() == "/reset":
                history = list(system)
                continue
            if not message.strip():
                continue
            history.append({"role": "user", "content": message})
            reply = ""
            try:
                for delta in client.stream_chat(
                    history, max_tokens=args.max_tokens, interventions=spec, **params
                ):
                    reply += delta
                    stdout.write(delta)
                    stdout.flush()
            except ActServeError as e:
                history.pop()
                if reply:
                    stdout.write("\n")
                print(f"error: {e}", file=sys.stderr)
                if args.quick is not None or not interactive:
                    return 1
                continue
            stdout.write("\n")
            stdout.flush()
            history.append({"role": "assistant", "content": reply})
    return 0
