"""Greedy generation through the engine, and the per-token KL that calibrates and checks γ.

KL definition (calibration and evaluation use the same one): along a fixed UNSTEERED greedy continuation
y of prompt x (teacher forcing), mean over generated positions t >= 2 of
KL(p_γ(· | x, y<t) ‖ p_0(· | x, y<t)) in nats, pooled over all positions of all sequences. Steering acts
on generated positions only (as served), so the first generated token, predicted from the prompt, is
unchanged (KL 0) and left out; so is the distribution after the last token. The steered forward goes
through the plugin's own step hook, so what is measured is exactly what a request gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from actserve.interventions.base import RowSpan
from actserve.interventions.cot_compression.artifact import AscArtifact
from actserve.interventions.cot_compression.plugin import ASC_KEY, CoTCompressionPlugin
from actserve.interventions.cot_compression.schema import CoTCompressionSpec
from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache
from actserve.server.layers.hooks import StepHooks
from actserve.server.models.loader import ModelInfo


def generate(
    engine: Any,
    prompts: list[list[int]],
    max_tokens: int,
    interventions: list[dict[str, Any] | None] | None = None,
    tag: str = "cot",
) -> list[list[int]]:
    """Greedy, stopping at EOS or `max_tokens`; all prompts submitted at once (the engine batches them)."""
    from actserve.server.engine.offline import generate as run_batch
    from actserve.server.engine.sampling_params import SamplingParams

    return run_batch(
        engine, prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), interventions, tag
    )


@dataclass
class Continuation:
    prompt: list[int]
    output: list[int]  # the unsteered greedy continuation


class KLMeter:
    """Teacher-forced mean per-token KL(steered ‖ unsteered) over fixed continuations, for any γ."""

    def __init__(
        self,
        model: torch.nn.Module,
        info: ModelInfo,
        artifact: AscArtifact,
        seqs: list[Continuation],
        batch_tokens: int = 4096,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.model, self.seqs = model, [s for s in seqs if len(s.output) >= 2]
        self.plugin = CoTCompressionPlugin(info)
        self.plugin.context = {ASC_KEY: artifact}
        self.chunks: list[list[int]] = [[]]
        total = 0
        for i, s in enumerate(self.seqs):
            n = len(s.prompt) + len(s.output)
            if self.chunks[-1] and total + n > batch_tokens:
                self.chunks.append([])
                total = 0
            self.chunks[-1].append(i)
            total += n
        self.positions = sum(len(s.output) - 1 for s in self.seqs)
        fits = self.positions * info.vocab_size * 4 <= cache_bytes
        self._base = [self._logprobs(c, 0.0) for c in self.chunks] if fits else None
        self.measured: dict[float, float] = {}

    @torch.inference_mode()
    def _logprobs(self, chunk: list[int], gamma: float) -> torch.Tensor:
        """log p at the scored positions of the chunk's sequences, [positions, vocab] float32."""
        spec = self.model.spec  # type: ignore[attr-defined]
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        seqs = [self.seqs[i] for i in chunk]
        total = sum(len(s.prompt) + len(s.output) for s in seqs)
        cache = make_kv_cache(spec.num_layers, total, spec.num_kv_heads, spec.head_dim, dtype, device)
        plan = self.plugin.prepare(CoTCompressionSpec(strength=gamma), "cot_compression")
        self.plugin.activate(plan)
        slices, spans, rows, ids, pos, start = [], [], [], [], [], 0
        for s in seqs:
            toks = s.prompt + s.output
            n, p = len(toks), len(s.prompt)
            slices.append(SeqSlice(start, n, torch.arange(start, start + n, device=device)))
            spans.append(RowSpan(plan, start, n, 0, p))
            rows.extend(range(start + p, start + n - 1))  # generated positions, but the last
            ids.extend(toks)
            pos.extend(range(n))
            start += n
        hook = self.plugin.residual_hook(spans, total)
        hidden = self.model(
            torch.tensor(ids, device=device),
            torch.tensor(pos, device=device),
            cache,
            AttentionBatch(torch.arange(total, device=device), slices),
            StepHooks([hook]) if hook is not None else None,
        )
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=device)])  # type: ignore[operator]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def kl(self, gamma: float) -> float:
        """Mean per-token KL at strength γ (memoised)."""
        if gamma in self.measured:
            return self.measured[gamma]
        total = 0.0
        for k, chunk in enumerate(self.chunks):
            base = self._base[k] if self._base is not None else self._logprobs(chunk, 0.0)
            steered = self._logprobs(chunk, gamma)
            total += float((steered.exp() * (steered - base)).sum())
        self.measured[gamma] = total / max(self.positions, 1)
        return self.measured[gamma]
