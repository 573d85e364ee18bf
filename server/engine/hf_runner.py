"""The engine's runner for the transformers fallback (server/models/hf_fallback.py): one transformers
forward per sequence, each with its own transformers KV cache; steering reaches the residual stream
through forward hooks on the decoder layers."""

from __future__ import annotations

from typing import Any

import torch

from actserve.interventions.registry import InterventionRegistry
from actserve.server.contract import RowSpan, StepHooks
from actserve.server.engine.model_runner import PendingStep, StepResult, launch_sampling, token_logprobs
from actserve.server.engine.scheduler import ScheduledBatch
from actserve.server.engine.sequence import Sequence
from actserve.server.models.hf_fallback import find_decoder_layers


class HFRunner:
    """Runs one transformers forward per sequence; keeps each sequence's transformers KV cache."""

    def __init__(self, model: torch.nn.Module, num_layers: int, registry: InterventionRegistry) -> None:
        self.model, self.registry = model, registry
        self.device = next(model.parameters()).device
        self.caches: dict[str, Any] = {}
        self.kv_bytes = 0
        self._hooks: StepHooks | None = None
        for i, layer in enumerate(find_decoder_layers(model, num_layers)):
            layer.register_forward_hook(self._make_hook(i))

    def _make_hook(self, index: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
            if not self._hooks:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            steered = self._hooks.apply_all(index, hidden[0]).unsqueeze(0)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def release(self, seq: Sequence) -> None:
        self.caches.pop(seq.seq_id, None)

    def collect(self, token_lists: list[list[int]], layers: Any = (), **_: Any) -> Any:
        """Collect mode (residual reads, teacher-forced logits) is native-only: its callers (vector
        training, `cot build`, KL measurement) check for the native model first and refuse the fallback."""
        raise NotImplementedError(
            "collect mode needs the native model implementation; this model runs through the transformers "
            "fallback"
        )

    def execute(self, batch: ScheduledBatch) -> list[StepResult]:
        return self.launch(batch).collect()

    def launch(self, batch: ScheduledBatch) -> PendingStep:
        sampled, partial = batch.sampled, batch.partial  # before the forwards move num_computed
        step = launch_sampling(self._forward(batch), sampled)
        step.partial = partial
        return step

    @torch.inference_mode()
    def _forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """Each sequence's own forward over its chunk (a decode: its last token); the last-position logits
        of those that reach their last token."""
        from transformers import DynamicCache

        last_logits = []
        for seq, chunk in zip(batch.seqs, batch.chunks + [1] * len(batch.decodes), strict=True):
            start = seq.num_computed
            end = start + chunk
            if start == 0 or seq.seq_id not in self.caches:
                start = 0
                self.caches[seq.seq_id] = DynamicCache()
            ids = torch.tensor([seq.all_token_ids[start:end]], device=self.device)
            n = ids.shape[1]
            spans = {
                k: [RowSpan(plan, 0, n, start, seq.prompt_len, seq.output_token_ids)]
                for k, plan in seq.interventions.items()
            }
            hooks = self.registry.step_hooks(spans, n) if spans else None
            self._hooks = hooks
            try:
                out = self.model(
                    input_ids=ids,
                    position_ids=torch.arange(start, start + n, device=self.device).unsqueeze(0),
                    past_key_values=self.caches[seq.seq_id],
                    use_cache=True,
                )
            finally:
                self._hooks = None
            logits = out.logits[0].float()
            if hooks is not None and hooks.logits:  # plugins' logits hooks (all n rows are this sequence's)
                logits = hooks.apply_logits(logits)
            if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None:
                if start == 0:
                    seq.prompt_lp_parts = [None]  # the first prompt token has none
                stop = min(end, seq.prompt_len - 1)  # rows [start, stop) predict tokens start+1 .. stop
                if stop > start:
                    targets = seq.prompt_token_ids[start + 1 : stop + 1]
                    k = seq.params.prompt_logprobs
                    seq.prompt_lp_parts += token_logprobs(logits[: stop - start], targets, k)
                if len(seq.prompt_lp_parts) == seq.prompt_len:
                    seq.prompt_logprobs, seq.prompt_lp_parts = seq.prompt_lp_parts, []
            seq.num_computed = end
            if end == seq.num_tokens:
                last_logits.append(logits[-1])
        if not last_logits:
            return torch.zeros(0, 1, device=self.device)  # every chunk was partial: nothing to sample
        return torch.stack(last_logits)
