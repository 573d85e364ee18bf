"""Batched token sampler with per-row parameters.

One call turns a ``[B, V]`` logits tensor into one token per row. Every stage runs as a batched tensor
op over the rows with per-row parameters as ``[B]`` tensors, and a stage no row uses is skipped, so a
batch of plain requests pays only for a softmax and one random draw. The processing order is vLLM's:

1. ``min_tokens``: eos and ``stop_token_ids`` get ``-inf`` until enough tokens were generated;
2. ``repetition_penalty`` over prompt + output tokens (HF/vLLM: divide positive logits, multiply
   negative ones);
3. ``presence_penalty`` / ``frequency_penalty`` over output tokens (OpenAI's formula);
4. greedy rows take the argmax here; sampled rows are divided by their temperature, then filtered by
   ``top_k``, ``top_p`` and ``min_p`` and sampled.

Sampling uses the exponential race: ``argmax(probs / q)`` with ``q ~ Exponential(1)`` is a draw from
``probs`` (it is the Gumbel-max trick in disguise) that needs no normalisation and no cumulative sum,
and since each row draws its own ``[V]`` noise a seeded request gets the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from actserve.server.engine.sampling_params import SamplingParams

__all__ = ["SamplerOutput", "SamplingRow", "apply_penalties", "sample"]

# Temperatures below this are treated as greedy (as vLLM does): dividing by them would overflow
# float32 logits into inf/nan, and the distribution is a point mass at the argmax anyway.
_GREEDY_EPS = 1e-5


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence at one decoding step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Per-request generator when params.seed is set, on the logits' device (one on another device
    # works but costs a copy); None draws from the default torch generator.
    generator: torch.Generator | None
    # Suppressed, like params.stop_token_ids, while fewer than params.min_tokens tokens were generated.
    # ignore_eos does not matter here: it only affects stopping, which is the scheduler's job.
    eos_token_ids: list[int]


@dataclass
class SamplerOutput:
    """The chosen token per row, with logprobs under the raw (unprocessed) model distribution."""

    token_ids: list[int]
    # log_softmax of the raw logits at the chosen token, per row; None if no row asked for logprobs.
    logprobs: list[float] | None
    # Per row, the params.logprobs most likely (token id, raw logprob), sorted descending; [] for rows
    # that did not ask (or asked for 0). None if no row asked for logprobs.
    top_logprobs: list[list[tuple[int, float]]] | None


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (ties to the lowest id): on CUDA kernels/argmax.py's two launches (torch's
    reduces a vocabulary row in one block, ~27 us on the H200), elsewhere torch's."""
    if x.is_cuda and x.dtype == torch.float32 and x.stride(-1) == 1:
        from actserve.kernels.argmax import argmax_rows

        return argmax_rows(x)
    return x.argmax(dim=-1)


def _row_index(lists: list[list[int]], rows: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Flatten ragged per-row token lists into (row, token) index tensors for one index_put."""
    lengths = [len(ids) for ids in lists]
    row_idx = torch.repeat_interleave(
        torch.tensor(rows, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
    ).to(device)
    tok_idx = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.long, device=device)
    return row_idx, tok_idx


def _apply_penalties_(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place on a float32 ``[B, V]`` tensor: min_tokens suppression, then the three penalties."""
    device = logits.device

    # 1. min_tokens: forbid ending the sequence too early. Ids outside the vocabulary can never be
    # sampled, so there is nothing to suppress (indexing with them would fail the whole batch).
    vocab = logits.shape[1]
    sup_rows: list[int] = []
    sup_ids: list[list[int]] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) < r.params.min_tokens:
            ids = [t for t in (*r.eos_token_ids, *r.params.stop_token_ids) if 0 <= t < vocab]
            if ids:
                sup_rows.append(i)
                sup_ids.append(ids)
    if sup_rows:
        row_idx, tok_idx = _row_index(sup_ids, sup_rows, device)
        logits.index_put_((row_idx, tok_idx), torch.tensor(float("-inf"), device=device))

    # 2. repetition penalty over every token the model has seen in this sequence.
    rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep_rows:
        seen_ids = [[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in rep_rows]
        row_idx, tok_idx = _row_index(seen_ids, rep_rows, device)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen.index_put_((row_idx, tok_idx), torch.tensor(True, device=device))
        penalty = torch.tensor(
            [r.params.repetition_penalty for r in rows], dtype=torch.float32, device=device
        ).unsqueeze(1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalised, logits))

    # 3. presence / frequency penalties over generated tokens only (OpenAI's definition).
    pf_rows = [
        i for i, r in enumerate(rows) if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0
    ]
    if pf_rows and any(rows[i].output_token_ids for i in pf_rows):
        row_idx, tok_idx = _row_index([rows[i].output_token_ids for i in pf_rows], pf_rows, device)
        counts = torch.zeros_like(logits)
        counts.index_put_((row_idx, tok_idx), torch.ones_like(tok_idx, dtype=logits.dtype), accumulate=True)
        freq = torch.tensor([r.params.frequency_penalty for r in rows], dtype=torch.float32, device=device)
        pres = torch.tensor([r.params.presence_penalty for r in rows], dtype=torch.float32, device=device)
        logits -= freq.unsqueeze(1) * counts + pres.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Return a new float32 copy of ``logits`` with min_tokens suppression and the penalties applied.

    These are the stages both greedy and sampled rows go through; temperature and the top-k/top-p/
    min-p filters only shape the sampled distribution.
    """
    return _apply_penalties_(logits.to(torch.float32, copy=True), rows)


def _filter_(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top_k, top_p (in place on float32 ``[n, V]``); returns the probabilities with min_p.

    The returned probabilities are not renormalised after min_p: the exponential race is
    scale-invariant, so zeroing the dropped tokens is enough.
    """
    n, vocab = logits.shape
    device = logits.device

    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        logits.div_(torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1))

    use_k = any(0 < p.top_k < vocab for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if use_k or use_p:
        # Both filters act on the rank order, so do them in sorted space and scatter back once.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if use_k:
            k = torch.tensor(
                [p.top_k if 0 < p.top_k < vocab else vocab for p in params], dtype=torch.long, device=device
            )
            ranks = torch.arange(vocab, device=device)
            sorted_logits.masked_fill_(ranks.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))
        if use_p:
            # Keep a token iff the mass strictly above it is < top_p: the smallest prefix whose mass
            # reaches top_p. The top token has mass 0 above it, so it always survives. Rows with
            # top_p >= 1 get an infinite threshold so float32 rounding of the cumsum cannot drop
            # their tail.
            sorted_probs = sorted_logits.softmax(dim=-1)
            mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
            top_p = torch.tensor(
                [p.top_p if p.top_p < 1.0 else float("inf") for p in params],
                dtype=torch.float32,
                device=device,
            )
            drop = mass_above >= top_p.unsqueeze(1)
            drop[:, 0] = False
            sorted_logits.masked_fill_(drop, float("-inf"))
        logits.scatter_(1, order, sorted_logits)

    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < threshold, 0.0)
    return probs


def _race_noise(rows: list[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
    """Exponential(1) noise ``[n, V]``: each seeded row from its own generator, the rest at once."""
    q = torch.empty(len(rows), vocab, dtype=torch.float32, device=device)
    seeded = [i for i, r in enumerate(rows) if r.generator is not None]
    if not seeded:
        return q.exponential_()
    if len(seeded) < len(rows):
        unseeded = torch.tensor([i for i, r in enumerate(rows) if r.generator is None], device=device)
        q[unseeded] = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=device).exponential_()
    for i in seeded:
        g = rows[i].generator
        assert g is not None
        # Drawn as a fresh [V] tensor so the row's stream does not depend on the batch layout.
        q[i] = torch.empty(vocab, dtype=torch.float32, device=g.device).exponential_(generator=g).to(device)
    return q


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """Choose one token per row of ``logits`` ([B, V], any float dtype; not modified).

    Greedy rows (temperature 0) get exactly the argmax of the penalised logits, ties to the lowest id,
    whatever the sampled rows around them do. Logprobs are taken from the raw logits, as vLLM v1 does.
    """
    return sample_launch(logits, rows).result()


@dataclass
class PendingSample:
    """Sampling whose device work is queued; `result()` waits for it (the engine overlaps the wait)."""

    logits: torch.Tensor
    rows: list[SamplingRow]
    tokens: torch.Tensor | None
    done: SamplerOutput | None = None
    # CUDA: the tokens' copy to pinned host memory, queued right behind the sampling kernels, and an
    # event after it, so waiting for this step does not also wait for a step launched after it
    host_tokens: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None

    def result(self) -> SamplerOutput:
        if self.done is None:
            assert self.tokens is not None
            self.done = _finish_sample(self.logits, self.rows, self.tokens, self.host_tokens, self.ready)
        return self.done


def sample_launch(logits: torch.Tensor, rows: list[SamplingRow]) -> PendingSample:
    """Queue the sampling of one token per row without waiting for the device."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows), V], got {tuple(logits.shape)} for {len(rows)} rows")
    batch, vocab = logits.shape
    device = logits.device
    if batch == 0:
        return PendingSample(
            logits, rows, None, SamplerOutput(token_ids=[], logprobs=None, top_logprobs=None)
        )

    processed = apply_penalties(logits, rows)

    greedy = [r.params.temperature < _GREEDY_EPS for r in rows]
    sampled_idx = [i for i, g in enumerate(greedy) if not g]
    if len(sampled_idx) < batch:
        tokens = _argmax(processed)
    else:
        tokens = torch.empty(batch, dtype=torch.long, device=device)

    if sampled_idx:
        all_sampled = len(sampled_idx) == batch
        idx = torch.tensor(sampled_idx, dtype=torch.long, device=device)
        # Indexing copies, so filtering the sampled rows leaves the greedy rows' logits alone.
        sub = processed if all_sampled else processed[idx]
        sub_rows = rows if all_sampled else [rows[i] for i in sampled_idx]
        probs = _filter_(sub, [r.params for r in sub_rows])
        q = _race_noise(sub_rows, vocab, device)
        # q can be 0 with vanishing probability; clamping keeps 0/0 = nan from winning argmax.
        choice = _argmax(probs.div_(q.clamp_min_(torch.finfo(torch.float32).tiny)))
        if all_sampled:
            tokens = choice
        else:
            tokens[idx] = choice

    if not tokens.is_cuda:
        return PendingSample(logits, rows, tokens)
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return PendingSample(logits, rows, tokens, host_tokens=host, ready=ready)


# what a token the logits rule out (a grammar's mask, logit_bias -100) reports as its logprob: OpenAI's
# value; -inf has no JSON form (a fuzzed request with top_logprobs and a constraint got a 500)
LOGPROB_FLOOR = -9999.0


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of `logits` [rows, vocab], floored at LOGPROB_FLOOR."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1).clamp_(min=LOGPROB_FLOOR)


def _finish_sample(
    logits: torch.Tensor,
    rows: list[SamplingRow],
    tokens: torch.Tensor,
    host_tokens: torch.Tensor | None = None,
    ready: torch.cuda.Event | None = None,
) -> SamplerOutput:
    vocab = logits.shape[1]
    if ready is not None and host_tokens is not None:
        ready.synchronize()  # waits with the GIL released, so the server's event loop runs meanwhile
        token_list: list[int] = host_tokens.tolist()
    else:
        token_list = tokens.tolist()
    want = [r.params.logprobs for r in rows]
    if all(w is None for w in want):
        return SamplerOutput(token_ids=token_list, logprobs=None, top_logprobs=None)

    raw = log_probs(logits)
    chosen: list[float] = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    k_max = min(max(w or 0 for w in want), vocab)
    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    if k_max > 0:
        top_vals, top_ids = raw.topk(k_max, dim=-1, sorted=True)
        vals_list, ids_list = top_vals.tolist(), top_ids.tolist()
        for i, w in enumerate(want):
            if w:
                top[i] = list(zip(ids_list[i][:w], vals_list[i][:w], strict=True))
    return SamplerOutput(token_ids=token_list, logprobs=chosen, top_logprobs=top)
