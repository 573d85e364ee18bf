"""uvicorn's access log without the probe noise: a Prometheus scrape and a load balancer's health check
every few seconds would otherwise bury the API requests. `--disable-access-log-for-endpoints` (vLLM's
flag; here it defaults to /health,/metrics) names the paths left out."""

from __future__ import annotations

import logging

ACCESS_LOGGER = "uvicorn.access"
DEFAULT_SKIPPED = "/health,/metrics"


def parse_paths(value: str) -> list[str]:
    """The paths of a comma-separated flag value; '' means none."""
    return [p.strip() for p in value.split(",") if p.strip()]


class SkipPathsFilter(logging.Filter):
    """Drops uvicorn access records whose path (query string ignored) is one of `paths`.

    uvicorn logs `'%s - "%s %s HTTP/%s" %d'` with args (client, method, path, http_version, status)."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.paths = frozenset(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 3 or not isinstance(args[2], str):
            return True
        return args[2].split("?", 1)[0] not in self.paths


def install(paths: list[str], logger: logging.Logger | None = None) -> SkipPathsFilter | None:
    """Filter `paths` out of the access log (after uvicorn has configured its loggers); None when
    there is nothing to filter."""
    if not paths:
        return None
    f = SkipPathsFilter(paths)
    (logger or logging.getLogger(ACCESS_LOGGER)).addFilter(f)
    return f
