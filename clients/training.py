"""Typed body of `POST /v1/steering/vectors/train` (docs/api.md, "Training a vector"): the server runs
the examples through the model, takes the difference of the residuals, and stores the vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

TrainMethod = Literal["mean_diff", "pca_diff"]
TrainPosition = Literal["last", "mean"]


@dataclass
class TrainVector:
    """Give `pairs` ((positive, negative) texts), or both `positive` and `negative` lists (`paired`:
    positive[i] and negative[i] form a pair, needed by pca_diff). `layers`: indices, or None / "all" for
    every layer. `method`: mean_diff or pca_diff; `position`: the last token's residual or the mean over
    the text; `replace`: overwrite a stored vector of that name."""

    name: str
    positive: Sequence[str] | None = None
    negative: Sequence[str] | None = None
    pairs: Sequence[tuple[str, str]] | None = None
    paired: bool = True
    layers: Sequence[int] | Literal["all"] | None = None
    method: TrainMethod = "mean_diff"
    position: TrainPosition = "last"
    replace: bool = False

    def to_dict(self) -> dict[str, Any]:
        lists = self.positive is not None or self.negative is not None
        if (self.pairs is not None) == lists:
            raise ValueError("TrainVector: give either pairs or both positive and negative")
        if lists and (self.positive is None or self.negative is None):
            raise ValueError("TrainVector: give both positive and negative")
        if self.pairs is not None and not self.paired:
            raise ValueError(
                "TrainVector.paired: pairs are paired; give positive and negative for paired=False"
            )
        if self.method not in ("mean_diff", "pca_diff"):
            raise ValueError(f"TrainVector.method must be mean_diff or pca_diff, got {self.method!r}")
        if self.position not in ("last", "mean"):
            raise ValueError(f"TrainVector.position must be last or mean, got {self.position!r}")
        body: dict[str, Any] = {"name": self.name}
        if self.pairs is not None:
            body["pairs"] = [{"positive": p, "negative": n} for p, n in self.pairs]
        else:
            body["positive"], body["negative"] = list(self.positive or ()), list(self.negative or ())
        body.update(
            paired=bool(self.paired), method=self.method, position=self.position, replace=bool(self.replace)
        )
        if self.layers is not None:
            body["layers"] = self.layers if self.layers == "all" else [int(x) for x in self.layers]
        return body
