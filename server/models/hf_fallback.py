"""Fallback path: any decoder-only architecture through transformers' AutoModelForCausalLM (the model
side; the engine's `HFRunner`, server/engine/hf_runner.py, runs it).

Sequences are still scheduled, batched and preempted by the same scheduler (KV blocks are accounted for
as on the native path), but each sequence runs its own forward with its own transformers cache, and
steering reaches the residual stream through forward hooks on the decoder layers. Slower than native;
here so that every model serves, and interventions still apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def find_decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers: the first one holding exactly num_hidden_layers modules."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise RuntimeError(f"could not find {num_layers} decoder layers in {type(model).__name__}")


def load_transformers(model_dir: Path, dtype: torch.dtype, device: torch.device, allow_pickle: bool) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=not allow_pickle)
    return model.to(device).eval()
