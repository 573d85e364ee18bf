"""`actserve serve ...`: parse flags, start uvicorn, load the model in the background.

Exit codes of `serve`: 0 after SIGTERM/SIGINT (accepted requests drained), 1 when the engine died, 3 when
the model failed to load (or the port was taken); see server/serving.py."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from actserve.interventions.cot_compression.cli import add_cot_parser
from actserve.interventions.cot_compression.cli import run as run_cot
from actserve.interventions.precision.plugin import parse_precisions
from actserve.interventions.sparsity.cli import add_sparsity_parser
from actserve.interventions.sparsity.cli import run as run_sparsity
from actserve.interventions.structured_output.schema import DEFAULT_COMPILE_TIMEOUT_S
from actserve.server import access_log
from actserve.server.cli_chat import add_chat_parser
from actserve.server.cli_chat import run as run_chat
from actserve.server.cli_http import add_http_flags, cors_config, served_names
from actserve.server.cli_ray import add_ray_parser
from actserve.server.cli_ray import run as run_ray
from actserve.server.cli_vectors import add_vectors_parser
from actserve.server.cli_vectors import run as run_vectors
from actserve.server.engine.config import EngineConfig
from actserve.server.version import __version__

if TYPE_CHECKING:
    from fastapi import FastAPI


def positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {n}")
    return n


def positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return x


def non_negative_float(value: str) -> float:
    x = float(value)
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {value}")
    return x


def precisions(value: str) -> str:
    """--precisions "bf16,nvfp4", checked here by the precision plugin's own parser (which reads it again
    from its options), so a typo stops the command line rather than the model load."""
    try:
        parse_precisions(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def fraction(value: str) -> float:
    x = float(value)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return x


def add_expert_flags(s: argparse.ArgumentParser) -> None:
    """Expert offloading of mixture-of-experts models (docs/architecture.md §5, "Expert offloading")."""
    size = s.add_mutually_exclusive_group()
    size.add_argument(
        "--expert-cache-gb", type=positive_float, default=None, metavar="GB",
        help="MoE models: keep every expert in host memory and a device cache of this many GiB of experts "
        "(over all MoE layers); misses are copied or computed on the CPU (refused for other models)",
    )  # fmt: skip
    size.add_argument(
        "--resident-experts", type=fraction, default=None, metavar="F",
        help="MoE models: like --expert-cache-gb, sized as a fraction 0 < F <= 1 of each layer's experts",
    )  # fmt: skip
    s.add_argument(
        "--expert-prefetch-depth", type=non_negative, default=None, metavar="D",
        help="with expert offloading, eager steps (long prompts; every step without zero copy): the routers "
        "of the next D MoE layers predict their experts from the current hidden state and copy them ahead "
        "of need (default 0, plain LRU: measured faster on the H200)",
    )  # fmt: skip
    s.add_argument(
        "--expert-cpu-compute", default=None, choices=["auto", "never", "always"],
        help="with expert offloading, eager steps: compute a missing expert on the CPU instead of copying it "
        "when the measured costs say so (auto, the default), never, or always (no copies after start)",
    )  # fmt: skip
    s.add_argument(
        "--expert-zero-copy", default=None, choices=["auto", "on", "off"],
        help="with expert offloading: decode steps and short prompts read a missing expert straight from "
        "pinned host memory inside the MoE kernel (no host sync, CUDA graphs kept) and the cache is refilled "
        "between steps (on); every step resolves its experts on the host, eagerly (off); auto (default): "
        "on unless --expert-cpu-compute always, or auto and the CPU computes an expert faster than PCIe "
        "carries it",
    )  # fmt: skip
    s.add_argument(
        "--expert-admit-after", type=non_negative, default=None, metavar="N",
        help="with zero copy: copy an expert into a device slot between steps once N consecutive steps "
        "missed it (default 1; 0: never, misses always read from host memory)",
    )  # fmt: skip


def add_lifecycle_flags(s: argparse.ArgumentParser) -> None:
    """Engine threads, stall detection and shutdown (server/serving.py, server/engine/watchdog.py)."""
    s.add_argument(
        "--cpu-threads", type=positive, default=None, metavar="N",
        help="torch threads of the engine (default: $OMP_NUM_THREADS if set, else all cores but one)",
    )  # fmt: skip
    s.add_argument(
        "--engine-stall-timeout", type=positive_float, default=60.0, metavar="S",
        help="/health answers 503 and open requests fail when the engine makes no progress this long",
    )  # fmt: skip
    s.add_argument(
        "--shutdown-timeout", type=positive_float, default=30.0, metavar="S",
        help="on SIGTERM/SIGINT, time for accepted requests to finish before they are aborted",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actserve", description="OpenAI-compatible server with interventions"
    )
    parser.add_argument("--version", action="version", version=f"actserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the HTTP server")
    s.add_argument("--model", default=None, help="local HF folder or hub id (default: embedded SmolLM2-135M)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--max-num-seqs", type=positive, default=64, help="sequences in one running batch")
    s.add_argument("--max-model-len", type=positive, default=None, help="context limit (prompt + output)")
    s.add_argument(
        "--max-num-batched-tokens", type=positive, default=None,
        help="token budget of a step (default 2048 on CUDA, 512 on CPU); longer prompts prefill in chunks",
    )  # fmt: skip
    s.add_argument(
        "--attention-aware-chunks", action=argparse.BooleanOptionalAction, default=None,
        help="beside decodes, a prefill chunk's attention over its context counts against the token budget, "
        "so decodes' inter-token gaps stay flat as a long prompt prefills (default: on for CUDA)",
    )  # fmt: skip
    s.add_argument("--block-size", type=positive, default=16, help="tokens per KV block")
    s.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="reuse the KV of full prompt blocks already computed (keyed by tokens, dtype and prompt-phase "
        "interventions); on by default",
    )  # fmt: skip
    s.add_argument("--num-kv-blocks", type=positive, default=None, help="KV blocks (overrides memory size)")
    s.add_argument(
        "--kv-cache-memory-gb", type=float, default=1.0, help="KV cache size when not given in blocks"
    )
    s.add_argument(
        "--kv-offload-gb", type=non_negative_float, default=0.0,
        help="host tier of the KV cache (GiB, pinned on CUDA): cold blocks of kv_retrieval requests move "
        "there; 0: none",
    )  # fmt: skip
    s.add_argument(
        "--kv-retrieval-slots", type=positive, default=16,
        help="kv_retrieval requests at once (each holds per-sequence state, and with a host tier reserved "
        "GPU blocks)",
    )  # fmt: skip
    s.add_argument(
        "--kv-retrieval-max-budget", type=positive, default=4096,
        help="the largest kv_retrieval budget_tokens a request may ask for (sizes its per-step work)",
    )  # fmt: skip
    s.add_argument(
        "--kv-retrieval-methods", default="actqkv,infllm,quest",
        help="kv_retrieval methods to serve (each keeps a summary per KV block: quest two keys, the others "
        "one shared key; 'none' turns the plugin off and frees that memory)",
    )  # fmt: skip
    s.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="CUDA: share of GPU memory")
    s.add_argument("--enforce-eager", action="store_true", help="CUDA: no decode or prefill CUDA graphs")
    s.add_argument(
        "--cuda-graph-prefill-len", type=non_negative, default=512,
        help="CUDA: a single fresh prompt of up to this many tokens prefills from a CUDA graph (0: never)",
    )  # fmt: skip
    s.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    s.add_argument(
        "--api-key", action="append", default=None,
        help="require 'Authorization: Bearer KEY' on the API routes; repeat for several accepted keys",
    )  # fmt: skip
    s.add_argument(
        "--api-key-file", default=None, metavar="FILE",
        help="accepted API keys, one per line (blank lines and # comments ignored); adds to --api-key",
    )  # fmt: skip
    s.add_argument(
        "--max-request-bytes", type=positive, default=16 * 2**20,
        help="largest request body in bytes (413 beyond it; vector uploads allow 64 MiB)",
    )  # fmt: skip
    s.add_argument(
        "--max-grammar-compile-seconds", type=positive_float, default=DEFAULT_COMPILE_TIMEOUT_S, metavar="S",
        help="a structured-output constraint (response_format, guided_*) whose grammar takes longer to "
        "compile is refused with a 400",
    )  # fmt: skip
    add_http_flags(s)
    s.add_argument(
        "--allow-pickle-weights", action="store_true", help="allow .bin/.pt checkpoints (runs code)"
    )
    s.add_argument("--force-transformers", action="store_true", help="serve through transformers' model")
    s.add_argument(
        "--quantization", default=None, choices=["nvfp4", "mxfp4", "llm-fp4"],
        help="decoder projections in FP4 weights, quantized from the checkpoint at load (round-to-nearest; "
        "W4A16). A compressed-tensors NVFP4 checkpoint loads as NVFP4 without this flag. llm-fp4: "
        "LLM-FP4 W4A4 simulated (fake-quant) for quality, not speed, calibrated at load",
    )  # fmt: skip
    method = s.add_mutually_exclusive_group()
    method.add_argument(
        "--quantization-method", default="rtn", choices=["rtn", "search", "gptq"],
        help="with --quantization nvfp4|mxfp4, how each projection becomes FP4: rtn round-to-nearest with "
        "absmax block scales; search: block scales searched to minimise the projection's output error on "
        "the model's activations over a built-in calibration text; gptq: GPTQ error compensation on those "
        "activations (best quality; both calibrated ones load the dense model first)",
    )  # fmt: skip
    method.add_argument(
        "--quantization-scale-search", dest="quantization_method", action="store_const", const="search",
        help="the same as --quantization-method search (the older spelling)",
    )  # fmt: skip
    add_expert_flags(s)
    s.add_argument("--max-waiting", type=positive, default=4096, help="queued sequences before 429")
    s.add_argument(
        "--steering-vectors",
        default=None,
        metavar="DIR",
        help="folder of named steering vectors (*.safetensors, *.gguf): preloaded; new ones saved there",
    )
    s.add_argument(
        "--cot-compression",
        default=None,
        metavar="FILE|default",
        help="ASC artifact from `actserve cot build`: enables the cot_compression intervention; 'default': "
        "the artifact shipped for the embedded default model (only with no --model)",
    )
    s.add_argument(
        "--precisions", type=precisions, default=None, metavar="LIST",
        help="weights a request may ask for (interventions.precision.weights), comma-separated: bf16 (the "
        "checkpoint's, always there) and FP4 copies of every decoder projection quantized at start, nvfp4 "
        "and/or mxfp4; e.g. bf16,nvfp4 (default: no FP4 copy)",
    )  # fmt: skip
    s.add_argument(
        "--sparsity-calibration", default=None, metavar="FILE",
        help="calibration of the sparsity intervention from `actserve sparsity calibrate` (default: the "
        "model folder's actserve-sparsity.safetensors when there is one; without either, sparsity "
        "requests of the calibrated methods are refused)",
    )  # fmt: skip
    s.add_argument(
        "--sparsity-coreinfer-slots", type=int, default=None, metavar="N",
        help="CoreInfer sparsity requests admitted at once, each holding per-neuron tables of the FFN "
        "(default 64; 0: CoreInfer off)",
    )  # fmt: skip
    s.add_argument(
        "--sparsity-kernel", default="on", choices=["on", "off"],
        help="on CUDA, run sparse decode steps through the sparse GEMV over a transposed copy of every "
        "projection's weight (on, the default: the copy costs the projections' weight memory once more); "
        "off: mask the inputs and multiply densely (same results, no speed-up)",
    )  # fmt: skip
    s.add_argument(
        "--engine-process",
        default="auto",
        choices=["auto", "on", "off"],
        help="run the engine core in its own process (auto: on for CUDA or tensor parallelism, off on CPU)",
    )
    s.add_argument(
        "--tensor-parallel-size", type=positive, default=1, metavar="N",
        help="split the model over N ranks (GPUs; gloo processes on the CPU): heads, KV cache, MLP and "
        "vocabulary sharded, the engine on rank 0. Alone it starts the other N-1 ranks on this host; under "
        "torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) each process is one rank, rank 0 serves HTTP",
    )  # fmt: skip
    s.add_argument(
        "--tp-allreduce", default="nccl", choices=["nccl", "symm_mem"],
        help="with --tensor-parallel-size on CUDA: the all-reduce after attention and MLP, NCCL (captured in "
        "CUDA graphs) or torch's symmetric-memory one-shot all-reduce for messages up to 1 MiB",
    )  # fmt: skip
    add_lifecycle_flags(s)
    s.add_argument("--log-level", default="info")
    add_ray_parser(sub, s)
    add_chat_parser(sub)
    add_vectors_parser(sub)
    add_cot_parser(sub)
    add_sparsity_parser(sub)
    return parser


def plugin_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The intervention plugins' options from their flags (plugin name -> its options)."""
    options: dict[str, dict[str, Any]] = {
        "structured_output": {"max_compile_seconds": args.max_grammar_compile_seconds}
    }
    if args.steering_vectors:
        options["steering"] = {"vectors_dir": args.steering_vectors}
    if args.cot_compression:
        options["cot_compression"] = {"artifact": args.cot_compression}
    if args.precisions:
        options["precision"] = {"precisions": args.precisions}
    if args.sparsity_calibration:
        options["sparsity"] = {"calibration": args.sparsity_calibration}
    if args.sparsity_coreinfer_slots is not None:
        options.setdefault("sparsity", {})["coreinfer_slots"] = args.sparsity_coreinfer_slots
    if args.sparsity_kernel == "off":
        options.setdefault("sparsity", {})["kernel"] = False
    retrieval = {
        "slots": args.kv_retrieval_slots,
        "max_budget_tokens": args.kv_retrieval_max_budget,
        "methods": args.kv_retrieval_methods,
    }
    if args.tensor_parallel_size > 1:  # only flags given (a plugin that cannot run there refuses them)
        defaults = build_parser().parse_args(["serve"])
        retrieval = {
            k: v
            for (k, v), flag in zip(retrieval.items(), RETRIEVAL_FLAGS, strict=True)
            if v != getattr(defaults, flag)
        }
    options["kv_retrieval"] = retrieval
    return options


RETRIEVAL_FLAGS = ("kv_retrieval_slots", "kv_retrieval_max_budget", "kv_retrieval_methods")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        served_model_name=(served_names(args) or [None])[0],
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_aware_chunks=args.attention_aware_chunks,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        kv_offload_gb=args.kv_offload_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        cuda_graph_prefill_len=args.cuda_graph_prefill_len,
        load_format=args.load_format,
        allow_pickle_weights=args.allow_pickle_weights,
        force_transformers=args.force_transformers,
        quantization=args.quantization,
        quantization_method=args.quantization_method,
        expert_cache_gb=args.expert_cache_gb,
        resident_experts=args.resident_experts,
        expert_prefetch_depth=args.expert_prefetch_depth,
        expert_cpu_compute=args.expert_cpu_compute,
        expert_zero_copy=args.expert_zero_copy,
        expert_admit_after=args.expert_admit_after,
        plugin_options=plugin_options(args),
        engine_process=args.engine_process,
        cpu_threads=args.cpu_threads,
        stall_timeout=args.engine_stall_timeout,
        tensor_parallel_size=args.tensor_parallel_size,
        tp_allreduce=args.tp_allreduce,
    )


def read_key_file(path: str) -> list[str]:
    """Keys of an --api-key-file: one per line; blank lines and lines starting with # are skipped."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def api_keys(args: argparse.Namespace) -> list[str]:
    """--api-key (any number) plus the keys of --api-key-file; empty means no authentication."""
    keys = [k for k in args.api_key or [] if k]
    if args.api_key_file:
        try:
            from_file = read_key_file(args.api_key_file)
        except OSError as e:
            raise SystemExit(f"--api-key-file: {e}") from None
        if not from_file:
            raise SystemExit(f"--api-key-file {args.api_key_file}: no keys in the file")
        keys += from_file
    return keys


def build_app(args: argparse.Namespace) -> FastAPI:
    """The app `serve` runs, from its flags (the model loads in the background once it starts)."""
    from actserve.server.api.app import create_app
    from actserve.server.engine.async_engine import make_engine

    config = engine_config(args)
    return create_app(load=lambda: make_engine(config), **app_options(args))


def app_options(args: argparse.Namespace) -> dict[str, Any]:
    """create_app's options besides the engine, from the `serve` flags (also each serve-ray replica's)."""
    return {
        "api_key": api_keys(args),
        "max_waiting": args.max_waiting,
        "max_request_bytes": args.max_request_bytes,
        "served_names": served_names(args),
        "cors": cors_config(args),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "vectors":
        return run_vectors(args)
    if args.command == "cot":
        return run_cot(args)
    if args.command == "sparsity":
        return run_sparsity(args)
    if args.command == "chat":
        return run_chat(args)
    if args.command == "serve-ray":
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        return run_ray(args, engine_config(args), app_options(args))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.tensor_parallel_size > 1 and int(os.environ.get("RANK", "0") or 0) > 0:
        # torchrun started this process as a rank other than 0: it runs the model's shards, no HTTP
        from actserve.server.engine.tp_worker import worker_from_env

        return worker_from_env(engine_config(args))
    import uvicorn

    from actserve.server import serving

    app = build_app(args)
    # h11, not httptools even where installed (ray[serve] brings it): with httptools a non-streamed
    # request whose client hung up is not seen as disconnected (tests/test_api_metrics.py)
    server_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   access_log=not args.disable_uvicorn_access_log, http="h11")  # fmt: skip
    access_log.install(args.disable_access_log_for_endpoints)  # uvicorn.Config has set up its loggers
    return serving.run(app.state.actserve, server_config, args.shutdown_timeout)


if __name__ == "__main__":
    sys.exit(main())
