"""Reading a plugin's artifact (a safetensors file with string metadata), shared by the plugins' loaders."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_safetensors(
    path: str | Path, error: type[ValueError]
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of the file; `error` (the plugin's artifact error) when it is not readable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "not readable"
        raise error(f"{path}: not a readable safetensors file ({e})") from None
    return meta, tensors
