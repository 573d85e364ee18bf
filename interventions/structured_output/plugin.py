"""`structured_output`: the output follows a grammar, through the logits hook (docs/architecture.md §6).

Each sequence's plan holds a grammar matcher. Per step, `fill_row_inputs` first advances the matcher
over the tokens the sequence generated since (`RowSpan.output_token_ids`; the plugin declares
`needs_output_tokens`, so with step overlap the engine launches a step's forward early but binds this
logits hook only once the previous token is on the host, just before sampling: the matcher and bitmask
work runs while the GPU computes the forward), then fills the row's next-token bitmask; the logits hook
sets disallowed tokens to -inf.
When the grammar is complete only the stop tokens remain allowed, so the sequence ends with "stop".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from actserve.interventions.base import (
    InterventionError,
    InterventionPlugin,
    LogitsHook,
    PluginHooks,
    RowInput,
    RowInputs,
    RowSpan,
)
from actserve.interventions.structured_output.grammar import GrammarEngine, GrammarError, GrammarTimeout
from actserve.interventions.structured_output.schema import StructuredSpec

log = logging.getLogger(__name__)
MASK = "token_bitmask"


@dataclass
class Plan:
    grammar: Any
    matcher: Any
    consumed: int = 0  # output tokens the matcher has accepted
    broken: bool = False  # a token the grammar refuses was generated: only stop tokens from now on


class MaskHook:
    """Disallowed tokens (bit 0 in the row's bitmask) to -inf; rows holding `none` (all bits 1) keep
    their logits bit for bit. Device ops of fixed shapes only: decode CUDA graphs capture it."""

    def apply(self, logits: torch.Tensor, inputs: RowInputs) -> torch.Tensor:
        bits = inputs[MASK]  # [n, ceil(vocab/32)] int32
        shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(bits.shape[0], -1)[:, : logits.shape[-1]]
        return logits.masked_fill(allowed == 0, float("-inf"))


class StructuredOutputPlugin(InterventionPlugin):
    name = "structured_output"
    description = (
        "Constrain the output to a JSON Schema, any JSON object, a regex, one of a list of strings, or an "
        "EBNF grammar (xgrammar); the API's response_format and guided_* fields map to it."
    )
    hook_points = ("logits",)
    spec_model = StructuredSpec
    graph_safe = True
    tp_mode = "rank0"  # tensor parallelism: logits only: the grammar masks rank 0's logits
    needs_output_tokens = True

    def __init__(self, model_info: Any) -> None:
        super().__init__(model_info)
        width = -(-model_info.vocab_size // 32)
        self.row_inputs = (RowInput(MASK, torch.int32, width, -1),)
        self.engine = GrammarEngine(model_info.path, model_info.vocab_size, list(model_info.eos_token_ids))

    def configure(self, options: Mapping[str, Any]) -> None:
        """Option `max_compile_seconds` (`--max-grammar-compile-seconds`): see GrammarEngine.compile."""
        timeout = options.get("max_compile_seconds")
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"max_compile_seconds must be positive, got {timeout}")
            self.engine.compile_timeout_s = float(timeout)

    def prepare(self, spec: BaseModel, param: str) -> Plan:
        assert isinstance(spec, StructuredSpec)
        if not self.model_info.eos_token_ids:
            raise InterventionError(f"{param}: the model declares no end-of-sequence token", param)
        where = f"{param}.{spec.kind}"
        try:
            grammar = self.engine.compile(spec)
        except GrammarTimeout as e:
            raise InterventionError(f"{where}: the {spec.kind.replace('_', ' ')} {e}", where) from None
        except GrammarError as e:
            raise InterventionError(f"{where}: invalid {spec.kind.replace('_', ' ')}: {e}", where) from None
        return Plan(grammar, self.engine.matcher(grammar))

    def _advance(self, plan: Plan, tokens: Any) -> None:
        """Feed the matcher the sequence's new output tokens (idempotent: counts what it took)."""
        for t in tokens[plan.consumed :]:
            plan.consumed += 1
            if not plan.broken and not plan.matcher.accept_token(int(t)):
                log.warning("structured output: generated token %d is outside the grammar", t)
                plan.broken = True

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        bits = arrays[MASK]
        matchers, rows, plans = [], [], []
        for s in spans:
            plan: Plan = s.plan
            self._advance(plan, s.output_token_ids)
            row = s.start + s.count - 1  # the row whose logits pick the next token
            if plan.broken or plan.matcher.is_terminated():
                self._stop_only(bits, row)
            else:
                matchers.append(plan.matcher)
                rows.append(row)
                plans.append(plan)
        if not matchers:
            return
        self.engine.batch.batch_fill_next_token_bitmask(matchers, torch.from_numpy(bits), rows)
        for row, plan in zip(rows, plans, strict=True):
            if not bits[row].any():  # the vocabulary cannot continue the grammar (a dead end)
                log.warning("structured output: no token of the vocabulary continues the grammar")
                plan.broken = True
                self._stop_only(bits, row)

    def _stop_only(self, bits: np.ndarray, row: int) -> None:
        """Only the stop tokens allowed in `row` (a finished or dead-ended grammar)."""
        bits[row] = 0
        for t in self.model_info.eos_token_ids:
            bits[row, t // 32] |= np.array(1 << (t % 32), dtype=np.uint32).view(np.int32)

    def prefix_key(self, plan: Any) -> None:
        """Logits only: the prompt's KV is a plain request's, so the prefix cache shares it."""
        return None

    def logits_hook(self, spans: list[RowSpan], num_rows: int) -> LogitsHook:
        return MaskHook()

    def graph_hooks(self) -> PluginHooks:
        return PluginHooks(logits=MaskHook())
