"""Steering vectors from contrastive examples: one direction per layer at the steering hook point.

Methods (docs/architecture.md §10):
- `mean_diff` (CAA): mean(positive residuals) - mean(negative residuals). Keeps its natural norm, so
  `scale` 1 moves the residual by the measured gap between the two classes.
- `pca_diff` (repeng): first principal component of the paired differences pos_i - neg_i, unit norm
  (as repeng returns it), signed so that positives project higher than negatives on average
  (mean_i (pos_i - neg_i) . d > 0). The SVD is taken on the raw, *uncentered* differences: centering
  (as sklearn's PCA inside repeng does) removes exactly the shift shared by all pairs, which is the signal.

Residuals come from `collect_residuals` (the engine runner's collect mode), so layer L here is the layer
where steering at L adds the vector.

On a serving engine (`POST /v1/steering/vectors/train`) the forward passes must not hold the engine for
the whole training: `chunks` cuts the examples into engine calls of at most CHUNK_TOKENS tokens and
CHUNK_EXAMPLES examples each, so other requests decode between them; `prepare_examples` (tokenizer, no
model) and `fit_vector` (CPU math) run off the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from actserve.interventions.steering.hidden import Position, collect_residuals

Method = Literal["mean_diff", "pca_diff"]
METHODS: tuple[str, ...] = ("mean_diff", "pca_diff")
POSITIONS: tuple[str, ...] = ("last", "mean")
MAX_EXAMPLES = 512  # per side, on the HTTP endpoint (1024 pairs held the engine 18.6 s before chunking)
MAX_EXAMPLE_CHARS = 4000  # per example, on the HTTP endpoint (also bounded by the model's max length)
# one engine call of HTTP training: about one prefill step's work, so a decode step follows within it
CHUNK_TOKENS, CHUNK_EXAMPLES = 1024, 8


class TrainingError(ValueError):
    """Bad training input; `param` names the field (the HTTP endpoint turns it into a 400)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class LayerStats:
    """How well one layer's direction separates the two classes (projections on the unit direction)."""

    norm: float  # norm of the returned direction
    projection_gap: float  # mean projection of positives minus that of negatives
    separation: float | None  # projection_gap / pooled std of projections (Cohen's d); None if std = 0
    pair_accuracy: float | None  # fraction of pairs whose positive projects higher (paired only)
    explained_variance: float | None  # share of the paired differences' energy along d (paired only)


@dataclass
class TrainedVector:
    directions: dict[int, torch.Tensor]  # layer -> float32 [hidden] on the CPU
    stats: dict[int, LayerStats]
    method: Method
    position: Position
    paired: bool
    num_positive: int
    num_negative: int
    num_tokens: int
    hidden_size: int
    num_layers: int  # of the model it was trained on

    def metadata(self) -> dict[str, str]:
        """String metadata stored with the vector in the library and in files (how it was made)."""
        return {
            "trained_by": "actserve",
            "method": self.method,
            "position": self.position,
            "paired": str(self.paired).lower(),
            "num_positive": str(self.num_positive),
            "num_negative": str(self.num_negative),
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready description without the directions themselves."""
        return {
            "method": self.method,
            "position": self.position,
            "paired": self.paired,
            "num_positive": self.num_positive,
            "num_negative": self.num_negative,
            "num_tokens": self.num_tokens,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "layers": sorted(self.directions),
            "stats": {str(k): vars(v) for k, v in sorted(self.stats.items())},
        }


def _check_texts(field: str, texts: list[str]) -> None:
    if not texts:
        raise TrainingError(f"{field}: give at least one example", field)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise TrainingError(f"{field}[{i}]: empty string; every example needs text", f"{field}[{i}]")


def validate(
    positive: list[str],
    negative: list[str],
    layers: list[int] | None,
    num_layers: int,
    method: str,
    position: str,
    paired: bool,
) -> list[int]:
    """Check everything that does not need the tokenizer; returns the sorted, de-duplicated layers."""
    if method not in METHODS:
        raise TrainingError(f"method: must be one of {list(METHODS)}, got {method!r}", "method")
    if position not in POSITIONS:
        raise TrainingError(f"position: must be one of {list(POSITIONS)}, got {position!r}", "position")
    _check_texts("positive", positive)
    _check_texts("negative", negative)
    if method == "pca_diff" and not paired:
        raise TrainingError(
            "paired: pca_diff needs paired examples; use mean_diff for unpaired lists", "paired"
        )
    if paired and len(positive) != len(negative):
        raise TrainingError(
            f"negative: paired training needs one negative per positive, got {len(positive)} positive and "
            f"{len(negative)} negative (send unpaired lists with paired=false and method mean_diff)",
            "negative",
        )
    if layers is None:
        return list(range(num_layers))
    if not layers:
        raise TrainingError("layers: give at least one layer, or null for all layers", "layers")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise TrainingError(f"layers: {bad} out of range [0, {num_layers - 1}]", "layers")
    return sorted(set(layers))


def _tokenize(tokenizer: Any, field: str, texts: list[str], max_tokens: int | None) -> list[list[int]]:
    """Tokenized as /v1/completions does (special tokens included), so training sees served inputs."""
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if not ids:
            raise TrainingError(f"{field}[{i}]: text has no tokens", f"{field}[{i}]")
        if max_tokens is not None and len(ids) > max_tokens:
            raise TrainingError(
                f"{field}[{i}]: {len(ids)} tokens, more than the model's maximum length of {max_tokens}",
                f"{field}[{i}]",
            )
        out.append(ids)
    return out


def chunks(
    prompts: list[list[int]], batch_tokens: int, max_examples: int | None = None
) -> list[tuple[int, int]]:
    """[start, end) ranges of at most batch_tokens tokens (a longer prompt goes alone) and at most
    `max_examples` prompts each."""
    ranges, start, total = [], 0, 0
    for i, p in enumerate(prompts):
        full = max_examples is not None and i - start >= max_examples
        if i > start and (total + len(p) > batch_tokens or full):
            ranges.append((start, i))
            start, total = i, 0
        total += len(p)
    ranges.append((start, len(prompts)))
    return ranges


def residuals(
    runner: Any,
    prompts: list[list[int]],
    layers: list[int],
    position: Position,
    batch_tokens: int,
    progress: bool | None,
) -> torch.Tensor:
    """collect_residuals in token-bounded chunks, with a progress bar counting examples."""
    parts = []
    with tqdm(
        total=len(prompts), desc="residuals", unit="ex", disable=None if progress is None else not progress
    ) as bar:
        for start, end in chunks(prompts, batch_tokens):
            parts.append(collect_residuals(runner, prompts[start:end], layers, position, batch_tokens))
            bar.update(end - start)
    return torch.cat(parts)


def direction(pos: torch.Tensor, neg: torch.Tensor, method: Method) -> torch.Tensor:
    """One layer's direction from float64 residuals pos [n, h], neg [m, h] (paired rows for pca_diff)."""
    if method == "mean_diff":
        return pos.mean(0) - neg.mean(0)
    diffs = pos - neg
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    d = vh[0]
    return -d if float(diffs.mean(0) @ d) < 0 else d


def layer_stats(pos: torch.Tensor, neg: torch.Tensor, d: torch.Tensor, paired: bool) -> LayerStats:
    norm = float(d.norm())
    unit = d / norm if norm > 0 else d
    pp, pn = pos @ unit, neg @ unit
    gap = float(pp.mean() - pn.mean())
    pooled = float(((pp.var(correction=0) + pn.var(correction=0)) / 2).sqrt())
    accuracy = explained = None
    if paired:
        diffs = pos - neg
        accuracy = float((pp > pn).double().mean())
        energy = float((diffs**2).sum())
        explained = float(((diffs @ unit) ** 2).sum()) / energy if energy > 0 else None
    return LayerStats(
        norm=norm,
        projection_gap=gap,
        separation=gap / pooled if pooled > 1e-12 else None,
        pair_accuracy=accuracy,
        explained_variance=explained,
    )


NOT_NATIVE = (
    "model: training needs the native model implementation; this model runs through the transformers fallback"
)


def native_spec(model: torch.nn.Module) -> Any:
    """The native model's spec (layers, hidden size); the transformers fallback has none."""
    spec = getattr(model, "spec", None) if model is not None else None
    if spec is None:
        raise TrainingError(NOT_NATIVE, "model")
    return spec


def prepare_examples(
    tokenizer: Any,
    positive: list[str],
    negative: list[str],
    *,
    num_layers: int,
    layers: list[int] | None,
    method: str,
    position: str,
    paired: bool,
    max_tokens: int | None,
) -> tuple[list[int], list[list[int]]]:
    """Checked layers and the token ids of positive then negative examples (no model needed)."""
    chosen = validate(positive, negative, layers, num_layers, method, position, paired)
    prompts = _tokenize(tokenizer, "positive", positive, max_tokens)
    return chosen, prompts + _tokenize(tokenizer, "negative", negative, max_tokens)


def fit_vector(
    h: torch.Tensor,
    num_positive: int,
    layers: list[int],
    *,
    method: Method,
    position: Position,
    paired: bool,
    num_tokens: int,
    num_layers: int,
) -> TrainedVector:
    """Directions and statistics from residuals h [positives + negatives, len(layers), hidden]."""
    h = h.double()
    pos, neg = h[:num_positive], h[num_positive:]
    directions: dict[int, torch.Tensor] = {}
    stats: dict[int, LayerStats] = {}
    for k, layer in enumerate(layers):
        d = direction(pos[:, k], neg[:, k], method)
        directions[layer] = d.float().contiguous()
        stats[layer] = layer_stats(pos[:, k], neg[:, k], d, paired)
    return TrainedVector(
        directions=directions,
        stats=stats,
        method=method,
        position=position,
        paired=paired,
        num_positive=num_positive,
        num_negative=h.shape[0] - num_positive,
        num_tokens=num_tokens,
        hidden_size=h.shape[-1],
        num_layers=num_layers,
    )


def train_vector(
    runner: Any,
    tokenizer: Any,
    positive: list[str],
    negative: list[str],
    *,
    layers: list[int] | None = None,
    method: Method = "mean_diff",
    position: Position = "last",
    paired: bool = True,
    batch_tokens: int = 4096,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> TrainedVector:
    """Train a per-layer steering direction (positive minus negative) on an engine's native model
    (`runner` = `engine.runner`), in one go (the CLI; a serving engine runs `chunks` of it between steps
    instead).

    layers None = all; max_tokens: longest example allowed (the engine's max_model_len);
    progress None = a bar only on a terminal. Raises TrainingError naming the offending field."""
    spec = native_spec(getattr(runner, "model", None))
    chosen, prompts = prepare_examples(
        tokenizer, positive, negative, num_layers=spec.num_layers, layers=layers, method=method,
        position=position, paired=paired, max_tokens=max_tokens,
    )  # fmt: skip
    h = residuals(runner, prompts, chosen, position, batch_tokens, progress)
    return fit_vector(
        h, len(positive), chosen, method=method, position=position, paired=paired,
        num_tokens=sum(map(len, prompts)), num_layers=spec.num_layers,
    )  # fmt: skip
