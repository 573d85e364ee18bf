"""Incremental detokenization: decode only a short window so multi-byte and SentencePiece
leading-space tokens come out right, without re-decoding the whole output every step."""

from __future__ import annotations

from typing import Any

from actserve.server.engine.sequence import Sequence

PROMPT_CONTEXT = 5  # prompt tokens kept as decoding context for the first output token


def start(seq: Sequence) -> None:
    seq.read_offset = seq.prompt_len
    seq.prefix_offset = max(0, seq.prompt_len - PROMPT_CONTEXT)


def step(tokenizer: Any, seq: Sequence) -> str:
    """Append the text of newly generated tokens to seq.output_text; returns the new piece."""
    ids = seq.all_token_ids
    skip = seq.params.skip_special_tokens
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        piece = full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.output_text += piece
        return piece
    return ""
