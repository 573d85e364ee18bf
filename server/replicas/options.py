"""What a Ray Serve deployment of actserve is made of: each replica's engine config and API options,
and the replica counts. Built from `actserve serve-ray` flags, or from the `args` of a Ray Serve config
file (deploy/ray/serve_config.yaml, KubeRay's serveConfigV2) by `from_builder_args`; no Ray import."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from actserve.server.api.cors import CORSConfig
from actserve.server.engine.config import EngineConfig

# the keys of `args` in a Ray Serve config, besides the engine's fields (under `engine`)
API_KEYS = ("api_key", "max_waiting", "max_request_bytes", "served_names", "cors")


@dataclass(frozen=True)
class ReplicaOptions:
    """Replica counts and sizes. `min_replicas == max_replicas`: a fixed number; else Ray Serve's
    autoscaler keeps each replica's ongoing requests near `target_ongoing_requests`. A replica takes up
    to `max_ongoing_requests` at once (the engine batches and queues them). GPUs per replica: the
    tensor-parallel size on CUDA, none on the CPU. `affinity_slack`: how many more ongoing requests
    the warm replica may have than the least loaded one and still be chosen."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 32.0
    max_ongoing_requests: int = 256
    tensor_parallel_size: int = 1
    cpus_per_replica: float = 1.0
    ingress_replicas: int = 1
    affinity_slack: int = 8
    graceful_shutdown_s: float = 30.0

    def __post_init__(self) -> None:
        checks = [
            (self.min_replicas >= 1, "min_replicas must be >= 1"),
            (self.max_replicas >= self.min_replicas, "max_replicas must be >= min_replicas"),
            (self.target_ongoing_requests > 0, "target_ongoing_requests must be > 0"),
            (self.max_ongoing_requests >= 1, "max_ongoing_requests must be >= 1"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1"),
            (self.cpus_per_replica >= 0, "cpus_per_replica must be >= 0"),
            (self.ingress_replicas >= 1, "ingress_replicas must be >= 1"),
            (self.affinity_slack >= 0, "affinity_slack must be >= 0"),
            (self.graceful_shutdown_s > 0, "graceful_shutdown_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def gpus_per_replica(self, config: EngineConfig) -> int:
        """The tensor-parallel size when the engine runs on CUDA; 0 on the CPU."""
        device = config.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return self.tensor_parallel_size if device.startswith("cuda") else 0


@dataclass(frozen=True)
class Deployment:
    """Everything `app.build` needs: the replicas' engine and API, and the replica options."""

    engine: EngineConfig
    api: dict[str, Any] = field(default_factory=dict)
    replicas: ReplicaOptions = field(default_factory=ReplicaOptions)


def tensor_parallel_size(config: EngineConfig, asked: int | None) -> int:
    """The engine config's `tensor_parallel_size` when it has that field, else `asked` (default 1); both
    given and different is an error."""
    own = getattr(config, "tensor_parallel_size", None)
    if own is not None and asked is not None and own != asked:
        raise ValueError(f"tensor_parallel_size: {asked} given, but the engine config says {own}")
    return int(own if own is not None else asked if asked is not None else 1)


def from_builder_args(args: dict[str, Any]) -> Deployment:
    """A Ray Serve config's `args`: `engine` (EngineConfig fields), the API options (API_KEYS), and
    ReplicaOptions fields. Unknown keys are errors naming the key and what is allowed."""
    args = dict(args)
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    replica_fields = {f.name for f in dataclasses.fields(ReplicaOptions)}
    allowed = {"engine", *API_KEYS, *replica_fields}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"args: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    engine = dict(args.pop("engine", None) or {})
    bad = sorted(set(engine) - engine_fields)
    if bad:
        raise ValueError(f"args.engine: unknown field(s) {bad}; allowed: {sorted(engine_fields)}")
    api = {k: args.pop(k) for k in API_KEYS if k in args}
    if isinstance(api.get("cors"), dict):
        api["cors"] = CORSConfig(**api["cors"])
    config = EngineConfig(**engine)
    asked = args.pop("tensor_parallel_size", None)
    replicas = ReplicaOptions(**args, tensor_parallel_size=tensor_parallel_size(config, asked))
    return Deployment(engine=config, api=api, replicas=replicas)
