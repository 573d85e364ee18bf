"""`actserve serve` flags of the HTTP front (names as vLLM's): model aliases, CORS, the access log."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from actserve.server.access_log import DEFAULT_SKIPPED, parse_paths

if TYPE_CHECKING:
    from actserve.server.api.cors import CORSConfig


def string_list(value: str) -> list[str]:
    """A JSON list of strings (vLLM's form, e.g. '["https://a.example"]') or comma-separated values."""
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
            raise argparse.ArgumentTypeError("must be a JSON list of non-empty strings")
        return items
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("must name at least one value")
    return items


def model_name(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("a served model name must not be empty")
    return value


def add_http_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--served-model-name", nargs="+", type=model_name, default=None, metavar="NAME",
        help="names the model answers to (requests, /v1/models); responses report the name the request "
        "used, else the first (default: the model's folder name or hub id)",
    )  # fmt: skip
    s.add_argument(
        "--allowed-origins", type=string_list, default=None, metavar="ORIGINS",
        help="turn CORS on for these origins (JSON list or comma-separated; '*' for any); off by default",
    )  # fmt: skip
    s.add_argument(
        "--allowed-methods", type=string_list, default=None, metavar="METHODS",
        help="with --allowed-origins: methods allowed cross-origin (default: all)",
    )  # fmt: skip
    s.add_argument(
        "--allowed-headers", type=string_list, default=None, metavar="HEADERS",
        help="with --allowed-origins: request headers allowed cross-origin (default: all)",
    )  # fmt: skip
    s.add_argument(
        "--allow-credentials", action="store_true",
        help="with --allowed-origins: allow cookies and Authorization on cross-origin requests",
    )  # fmt: skip
    s.add_argument(
        "--disable-access-log-for-endpoints", type=parse_paths, default=parse_paths(DEFAULT_SKIPPED),
        metavar="PATHS",
        help=f"comma-separated paths left out of the access log (default: {DEFAULT_SKIPPED}; '' logs all)",
    )  # fmt: skip
    s.add_argument("--disable-uvicorn-access-log", action="store_true", help="no access log at all")


def served_names(args: argparse.Namespace) -> list[str]:
    """--served-model-name without repeats, in order (empty: the engine's default name)."""
    return list(dict.fromkeys(args.served_model_name or []))


def cors_config(args: argparse.Namespace) -> CORSConfig | None:
    """CORS settings, or None (off) without --allowed-origins; the other CORS flags need it."""
    if args.allowed_origins is None:
        extra = [f for f, v in (("--allowed-methods", args.allowed_methods),
                                ("--allowed-headers", args.allowed_headers),
                                ("--allow-credentials", args.allow_credentials)) if v]  # fmt: skip
        if extra:
            raise SystemExit(f"{', '.join(extra)}: needs --allowed-origins (CORS is off without it)")
        return None
    from actserve.server.api.cors import CORSConfig  # the API's imports only when serving

    return CORSConfig(
        origins=args.allowed_origins,
        methods=args.allowed_methods or ["*"],
        headers=args.allowed_headers or ["*"],
        credentials=args.allow_credentials,
    )
