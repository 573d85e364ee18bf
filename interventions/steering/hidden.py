"""Residual-stream activations of prompts, read at the steering hook point (output of decoder layer L).

Used to build vectors (mean_diff, pca_diff, ASC). The forwards are the engine's own: `ModelRunner.collect`
runs them on the serving KV cache with blocks borrowed from the free pool and given back, so running
requests are not disturbed; call it on the engine thread when a server is running
(`AsyncEngine.run_in_engine`). Layer L here is exactly where steering at layer L adds its vector.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Position = Literal["last", "mean"]


def collect_residuals(
    runner: Any,
    prompts: list[list[int]],
    layers: list[int],
    position: Position = "last",
    batch_tokens: int = 4096,
) -> torch.Tensor:
    """[len(prompts), len(layers), hidden] float32: each prompt's residual after each layer, at its last
    token or averaged over its tokens. `runner` is an engine's native `ModelRunner` (`engine.runner`);
    each forward packs at most `batch_tokens` tokens (and no more KV blocks than are free)."""
    got = runner.collect(prompts, layers, position=position, max_tokens=batch_tokens)
    assert got.residuals is not None
    return got.residuals
