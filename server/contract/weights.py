"""Weight formats: how a linear layer stores its matrix and computes with it (docs/architecture.md §5).

The base class sits in the contract so that the layers (`server/layers/linear.py`, `DenseFormat`) and
plugins (a format a plugin brings, e.g. a quantized copy) share one definition. A plugin asks for extra
formats on chosen projections with `FormatRequest`s; the engine installs them before the first step, and
the plugin's `LinearWeightsHook` picks, per row, which format a projection's matmul uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the layer a format belongs to: a `LinearBase` of server/layers/linear.py (the contract cannot import it)
LinearBase = Any


@dataclass(frozen=True)
class Shard:
    """Where one checkpoint matrix sits in a packed layer: output rows [offset, offset + size)."""

    offset: int
    size: int


class WeightFormat:
    """How one linear layer stores its weight and computes with it. One instance per layer and format.

    Subclasses implement `create` (register the parameters on the layer, named `self.prefix + ...`),
    `load_shard` (a checkpoint tensor into one of those parameters) and `apply` (the forward). The layer
    (`LinearBase`) has `input_size`, `output_size`, `has_bias`, `weight`/`bias` (its primary format's
    parameters when dense) and `register_parameter`.
    """

    # False: the checkpoint does not hold this format's tensors; `after_loading` derives them (e.g. a
    # quantized copy of the dense weight), and the loader does not count them as missing
    from_checkpoint = True
    # parameter names (without prefix) that keep their own dtype when the model is cast to --dtype
    # (e.g. float8 scales); everything else floating-point follows the model dtype
    fixed_dtype: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.prefix = ""

    def create(self, layer: LinearBase, params_dtype: torch.dtype | None) -> None:
        raise NotImplementedError

    def checkpoint_names(self, layer: LinearBase) -> frozenset[str] | None:
        """The (unprefixed) checkpoint tensors this format reads, when they are not its own parameters'
        names: e.g. a format that quantizes the checkpoint's dense `weight` as it loads. None: its
        parameters (none at all when `from_checkpoint` is False)."""
        return None

    def load_shard(
        self,
        layer: LinearBase,
        name: str,
        param: nn.Parameter | None,
        loaded: torch.Tensor,
        shard: Shard | None,
    ) -> None:
        """Put checkpoint tensor `name` (unprefixed) into this format, into the rows of `shard` (None: the
        whole matrix); `param` is this format's parameter of that name, None when it has none (a tensor
        it converts as it loads). Raises ValueError on a shape mismatch."""
        raise NotImplementedError

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self, layer: LinearBase) -> torch.Tensor:
        """The [out, in] matrix this format computes with, as a floating-point tensor (a dequantized
        temporary for a packed format): what a derived second format starts from
        (`layer.dense_weight()`), whatever the primary format stores."""
        raise NotImplementedError

    def apply_silu_mul(self, layer: LinearBase, gate_up: torch.Tensor) -> torch.Tensor:
        """apply(silu(gate) * up) for x = [gate | up]; a format may fuse the activation into its kernel."""
        if gate_up.is_cuda:
            from actserve.kernels.silu_mul import silu_mul

            return self.apply(layer, silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.apply(layer, F.silu(gate) * up)

    def apply_thresholded(
        self,
        layer: LinearBase,
        x: torch.Tensor,
        thr: torch.Tensor,
        silu_mul: bool = False,
        sums: str | None = None,
        count: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """threshold(x) @ W.T (+ bias) in one fused pass, where this format has one for x: entries with
        |x| < thr[row] count as 0 (thr [rows] float32; <= 0 keeps the row); with `silu_mul`, x is a fused
        [gate | up] row thresholded after silu(gate) * up. None (the default): no fused path here, so the
        layer masks x itself and runs its primary format (`LinearInputHook.thresholds`, §6). A layer uses
        the first of its formats that overrides this. `sums` (a buffer key): the format may return one
        row's float32 sums unrounded, which the caller's next reader rounds and zeroes (`TransposedFormat`:
        kernels/sparse_gemv.py); x may itself be such sums (one row) where the format reads them.
        `count` (table float64 [slots, 2], at int32 [1]; given for one-row steps only, `LinearSite.
        counter`): a format that computes the product must also add the row's entries below its threshold
        and its entries to table[at] (at < 0: nothing)."""
        return None

    def after_loading(self, layer: LinearBase) -> None:
        """Called once every checkpoint tensor is in (repacking, derived copies)."""

    def storage(self, param: torch.Tensor) -> str:
        """What `param`, one of this format's parameters, is stored as, for the weight-bytes gauge
        (`actserve_weight_bytes{format}`): its dtype by default (a dense matrix: "bfloat16"); a packed
        format names itself, so that its scales count with its codes."""
        return dtype_name(param.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def copy_rows(param: torch.Tensor, loaded: torch.Tensor, shard: Shard | None) -> None:
    dest = param if shard is None else param.narrow(0, shard.offset, shard.size)
    if dest.shape != loaded.shape:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(loaded)


@dataclass(frozen=True)
class FormatRequest:
    """A plugin's request for one more weight format on some projections: at start, every
    (layer, projection) in `sites` gets `make()` under `key` (its parameters prefixed `key_`), derived
    in its `after_loading` from the loaded layer (it is not in the checkpoint)."""

    key: str
    sites: frozenset[tuple[int, str]]
    make: Callable[[], WeightFormat]
