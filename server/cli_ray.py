"""`actserve serve-ray`: the `serve` flags for every replica, plus the replica counts, on Ray Serve
(server/replicas/). Ray is imported only when the command runs (the `ray` extra)."""

from __future__ import annotations

import argparse
from typing import Any

from actserve.server.cli_http import DEFAULT_SKIPPED, parse_paths
from actserve.server.engine.config import EngineConfig
from actserve.server.replicas.options import Deployment, ReplicaOptions, tensor_parallel_size

# `serve` flags that only the single-process server has (Ray Serve's proxy serves HTTP and logs access)
NOT_ON_RAY = {
    "disable_uvicorn_access_log": (False, "--disable-uvicorn-access-log"),
    "disable_access_log_for_endpoints": (parse_paths(DEFAULT_SKIPPED), "--disable-access-log-for-endpoints"),
}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_ray_parser(sub: Any, serve: argparse.ArgumentParser) -> None:
    """`serve-ray`: every flag of `serve` (each replica's engine and API), then the Ray ones."""
    r = sub.add_parser(
        "serve-ray", parents=[serve], conflict_handler="resolve",
        help="serve N engine replicas behind one endpoint on Ray Serve (needs the ray extra)",
        description="Every `actserve serve` flag applies to each replica; --host/--port are the endpoint's.",
    )  # fmt: skip
    r.add_argument(
        "--ray-address", default=None, metavar="ADDR",
        help="Ray cluster to join ('auto': the local one started by `ray start`); default: start one here",
    )  # fmt: skip
    r.add_argument("--replicas", type=positive, default=None, metavar="N", help="a fixed number of replicas")
    r.add_argument("--min-replicas", type=positive, default=1, metavar="N", help="autoscaling floor (1)")
    r.add_argument("--max-replicas", type=positive, default=1, metavar="N", help="autoscaling ceiling (1)")
    r.add_argument(
        "--target-ongoing-requests", type=float, default=32.0, metavar="R",
        help="autoscaling: Ray Serve adds replicas while each has more ongoing requests than this (32)",
    )  # fmt: skip
    r.add_argument(
        "--max-ongoing-requests", type=positive, default=256, metavar="R",
        help="requests one replica takes at once (the engine batches --max-num-seqs and queues the rest)",
    )  # fmt: skip
    if not any(a.dest == "tensor_parallel_size" for a in serve._actions):
        r.add_argument(
            "--tensor-parallel-size", type=positive, default=1, metavar="N",
            help="GPUs per replica on CUDA (the engine's tensor-parallel size); CPU replicas take none",
        )  # fmt: skip
    r.add_argument(
        "--cpus-per-replica", type=float, default=1.0, metavar="C", help="Ray CPUs a replica holds"
    )
    r.add_argument(
        "--affinity-slack", type=int, default=8, metavar="R",
        help="a request goes to the replica where its prompt prefix or named vector is warm unless that "
        "replica has more than this many ongoing requests above the least loaded one",
    )  # fmt: skip


def deployment(args: argparse.Namespace, config: EngineConfig, api: dict[str, Any]) -> Deployment:
    """The Deployment of `serve-ray`'s flags (refusing `serve` flags that Ray does not use)."""
    for dest, (default, flag) in NOT_ON_RAY.items():
        if getattr(args, dest) != default:
            raise SystemExit(
                f"serve-ray: {flag} is not supported (Ray Serve's HTTP proxy serves the endpoint)"
            )
    low, high = (args.replicas, args.replicas) if args.replicas else (args.min_replicas, args.max_replicas)
    if high < low:
        raise SystemExit(f"serve-ray: --max-replicas ({high}) is below --min-replicas ({low})")
    try:
        replicas = ReplicaOptions(
            min_replicas=low, max_replicas=high, target_ongoing_requests=args.target_ongoing_requests,
            max_ongoing_requests=args.max_ongoing_requests,
            tensor_parallel_size=tensor_parallel_size(config, getattr(args, "tensor_parallel_size", None)),
            cpus_per_replica=args.cpus_per_replica, affinity_slack=args.affinity_slack,
            graceful_shutdown_s=args.shutdown_timeout,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"serve-ray: {e}") from None
    return Deployment(engine=config, api=api, replicas=replicas)


def run(args: argparse.Namespace, config: EngineConfig, api: dict[str, Any]) -> int:
    dep = deployment(args, config, api)
    try:
        from actserve.server.replicas import app
    except ImportError as e:
        raise SystemExit(f"serve-ray needs Ray Serve: pip install 'actserve[ray]' ({e})") from None
    return app.run(dep, args.host, args.port, args.ray_address)
