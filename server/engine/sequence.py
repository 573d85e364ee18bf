"""One generated sequence: its tokens, KV blocks, sampling state, timings and incremental text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actserve.server.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    """State the scheduler and runner share; `num_computed` tokens have K/V in `block_table`."""

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    interventions: dict[str, Any] = field(default_factory=dict)  # plugin name -> prepared plan
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    # prefix cache (block_manager.py): what else shapes its prompt's KV (dtype, prompt-phase interventions),
    # the chain keys of its reusable prompt blocks, how many are keyed, the tokens reused at admission
    prefix_extra: tuple = ()
    prefix_keys: list[bytes] = field(default_factory=list)
    prefix_committed: int = 0
    num_cached_tokens: int = 0
    host_checked: int = 0  # blocks before this index were considered for the KV host tier (block_manager)
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_lp_sent: bool = False
    prompt_lp_parts: list[TokenLogprob | None] = field(default_factory=list)  # chunks so far (prefill)
    count_prompt: bool = True  # False for choices 2..n of one request: usage counts the prompt once
    submitted: bool = False  # handed to the engine, which from then on releases its intervention plans
    error: str | None = None  # set when an engine failure ended this sequence (reported to its client)
    final_sent: bool = False  # its last output (finished, or failed) has been built
    # text state (engine thread only)
    output_text: str = ""
    sent_text_len: int = 0
    sent_tokens: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    # timings (time.monotonic)
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_preemptions: int = 0
    # `table_array`'s int32 mirror of `block_table`: the list it mirrors and its first `synced` entries
    # (block_manager.move_to_host, which rewrites entries in place, lowers `table_synced`)
    table_np: np.ndarray | None = field(default=None, repr=False)
    table_src: list[int] | None = field(default=None, repr=False)
    table_synced: int = 0

    def table_array(self) -> np.ndarray:
        """`block_table` as an int32 array (a view; valid until the table next changes). Kept across steps
        and extended by the entries appended since: converting an 8192-entry list costs ~0.1 ms per row
        and step at 128k tokens; a table replaced by another list is converted afresh."""
        table = self.block_table
        n = len(table)
        if self.table_src is not table or self.table_np is None or self.table_synced > n:
            self.table_src, self.table_synced = table, 0
        if self.table_np is None or self.table_np.shape[0] < n:
            grown = np.zeros(
                max(n, 2 * (self.table_np.shape[0] if self.table_np is not None else 0), 16), np.int32
            )
            if self.table_np is not None:
                grown[: self.table_synced] = self.table_np[: self.table_synced]
            self.table_np = grown
        if self.table_synced < n:
            self.table_np[self.table_synced : n] = table[self.table_synced :]
            self.table_synced = n
        return self.table_np[:n]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        return self.prompt_len + (self.params.max_tokens or 0)
