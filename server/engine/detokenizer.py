"""Incremental detokenization: decode only a short window so multi-byte and SentencePiece
leading-space tokens come out right, without re-decoding the whole output every step. All sequences of
a step are decoded in one call into the Rust tokenizer where possible (the per-step cost at batch 64+)."""

from __future__ import annotations

from typing import Any

from actserve.server.engine.sequence import Sequence

PROMPT_CONTEXT = 5  # prompt tokens kept as decoding context for the first output token


def start(seq: Sequence) -> None:
    seq.read_offset = seq.prompt_len
    seq.prefix_offset = max(0, seq.prompt_len - PROMPT_CONTEXT)


def _decode_many(tokenizer: Any, lists: list[list[int]], skip: bool) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(lists, skip_special_tokens=skip)
    return [tokenizer.decode(ids, skip_special_tokens=skip) for ids in lists]


def step_many(tokenizer: Any, seqs: list[Sequence]) -> None:
    """Append the text of each sequence's newly generated tokens to its output_text."""
    for skip in (True, False):
        group = [s for s in seqs if s.params.skip_special_tokens is skip]
        if not group:
            continue
        ids = [s.all_token_ids for s in group]
        prefixes = _decode_many(
            tokenizer, [t[s.prefix_offset : s.read_offset] for s, t in zip(group, ids, strict=True)], skip
        )
        fulls = _decode_many(tokenizer, [t[s.prefix_offset :] for s, t in zip(group, ids, strict=True)], skip)
        for seq, t, prefix, full in zip(group, ids, prefixes, fulls, strict=True):
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                seq.output_text += full[len(prefix) :]
                seq.prefix_offset, seq.read_offset = seq.read_offset, len(t)


def step(tokenizer: Any, seq: Sequence) -> None:
    step_many(tokenizer, [seq])
