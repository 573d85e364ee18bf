"""Python clients for actserve: sync/async HTTP clients and typed intervention helpers.

from actserve.clients import ActServeClient, Steering, SteeringVector, Sparsity, TrainVector, extra_body

One builder per intervention (Steering, CoTCompression, Precision, Sparsity, ExpertsPerToken,
KVRetrieval, StructuredOutput, LogitBias); each `to_dict()` is the request's JSON for it.
"""

from actserve.clients.client import (
    ActServeClient,
    ActServeError,
    AsyncActServeClient,
    Choice,
    Completion,
    Options,
    Usage,
    parse_metrics,
)
from actserve.clients.interventions import (
    CoTCompression,
    ExpertsPerToken,
    Intervention,
    KVRetrieval,
    LogitBias,
    Precision,
    Sparsity,
    Steering,
    SteeringVector,
    StructuredOutput,
    build_interventions,
    extra_body,
    vector_body,
)
from actserve.clients.training import TrainVector

__all__ = [
    "ActServeClient",
    "ActServeError",
    "AsyncActServeClient",
    "Choice",
    "CoTCompression",
    "Completion",
    "ExpertsPerToken",
    "Intervention",
    "KVRetrieval",
    "LogitBias",
    "Options",
    "Precision",
    "Sparsity",
    "Steering",
    "SteeringVector",
    "StructuredOutput",
    "TrainVector",
    "Usage",
    "build_interventions",
    "extra_body",
    "parse_metrics",
    "vector_body",
]
