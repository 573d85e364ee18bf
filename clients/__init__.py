"""Python clients for actserve: sync/async HTTP clients and typed intervention helpers.

from actserve.clients import ActServeClient, Steering, SteeringVector, extra_body
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
    Intervention,
    Steering,
    SteeringVector,
    build_interventions,
    extra_body,
    vector_body,
)

__all__ = [
    "ActServeClient",
    "ActServeError",
    "AsyncActServeClient",
    "Choice",
    "Completion",
    "Intervention",
    "Options",
    "Steering",
    "SteeringVector",
    "Usage",
    "build_interventions",
    "extra_body",
    "parse_metrics",
    "vector_body",
]
