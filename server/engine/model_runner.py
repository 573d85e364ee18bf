"""Turns a scheduled step into one packed forward, then samples one token per sequence."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from actserve.interventions.base import RowSpan
from actserve.interventions.registry import InterventionRegistry
from actserve.server.engine.sampler import SamplingRow, sample
from actserve.server.engine.scheduler import ScheduledBatch
from actserve.server.engine.sequence import Sequence, TokenLogprob
from actserve.server.layers.attention import AttentionBatch, SeqSlice, make_kv_cache
from actserve.server.layers.hooks import StepHooks


@dataclass
class StepResult:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[StepResult]:
    """Run the sampler over one logits row per sequence (shared by every runner)."""
    rows = [
        SamplingRow(
            params=s.params,
            prompt_token_ids=s.prompt_token_ids,
            output_token_ids=s.output_token_ids,
            generator=s.generator,
            eos_token_ids=s.eos_token_ids,
        )
        for s in seqs
    ]
    out = sample(logits, rows)
    results = []
    for i, s in enumerate(seqs):
        lp = None
        if s.params.logprobs is not None and out.logprobs is not None:
            top = out.top_logprobs[i] if out.top_logprobs is not None else []
            lp = TokenLogprob(out.token_ids[i], out.logprobs[i], top)
        results.append(StepResult(s, out.token_ids[i], lp))
    return results


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """logits[i] predicts token i+1; the first prompt token has no logprob (OpenAI returns null)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(token_ids[1:], device=logp.device)
    chosen = logp[:-1].gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k > 0:
        vals, ids = logp[:-1].topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    return [None] + [TokenLogprob(t, c, top) for t, c, top in zip(token_ids[1:], chosen, tops, strict=True)]


class ModelRunner:
    """Owns the native model and its paged KV cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        registry: InterventionRegistry,
    ) -> None:
        spec = model.spec
        self.model, self.block_size, self.device, self.registry = model, block_size, device, registry
        self.kv_caches = make_kv_cache(
            spec.num_layers, num_blocks * block_size, spec.num_kv_heads, spec.head_dim, dtype, device
        )
        self.kv_bytes = sum(t.numel() * t.element_size() for t in self.kv_caches)

    def release(self, seq: Sequence) -> None:
        """Paged KV needs no per-sequence cleanup beyond the block manager's."""

    def _slots(self, seq: Sequence, upto: int) -> torch.Tensor:
        table = torch.tensor(seq.block_table, dtype=torch.long)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        return (table.unsqueeze(1) * self.block_size + offsets).flatten()[:upto]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[StepResult]:
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        slices: list[SeqSlice] = []
        spans: dict[str, list[RowSpan]] = defaultdict(list)
        want_prompt_lp: list[tuple[Sequence, int, int]] = []
        for seq in batch.seqs:
            start = seq.num_computed
            n = seq.num_tokens - start
            row0 = len(ids)
            ids.extend(seq.all_token_ids[start:])
            positions.extend(range(start, seq.num_tokens))
            ctx = self._slots(seq, seq.num_tokens)
            slot_parts.append(ctx[start:])
            slices.append(SeqSlice(row0, n, ctx.to(self.device)))
            for key, plan in seq.interventions.items():
                spans[key].append(RowSpan(plan, row0, n, start, seq.prompt_len))
            if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None and start == 0:
                want_prompt_lp.append((seq, row0, seq.prompt_len))
        attn = AttentionBatch(torch.cat(slot_parts).to(self.device), slices)
        hooks: StepHooks | None = self.registry.step_hooks(spans, len(ids)) if spans else None
        hidden = self.model(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            attn,
            hooks,
        )
        for seq in batch.seqs:
            seq.num_computed = seq.num_tokens
        last_rows = torch.tensor([s.start + s.num_queries - 1 for s in slices], device=self.device)
        logits = self.model.compute_logits(hidden[last_rows])
        for seq, row0, n in want_prompt_lp:
            plog = self.model.compute_logits(hidden[row0 : row0 + n])
            seq.prompt_logprobs = prompt_logprobs(plog, seq.prompt_token_ids, seq.params.prompt_logprobs or 0)
        return sample_rows(logits, batch.seqs)
