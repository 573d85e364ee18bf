"""Installing plugins' extra weight formats on a loaded native model (docs/architecture.md §5, §6).

A plugin's `FormatRequest`s name projections by (layer, name in PROJECTIONS); each gets `make()` under the
request's key. The new parameters are created on the host by the format, then moved to the layer's device
and the model dtype (except the format's `fixed_dtype` ones), and the format's `after_loading` derives them
from the already loaded primary weight: they are not in the checkpoint. This runs once, before the runner
exists, because decode CUDA graphs capture the layers' parameters as they are then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from actserve.server.contract.weights import FormatRequest, dtype_name
from actserve.server.layers.linear import LinearBase


def _place(layer: LinearBase, key: str, dtype: torch.dtype, device: torch.device) -> None:
    """Move the parameters of `layer.formats[key]` to `device` (and `dtype` unless kept fixed)."""
    fmt = layer.formats[key]
    for name, param in layer.named_parameters(recurse=False):
        if param is None or layer.owner(name) is not fmt:
            continue
        keep = not param.is_floating_point() or name.removeprefix(fmt.prefix) in fmt.fixed_dtype
        param.data = param.data.to(device=device, dtype=None if keep else dtype)


def install_formats(
    model: torch.nn.Module, requests: Mapping[str, Sequence[FormatRequest]], dtype: torch.dtype
) -> int:
    """Add every plugin's requested formats to `model` (`requests`: plugin name -> its requests); returns
    how many (layer, projection) formats were added. Raises ValueError naming the plugin and the site
    when a site does not exist or already holds that key."""
    accessor = getattr(model, "projection", None)
    added = 0
    for plugin, reqs in requests.items():
        for req in reqs:
            if not req.key.isidentifier():
                raise ValueError(f"plugin {plugin!r}: weight format key {req.key!r} is not an identifier")
            for layer_idx, proj in sorted(req.sites):
                where = f"plugin {plugin!r}, weight format {req.key!r} at (layer {layer_idx}, {proj})"
                if accessor is None:
                    raise ValueError(f"{where}: {type(model).__name__} does not expose its projections")
                try:
                    layer = accessor(layer_idx, proj)
                    device = next(p for p in layer.parameters(recurse=False) if p is not None).device
                    fmt = layer.add_format(req.key, req.make())
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                _place(layer, req.key, dtype, device)
                with torch.no_grad():
                    fmt.after_loading(layer)
                added += 1
    return added


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """The model's parameter bytes by storage format, each tensor once (tied embeddings count once): a
    projection's parameters by the format that owns them, primary or added (`LinearBase.storage`: an FP4
    kind, or the dtype of a dense weight), any other parameter by its dtype. The values sum to the bytes
    the weights hold: what `LoadedModel.weights_bytes` reports and the KV cache is sized after."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            key = module.storage(name) if isinstance(module, LinearBase) else dtype_name(param.dtype)
            out[key] = out.get(key, 0) + param.numel() * param.element_size()
    return out
