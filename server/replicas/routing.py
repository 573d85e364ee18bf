"""What a request shares with others, read from its body: the keys a router uses to send it where its
KV is warm. A chain of hashes over the prompt in fixed chunks (a request matches another as deep as
their prompts agree, like the engine's prefix cache over blocks), seeded with the request's
interventions, which change the prompt's KV (the prefix cache keys on them too); then the named
steering vectors it uses. No Ray import: the ingress computes the keys, the router reads them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_KEY = 256  # prompt text per prefix key (token prompts: TOKENS_PER_KEY ids)
TOKENS_PER_KEY = 64
MAX_KEYS = 16  # prompts agree at most this deep for routing (4096 characters / 1024 tokens)
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress hands it to an engine replica (picklable). `keys`: affinity keys,
    most specific first."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    keys: tuple[str, ...] = field(default_factory=tuple)


def _chain(seed: str, parts: list[str]) -> list[str]:
    out, h = [], hashlib.blake2b(seed.encode(), digest_size=12)
    for part in parts:
        h.update(part.encode())
        out.append(h.copy().hexdigest())
    return out


def _prompt_parts(body: dict[str, Any]) -> list[str]:
    """The prompt cut into key-sized pieces: text by characters, token ids by count; chat messages as
    their JSON (role and content in order)."""
    if isinstance(body.get("messages"), list):
        text = json.dumps(body["messages"], sort_keys=True, separators=(",", ":"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of prompts: routed by the first
        if isinstance(prompt, list):
            ids = prompt[: TOKENS_PER_KEY * MAX_KEYS]
            return [
                ",".join(map(str, ids[i : i + TOKENS_PER_KEY])) for i in range(0, len(ids), TOKENS_PER_KEY)
            ]
        if not isinstance(prompt, str):
            return []
        text = prompt
    text = text[: CHARS_PER_KEY * MAX_KEYS]
    full = len(text) - len(text) % CHARS_PER_KEY  # whole chunks only: a partial one is not shared yet
    return [text[i : i + CHARS_PER_KEY] for i in range(0, max(full, 0), CHARS_PER_KEY)] or [text]


def _vector_names(body: dict[str, Any]) -> list[str]:
    steering = (
        (body.get("interventions") or {}).get("steering")
        if isinstance(body.get("interventions"), dict)
        else None
    )
    vectors = steering.get("vectors") if isinstance(steering, dict) else None
    if not isinstance(vectors, list):
        return []
    return sorted({v["name"] for v in vectors if isinstance(v, dict) and isinstance(v.get("name"), str)})


def affinity_keys(path: str, body: bytes) -> tuple[str, ...]:
    """Keys for a generation request (deepest prompt prefix first, then each named vector); () for other
    routes or a body that is not a JSON object (the replica answers it; routing does not care)."""
    if path.rstrip("/") not in ROUTED_PATHS or not body:
        return ()
    try:
        obj = json.loads(body)
    except ValueError:
        return ()
    if not isinstance(obj, dict):
        return ()
    seed = json.dumps([obj.get("model"), obj.get("interventions")], sort_keys=True, default=str)
    prefix = _chain(seed, _prompt_parts(obj))
    return (*[f"p:{k}" for k in reversed(prefix)], *[f"v:{name}" for name in _vector_names(obj)])
