"""Tokenizer work of the API routes, kept off the event loop and bounded before it starts.

A text prompt of C characters needs at least C / (f * L) tokens, where L is the most input characters a
single token can stand for and f the most characters the tokenizer's normalizer can fold into one.
So a prompt longer than max_model_len * f * L characters can never fit the context, and is refused
without tokenizing it (a 2M-character prompt is answered at once). The bound is used only for
tokenizers whose pipeline is known not to drop input (see `chars_per_token`); others are tokenized
without it, still in a worker thread."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool

from actserve.server.api.errors import APIError

log = logging.getLogger(__name__)

INLINE_CHARS = 4096  # texts up to this long are tokenized on the event loop (a thread hop costs more)
# Unicode canonical composition folds at most 4 code points into one (e.g. U+1F82 = 4 code points)
_NORMALIZER_FACTOR = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Prepend": 1}
_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


def _normalizer_factor(spec: dict[str, Any] | None) -> int | None:
    """How many input characters the normalizer may turn into one; None if it may drop text."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            f = _normalizer_factor(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":  # "a" -> "▁" keeps lengths; "ab" -> "c" halves them
        pattern = spec.get("pattern", {}).get("String")
        content = spec.get("content", "")
        return max(1, -(-len(pattern) // len(content))) if pattern and content else None
    return _NORMALIZER_FACTOR.get(kind)


def _keeps_text(spec: dict[str, Any] | None) -> bool:
    """True when the pre-tokenizer only splits (never removes characters, as Whitespace splitting does)."""
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_keeps_text(p) for p in spec.get("pretokenizers", []))
    return spec.get("type") in _PRE_TOKENIZERS and str(spec.get("behavior", "")).lower() != "removed"


def chars_per_token(tokenizer: Any) -> int | None:
    """f * L for this tokenizer (module docstring), or None when no sound bound is known."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an exotic tokenizer: no bound, tokenize everything
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("unk_token") and model.get("fuse_unk")):
        return None  # a fused unknown token may stand for any number of characters
    factor = _normalizer_factor(spec.get("normalizer"))
    if factor is None or not _keeps_text(spec.get("pre_tokenizer")):
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    return factor * longest if longest else None


class PromptEncoder:
    """Text -> token ids for the generation routes: refuse provably-too-long text, tokenize large text
    in a worker thread (the fast tokenizer releases the GIL there)."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        per_token = chars_per_token(tokenizer)
        self.max_chars = None if per_token is None else max_model_len * per_token
        log.info("prompt character bound: %s", self.max_chars or "none (tokenizer not covered)")

    def check_length(self, text: str, param: str) -> None:
        """400 when the character count alone proves the text cannot fit the context."""
        if self.max_chars is not None and len(text) > self.max_chars:
            raise APIError(
                400,
                f"{param}: {len(text)} characters is more than this model's maximum context length of "
                f"{self.max_model_len} tokens can hold (at most {self.max_chars} characters)",
                param,
            )

    async def encode(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        self.check_length(text, param)
        return await self.encode_unbounded(text, add_special_tokens)

    async def encode_unbounded(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize without the context bound (/tokenize counts tokens of any text)."""
        if len(text) <= INLINE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await run_in_threadpool(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
