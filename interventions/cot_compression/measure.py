"""Greedy generation through the engine, and the per-token KL that calibrates and checks γ.

KL definition (calibration and evaluation use the same one): along a fixed UNSTEERED greedy continuation
y of prompt x (teacher forcing), mean over generated positions t >= 2 of
KL(p_γ(· | x, y<t) ‖ p_0(· | x, y<t)) in nats, pooled over all positions of all sequences. Steering acts
on generated positions only (as served), so the first generated token, predicted from the prompt, is
unchanged (KL 0) and left out; so is the distribution after the last token. The steered forward goes
through the plugin's own step hook, so what is measured is exactly what a request gets, and the forwards
are the engine's own (`ModelRunner.collect` on the serving KV cache, with borrowed free blocks).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from actserve.interventions.base import RowSpan
from actserve.interventions.cot_compression.artifact import AscArtifact
from actserve.interventions.cot_compression.plugin import CoTCompressionPlugin
from actserve.interventions.cot_compression.problems import cut_after_answer, parse_answer
from actserve.interventions.cot_compression.schema import CoTCompressionSpec
from actserve.server.contract import ModelInfo


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


def answer_stats(tok: Any, outs: list[list[int]], answers: list[int], cap: int) -> dict[str, Any]:
    """How long generated answers are and how many are right: mean/median tokens, answers at the token
    cap (mostly loops), tokens up to the end of the line with the first final answer (all, if none),
    accuracy (the parsed final number equals the problem's), answered (a number was found), 3 samples."""
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    parsed = [parse_answer(t) for t in texts]
    lens = [len(o) for o in outs]
    firsts = [
        n if cut_after_answer(t) == t else len(tok.encode(cut_after_answer(t), add_special_tokens=False))
        for n, t in zip(lens, texts, strict=True)
    ]
    return {
        "mean_tokens": statistics.mean(lens),
        "median_tokens": statistics.median(lens),
        "hit_cap": sum(n >= cap for n in lens),
        "first_answer_mean": statistics.mean(firsts),
        "accuracy": sum(p == a for p, a in zip(parsed, answers, strict=True)) / len(answers),
        "answered": sum(p is not None for p in parsed) / len(answers),
        "samples": texts[:3],
    }


@dataclass
class Continuation:
    prompt: list[int]
    output: list[int]  # the unsteered greedy continuation


UPPER_Z = 1.645  # one-sided 95 % normal quantile
Steer = Callable[[float], tuple[Any, Any]]  # γ -> (plugin with a residual_hook, its prepared plan)


def asc_steer(info: ModelInfo, artifact: AscArtifact) -> Steer:
    """γ -> the CoT compression plugin's plan at strength γ, exactly as a request gets it."""
    plugin = CoTCompressionPlugin(info)
    plugin.artifact = artifact
    return lambda gamma: (plugin, plugin.prepare(CoTCompressionSpec(strength=gamma), "cot_compression"))


class KLMeter:
    """Teacher-forced mean per-token KL(steered ‖ unsteered) over fixed continuations, for any γ.

    `runner` is the engine's native runner (`engine.runner`; its collect mode runs the forwards).
    `steer` makes the steered forward's plan for a γ (default: the artifact's CoT compression plan);
    bench/cot_explore.py passes other ones (windows, several layers) to measure them the same way."""

    def __init__(
        self,
        runner: Any,
        info: ModelInfo,
        artifact: AscArtifact | None,
        seqs: list[Continuation],
        batch_tokens: int = 4096,
        cache_bytes: int = 1 << 30,
        steer: Steer | None = None,
        z: float = UPPER_Z,
    ) -> None:
        self.runner, self.seqs = runner, [s for s in seqs if len(s.output) >= 2]
        self.batch_tokens = batch_tokens
        if steer is None:
            if artifact is None:
                raise ValueError("KLMeter needs an artifact or a steer function")
            steer = asc_steer(info, artifact)
        self.steer, self.z = steer, z
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
        self._sums: dict[float, torch.Tensor] = {}
        self.measured: dict[float, float] = {}  # γ -> mean per-token KL
        self.upper: dict[float, float] = {}  # γ -> its upper confidence bound (`kl_upper`)

    @torch.inference_mode()
    def _logprobs(self, chunk: list[int], gamma: float) -> torch.Tensor:
        """log p at the scored positions of the chunk's sequences, [positions, vocab] float32."""
        seqs = [self.seqs[i] for i in chunk]
        plugin, plan = self.steer(gamma)

        def hooks(rows: list[Any], num_rows: int) -> list[Any]:
            spans = [RowSpan(plan, r.row0, r.num_rows, 0, len(seqs[r.index].prompt)) for r in rows]
            hook = plugin.residual_hook(spans, num_rows)
            return [hook] if hook is not None else []

        plugin.activate(plan)
        try:
            got = self.runner.collect(
                [s.prompt + s.output for s in seqs],
                logit_positions=[range(len(s.prompt), len(s.prompt) + len(s.output) - 1) for s in seqs],
                hooks=hooks,
                max_tokens=self.batch_tokens,
            )  # generated positions, but the last
        finally:
            plugin.release(plan)
        return torch.log_softmax(got.logits.float(), dim=-1)  # on the model's device (a GPU keeps the cache)

    def set_steer(self, steer: Steer) -> None:
        """Measure another steering from now on (the unsteered log-probabilities stay cached)."""
        self.steer = steer
        self._sums, self.measured, self.upper = {}, {}, {}

    def per_sequence(self, gamma: float) -> torch.Tensor:
        """Each sequence's summed KL over its scored positions at strength γ, [sequences] float64
        (memoised)."""
        if gamma not in self._sums:
            sums: list[torch.Tensor] = []
            for k, chunk in enumerate(self.chunks):
                base = self._base[k] if self._base is not None else self._logprobs(chunk, 0.0)
                steered = self._logprobs(chunk, gamma)
                per_row = (steered.exp() * (steered - base)).sum(-1).double().cpu()
                sums.extend(x.sum() for x in per_row.split([len(self.seqs[i].output) - 1 for i in chunk]))
            self._sums[gamma] = torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)
        return self._sums[gamma]

    def kl(self, gamma: float) -> float:
        """Mean per-token KL at strength γ, pooled over all scored positions (memoised)."""
        if gamma not in self.measured:
            self.measured[gamma] = float(self.per_sequence(gamma).sum()) / max(self.positions, 1)
        return self.measured[gamma]

    def kl_upper(self, gamma: float) -> float:
        """One-sided upper confidence bound of the mean per-token KL over prompts like these: the pooled
        mean plus z standard errors of a ratio estimator (sequences are the sampled units, each of n_i
        positions). Calibrating on it keeps the KL measured on other prompts inside the budget with
        about 95 % confidence (`z` = 1.645), where the plain mean would overshoot half the time."""
        if gamma not in self.upper:
            sums = self.per_sequence(gamma)
            m, mean = len(sums), self.kl(gamma)
            if m < 2:
                self.upper[gamma] = mean
            else:
                n = torch.tensor([len(s.output) - 1 for s in self.seqs], dtype=torch.float64)
                resid = sums - mean * n
                se = math.sqrt(float((resid**2).sum()) / (m * (m - 1))) / float(n.mean())
                self.upper[gamma] = mean + self.z * se
        return self.upper[gamma]
