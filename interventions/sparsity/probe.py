"""The allocation's probes (allocation.py): for each site of a method and each probe level, one forward of
the probe text through the engine (`ModelRunner.collect`) with only that site sparsified, a fraction of
its entries dropped as the method drops them (its threshold the quantile of what the site sees, the
correction's hooks at one nonzero site); the cost is the mean over the text's positions of KL(dense ||
probed) between next-token distributions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from actserve.interventions.sparsity.allocation import PROBE_LEVELS

# (site levels [1, layers, sites]: one nonzero) -> the linear hook that sparsifies them
ProbeHook = Callable[[torch.Tensor], Any]


def probe_text(token_lists: list[list[int]], tokens: int) -> list[list[int]]:
    """The last sequences of the calibration text, `tokens` tokens in all (the earliest of them cut to its
    first tokens): a piece apart from the first sequences, which benches pick methods on."""
    out: list[list[int]] = []
    left = tokens
    for seq in reversed(token_lists):
        if left < 2:
            break
        piece = seq[:left]
        if len(piece) >= 2:
            out.insert(0, piece)
            left -= len(piece)
    return out


class Prober:
    """KL(dense || probed) over `seqs`, the dense next-token log-probabilities computed once."""

    def __init__(self, runner: Any, seqs: list[list[int]]) -> None:
        self.runner, self.seqs = runner, seqs
        self.positions = [range(len(s)) for s in seqs]
        self.tokens = sum(map(len, seqs))
        self.dense = self._logprobs(None)

    def _logprobs(self, hook: Any) -> torch.Tensor:
        runner, n = self.runner, self.tokens
        out = runner.collect(self.seqs, logit_positions=self.positions, linear=hook, max_tokens=n)
        assert out.logits is not None
        return out.logits.float().log_softmax(-1)

    def kl(self, hook: Any) -> float:
        lp = self._logprobs(hook)
        return float((self.dense.exp() * (self.dense - lp)).sum(-1).mean())

    def costs(
        self, make: ProbeHook, which: torch.Tensor, what: str, disable: bool | None,
        levels: tuple[float, ...] = PROBE_LEVELS,
    ) -> torch.Tensor:  # fmt: skip
        """float64 [layers, sites, len(levels)]: the cost of each (layer, site) `which` [layers, sites]
        marks (the others stay 0)."""
        layers, sites = which.shape
        out = torch.zeros(layers, sites, len(levels), dtype=torch.float64)
        jobs = [(int(a), int(b), i) for a, b in which.nonzero().tolist() for i in range(len(levels))]
        for layer, site, i in tqdm(jobs, desc=f"probes ({what})", unit="probe", disable=disable):
            target = torch.zeros(1, layers, sites, dtype=torch.float64)
            target[0, layer, site] = levels[i]
            out[layer, site, i] = self.kl(make(target))
        return out
