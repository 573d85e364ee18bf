"""What the sparsity tests share: the data, an engine serving a calibration, and the independent
references of the methods (interventions/sparsity/): transformers' own model with forward hooks that do
what each paper describes, on transformers' separate q/k/v/o/gate/up/down modules, from the thresholds and
ranks of our calibration tables (what a method is calibrated to) but with their own masks, weights, SVD
(float64) and core-neuron selection (plain Python sorting). TEAL's is tests/engine_utils.py `HFTeal`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.engine_utils import HF_MODULES

PLUGIN = "sparsity"
DATA = Path(__file__).resolve().parents[1] / "bench" / "data" / "fp4_quality"
CALIB, HELDOUT = DATA / "tinystories_calib.jsonl", DATA / "tinystories_heldout.jsonl"


def engine(model: Path, calibration: Path | None, **kw: Any) -> LLMEngine:
    """A CPU engine serving `calibration` (None: none), prefix cache off unless asked."""
    options = {PLUGIN: {"calibration": str(calibration)}} if calibration is not None else {}
    cfg = {"device": "cpu", "num_kv_blocks": 256, "enable_prefix_caching": False, **kw}
    return LLMEngine(EngineConfig(model=str(model), plugin_options=options, **cfg))


class _Hooks:
    """Hook bookkeeping: register, remove; zero counts per (layer, site) over the `valid` rows, with the
    multiply-adds per token of the weights a site's entries stand for."""

    def __init__(self, ref: Any, decode_only: bool) -> None:
        self.ref, self.decode_only = ref, decode_only
        self.valid: torch.Tensor | None = None  # [batch * seq] bool: rows counted (None: all)
        self.counts: dict[tuple[int, str], list[float]] = {}
        self.macs: dict[tuple[int, str], float] = {}  # per site: multiply-adds per token of its weights
        self.width: dict[tuple[int, str], int] = {}  # per site: entries per row
        self._handles: list[Any] = []

    def skip(self, x: torch.Tensor) -> bool:
        return self.decode_only and x.shape[-2] != 1

    def count(
        self, layer: int, site: str, zeros: torch.Tensor, entries: int, macs: float, less: float = 0.0
    ) -> None:
        """`zeros` [..., in] bool; `macs`: the site's weights' multiply-adds per token (all its entries);
        `less`: entries to subtract per row (R-Sparse's low-rank cost)."""
        rows = zeros.reshape(-1, zeros.shape[-1])
        rows = rows if self.valid is None or len(rows) != len(self.valid) else rows[self.valid]
        c = self.counts.setdefault((layer, site), [0.0, 0.0])
        c[0] += float(rows.sum()) - less * len(rows)
        c[1] += entries * len(rows)
        self.macs[(layer, site)], self.width[(layer, site)] = float(macs), entries

    def sparsity(self) -> float:
        """The share of the sites' multiply-adds skipped: each site's zero share weighed by its weights."""
        total = sum(self.macs[k] for k in self.counts)
        return sum(self.macs[k] * z / n for k, (z, n) in self.counts.items()) / total

    def pooled(self) -> float:
        """The same pooled over the rows counted (as a request's counters add up its decode rows)."""
        per = {k: self.macs[k] / self.width[k] for k in self.counts}
        return sum(per[k] * c[0] for k, c in self.counts.items()) / sum(
            per[k] * c[1] for k, c in self.counts.items()
        )

    def module(self, layer: int, name: str) -> Any:
        block = self.ref.model.layers[layer]
        parent = block.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
        return getattr(parent, name)

    def pre(self, layer: int, name: str, fn: Callable[..., Any]) -> None:
        self._handles.append(self.module(layer, name).register_forward_pre_hook(fn))

    def post(self, layer: int, name: str, fn: Callable[..., Any]) -> None:
        self._handles.append(self.module(layer, name).register_forward_hook(fn))

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class HFChess(_Hooks):
    """CHESS: q_proj's and o_proj's inputs zeroed below their thresholds (k/v untouched), gate_proj's
    output zeroed where |silu(g_i)| * up_mean_i < lambda, then down_proj's input below its threshold.
    `table` [layers, 4] (q, o, lambda, down). Achieved: the q, o, up (the masked channels) and down
    weights' multiply-adds skipped."""

    def __init__(self, ref: Any, table: torch.Tensor, up_mean: torch.Tensor, decode_only: bool = False):
        super().__init__(ref, decode_only)
        self.table, self.up_mean = table.float(), up_mean.float()

    def __enter__(self) -> HFChess:
        for layer in range(len(self.ref.model.layers)):
            for name, k in (("q_proj", 0), ("o_proj", 1), ("down_proj", 3)):
                self.pre(layer, name, self._threshold(layer, name, float(self.table[layer, k])))
            self.post(layer, "gate_proj", self._ffn(layer))
        return self

    def _threshold(self, layer: int, name: str, t: float) -> Callable[..., Any]:
        macs = self.module(layer, name).weight.numel()

        def fn(_m: Any, args: tuple) -> Any:
            x = args[0]
            if self.skip(x):
                return None
            y = torch.where(x.abs() < t, torch.zeros_like(x), x)
            self.count(layer, name, y == 0, y.shape[-1], macs)
            return (y, *args[1:])

        return fn

    def _ffn(self, layer: int) -> Callable[..., Any]:
        lam = float(self.table[layer, 2])
        macs = self.module(layer, "up_proj").weight.numel()

        def fn(_m: Any, args: tuple, out: torch.Tensor) -> Any:
            if self.skip(out):
                return None
            drop = F.silu(out).abs() * self.up_mean[layer] < lam
            self.count(layer, "ffn", drop, out.shape[-1], macs)
            return torch.where(drop, torch.zeros_like(out), out)

        return fn


class HFRSparse(_Hooks):
    """R-Sparse: at each of our four projections (q/k/v and gate/up as one fused matrix, as calibrated),
    the inputs with |x_j| * ||W[:, j]|| < thr zeroed (|x_j| < thr where the projection's alpha is 1: no
    low-rank part) and the dropped part's product through W's top `rank` singular components (float64 SVD
    of transformers' weights) added to each module's output. `thr`, `ranks`, `alpha` [layers, 4] in our
    projection order."""

    def __init__(
        self,
        ref: Any,
        thr: torch.Tensor,
        ranks: torch.Tensor,
        alpha: torch.Tensor,
        decode_only: bool = False,
        svd: dict[tuple[int, str], tuple[torch.Tensor, ...]] | None = None,
    ) -> None:
        """`svd`: a cache of (U, S, Vh) by (layer, projection), filled on first use (reused across levels)."""
        super().__init__(ref, decode_only)
        self.thr, self.ranks, self.alpha = thr.float(), ranks.long(), alpha.double()
        self.dropped: dict[tuple[int, str], torch.Tensor] = {}
        self.svd = svd if svd is not None else {}

    def __enter__(self) -> HFRSparse:
        for layer in range(len(self.ref.model.layers)):
            for k, (proj, (_, names)) in enumerate(HF_MODULES.items()):
                w = torch.cat([self.module(layer, n).weight.detach() for n in names])
                colnorm = w.float().norm(dim=0) if self.alpha[layer, k] < 1 else torch.ones(w.shape[1])
                if (layer, proj) not in self.svd:
                    self.svd[(layer, proj)] = torch.linalg.svd(w.double(), full_matrices=False)
                u, s, vh = self.svd[(layer, proj)]
                r = int(self.ranks[layer, k])
                lr = (vh[:r].T * s[:r], u[:, :r])  # x_d @ (V_r S_r) @ U_r^T
                start = 0
                for j, n in enumerate(names):
                    rows = self.module(layer, n).weight.shape[0]
                    self.pre(
                        layer, n, self._drop(layer, proj, n, j == 0, colnorm, float(self.thr[layer, k]), w)
                    )
                    self.post(layer, n, self._add(layer, n, lr, slice(start, start + rows)))
                    start += rows
        return self

    def _drop(
        self, layer: int, proj: str, name: str, first: bool, colnorm: torch.Tensor, t: float, w: torch.Tensor
    ) -> Callable[..., Any]:
        n_out, n_in = w.shape
        r = int(self.ranks[layer, list(HF_MODULES).index(proj)])

        def fn(_m: Any, args: tuple) -> Any:
            x = args[0]
            if self.skip(x):
                return None
            drop = x.abs().float() * colnorm < t
            self.dropped[(layer, name)] = torch.where(drop, x, torch.zeros_like(x))
            y = torch.where(drop, torch.zeros_like(x), x)
            if first:
                self.count(layer, proj, y == 0, n_in, w.numel(), less=r * (n_in + n_out) / n_out)
            return (y, *args[1:])

        return fn

    def _add(self, layer: int, name: str, lr: tuple[torch.Tensor, torch.Tensor], rows: slice) -> Callable:
        vs, u = lr

        def fn(_m: Any, args: tuple, out: torch.Tensor) -> Any:
            if self.skip(out) or u.shape[1] == 0:
                return None
            x_d = self.dropped.pop((layer, name)).double()
            return out + ((x_d @ vs) @ u[rows].T).to(out.dtype)

        return fn


def python_core(rows: list[list[float]], keep: int, beta: float) -> set[int]:
    """CoreInfer's sentence-wise core neurons of one layer by plain Python: per token the top floor(beta
    * positives) by value (ties: lower index), then the `keep` most frequent (ties: larger summed value,
    then lower index)."""
    n = len(rows[0])
    count, total = [0] * n, [0.0] * n
    for vals in rows:
        limit = math.floor(beta * sum(v > 0 for v in vals))
        for i in sorted(range(n), key=lambda i: (-vals[i], i))[:limit]:
            count[i] += 1
        for i, v in enumerate(vals):
            total[i] += v
    return set(sorted(range(n), key=lambda i: (-count[i], -total[i], i))[:keep])


class HFCoreInfer(_Hooks):
    """CoreInfer. With `generate` on one sequence (prompt_len None): the prefill forward picks each layer's
    core neurons from the down projection's input (`python_core`); decode forwards zero that input outside
    them. Teacher-forced (prompt_len P): per sequence of the batch, its first P rows pick, its later rows
    are zeroed outside the core (counted over the `valid` rows)."""

    def __init__(self, ref: Any, keep: int, beta: float, prompt_len: int | None = None) -> None:
        super().__init__(ref, decode_only=True)
        self.keep, self.beta, self.prompt_len = keep, beta, prompt_len
        self.core: dict[int, torch.Tensor] = {}

    def __enter__(self) -> HFCoreInfer:
        for layer in range(len(self.ref.model.layers)):
            self.pre(layer, "down_proj", self._down(layer))
        return self

    def _pick(self, rows: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(rows.shape[-1], dtype=torch.bool)
        mask[sorted(python_core(rows.double().tolist(), self.keep, self.beta))] = True
        return mask

    def _forced(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = self.prompt_len
        assert p is not None
        y = x.clone()
        later = torch.zeros(x.shape[:2], dtype=torch.bool)
        later[:, p:] = True
        for b in range(x.shape[0]):
            y[b, p:] = torch.where(self._pick(x[b, :p]), x[b, p:], torch.zeros_like(x[b, p:]))
        valid = later.reshape(-1) if self.valid is None else later.reshape(-1) & self.valid
        rows = y.reshape(-1, y.shape[-1])[valid]
        c = self.counts.setdefault((layer, "down"), [0.0, 0.0])
        c[0] += float((rows == 0).sum())
        c[1] += rows.numel()
        self.macs[(layer, "down")], self.width[(layer, "down")] = 3.0 * x.shape[-1], x.shape[-1]
        return y

    def _down(self, layer: int) -> Callable[..., Any]:
        def fn(_m: Any, args: tuple) -> Any:
            x = args[0]
            if self.prompt_len is not None:
                return (self._forced(layer, x), *args[1:])
            if x.shape[-2] > 1:  # the prompt
                self.core[layer] = self._pick(x[0])
                return None
            y = torch.where(self.core[layer], x, torch.zeros_like(x))
            self.count(layer, "down", y == 0, y.shape[-1], 3 * y.shape[-1])
            return (y, *args[1:])

        return fn
