"""The projections of the native models: layers that own their weights through a `WeightFormat`.

A `Linear` (or `MergedColumnLinear`, several checkpoint matrices packed along the output rows, e.g.
q/k/v or gate/up) does not hold a weight itself: its format creates the parameters (`create`), puts a
checkpoint tensor into them (`load_shard`, through the layer's `load_tensor`) and computes with them
(`apply`). `DenseFormat` is an `nn.Linear`-shaped bf16/fp16/fp32 weight; `FP4Format`
(server/contract/fp4_format.py) packed FP4 data + scales, with the same three methods
(docs/architecture.md §5).

`DenseFormat.apply` is the fast path: decode-sized CUDA rows through the Triton GEMV, the rest through
cuBLAS (`F.linear`), and on the CPU exactly what transformers computes. Only bf16/fp16 take the GEMV
(fp32 would go through TF32 tensor cores there and lose precision the CPU tests rely on). Decode steps
and short prefills (<= 16 rows) qualify, which at batch 1-16 removes cuBLAS's split-K reduction kernels
and the separate silu·mul kernel (bench/decode_profile.py).

One layer may own more than one format (`add_format`): the first is the layer's primary format, its
parameters carry the checkpoint's names (`weight`, `bias`); another one's parameters are prefixed with
its key (`<key>_weight`, ...) and it is reached through `layer.formats[key]`. Plugins add such formats at
start (`server/models/formats.py`) and pick them per row through the step's `LinearSite` (`site.choices()`:
format key -> [rows] bool): `linear` / `silu_mul_linear` compute the primary for every row, then each
chosen format's product, and take the latter only on its rows (`torch.where`), so other rows keep the
primary's bits. Without a site (`site=None`, the plain path) only the primary runs. Input hooks that
also define `output` then act on the product (`LinearSite.finish`), seeing the input before and after
the input hooks and the site's product over any other input (`_product`).

Input hooks that only zero small entries may hand the site per-row thresholds instead
(`ThresholdHook.thresholds`); a layer that owns a format with a fused thresholded matmul
(`WeightFormat.apply_thresholded`: `TransposedFormat`, the sparse GEMV over W^T) then computes every row
of the step with it, in one pass that skips the weights of zeroed inputs, unless a weight-format choice
also acts at the site. Where the format declines (CPU, fp32, more than 16 rows) the hooks' `apply` masks
x and the plain path runs, as without thresholds (docs/architecture.md §6, "Activation sparsity").
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from actserve.kernels.gemv_ref import MAX_ROWS
from actserve.server.contract.hooks import LinearSite
from actserve.server.contract.weights import Shard, WeightFormat, copy_rows, dtype_name

GEMV_DTYPES = (torch.bfloat16, torch.float16)


def takes_gemv(x: torch.Tensor) -> bool:
    return x.is_cuda and x.shape[0] <= MAX_ROWS and x.dtype in GEMV_DTYPES


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if takes_gemv(x):
        from actserve.kernels.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def dense_silu_mul_linear(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T for a fused [gate | up] input. The activation is fused into the GEMV
    for one row only: on the 2-16 row tensor-core path it made the kernel 10x slower
    (decode_profile.json)."""
    if takes_gemv(gate_up) and gate_up.shape[0] == 1:
        from actserve.kernels.gemv import gemv

        return gemv(gate_up, weight, bias, silu_mul=True)
    if gate_up.is_cuda:
        from actserve.kernels.silu_mul import silu_mul

        return dense_linear(silu_mul(gate_up), weight, bias)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight, bias)


class DenseFormat(WeightFormat):
    """An nn.Linear-shaped weight [out, in] (and bias [out]) in the model's floating dtype."""

    def create(self, layer: LinearBase, params_dtype: torch.dtype | None) -> None:
        out, k = layer.output_size, layer.input_size
        weight = nn.Parameter(torch.empty(out, k, dtype=params_dtype))
        layer.register_parameter(self.prefix + "weight", weight)
        bias = nn.Parameter(torch.empty(out, dtype=params_dtype)) if layer.has_bias else None
        layer.register_parameter(self.prefix + "bias", bias)
        if not self.prefix:  # the primary format: what `layer.weight` / `layer.bias` read
            layer.reset_dense_parameters()

    def load_shard(
        self,
        layer: LinearBase,
        name: str,
        param: nn.Parameter | None,
        loaded: torch.Tensor,
        shard: Shard | None,
    ) -> None:
        if param is None:
            raise ValueError(f"DenseFormat has no parameter {name!r}")
        copy_rows(param, loaded, shard)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        # the primary format's body is `dense_linear` inlined: one Python call more than a bare
        # nn.Linear on the eager path, nothing on a CUDA graph replay
        if self.prefix:
            p = self.prefix
            return dense_linear(x, getattr(layer, p + "weight"), getattr(layer, p + "bias"))
        if takes_gemv(x):
            from actserve.kernels.gemv import gemv

            return gemv(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def dense_weight(self, layer: LinearBase) -> torch.Tensor:
        return getattr(layer, self.prefix + "weight")

    def apply_silu_mul(self, layer: LinearBase, gate_up: torch.Tensor) -> torch.Tensor:
        if self.prefix:
            p = self.prefix
            return dense_silu_mul_linear(gate_up, getattr(layer, p + "weight"), getattr(layer, p + "bias"))
        return dense_silu_mul_linear(gate_up, layer.weight, layer.bias)


class LinearBase(nn.Module):
    """y = x @ W.T (+ b) with W owned by `self.format` (and optionally further formats)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        weight_format: WeightFormat | None = None,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size, self.output_size, self.has_bias = input_size, output_size, bias
        self.params_dtype = params_dtype
        self.formats: dict[str, WeightFormat] = {}
        self._owners: dict[str, WeightFormat] = {}  # parameter name -> the format that created it
        self.thresholded: WeightFormat | None = None  # the first format with a fused thresholded matmul
        self.format: WeightFormat = self.add_format("", weight_format or DenseFormat())

    def add_format(self, key: str, weight_format: WeightFormat) -> WeightFormat:
        """Give this layer another format of the same matrix (its parameters prefixed `key_`); the hook
        for holding e.g. a dense and an FP4 copy of one layer. The first format added is the primary."""
        if key in self.formats:
            raise ValueError(f"format {key!r} already on this layer")
        weight_format.prefix = f"{key}_" if key else ""
        before = set(self._parameters)
        weight_format.create(self, self.params_dtype)
        self._owners.update(dict.fromkeys(set(self._parameters) - before, weight_format))
        self.formats[key] = weight_format
        fused = type(weight_format).apply_thresholded is not WeightFormat.apply_thresholded
        if fused and self.thresholded is None:
            self.thresholded = weight_format
        return weight_format

    def dense_weight(self) -> torch.Tensor:
        """The primary format's matrix [out, in] as a float tensor (derived formats start from it)."""
        return self.format.dense_weight(self)

    def owner(self, param_name: str) -> WeightFormat:
        """The format that created parameter `param_name` of this layer."""
        return self._owners[param_name]

    def storage(self, param_name: str) -> str:
        """How parameter `param_name` is stored (`WeightFormat.storage` of the format that created it; its
        dtype if none did), for the weight-bytes gauge."""
        param = self._parameters[param_name]
        assert param is not None
        fmt = self._owners.get(param_name)
        return fmt.storage(param) if fmt is not None else dtype_name(param.dtype)

    def reset_dense_parameters(self) -> None:
        """nn.Linear's initialisation, so a dense layer built off the meta device starts as nn.Linear did."""
        if not self._parameters["weight"].is_meta:  # type: ignore[union-attr]
            nn.Linear.reset_parameters(self)  # type: ignore[arg-type]  # reads self.weight / self.bias only

    def shard(self, shard_id: Hashable | None) -> Shard | None:
        if shard_id is None:
            return None
        raise KeyError(f"{type(self).__name__} has no shard {shard_id!r}")

    def checkpoint_names(self) -> dict[str, WeightFormat]:
        """Checkpoint tensor name (this layer's part of it, e.g. `weight`) -> the format that reads it."""
        names: dict[str, WeightFormat] = {}
        for fmt in self.formats.values():
            reads = fmt.checkpoint_names(self)
            if reads is None:
                own = [n for n, f in self._owners.items() if f is fmt and self._parameters[n] is not None]
                names.update(dict.fromkeys(own if fmt.from_checkpoint else [], fmt))
            else:
                names.update({fmt.prefix + n: fmt for n in reads})
        return names

    def load_tensor(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        """Put checkpoint tensor `name` (e.g. `weight`, `weight_packed`) into its format, at shard
        `shard_id`; ValueError when no format of this layer reads it or the shape does not fit."""
        fmt = self.checkpoint_names().get(name)
        if fmt is None:
            raise ValueError(f"this {type(self).__name__} reads no checkpoint tensor {name!r}")
        param = self._parameters.get(name)
        fmt.load_shard(self, name.removeprefix(fmt.prefix), param, loaded, self.shard(shard_id))

    def after_loading(self) -> None:
        for fmt in self.formats.values():
            fmt.after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.apply(self, x)

    def extra_repr(self) -> str:
        formats = ", ".join(f"{k or 'primary'}={type(f).__name__}" for k, f in self.formats.items())
        return f"in={self.input_size}, out={self.output_size}, bias={self.has_bias}, {formats}"


class Linear(LinearBase):
    """One checkpoint matrix, one layer (o_proj, down_proj, lm_head)."""


class MergedColumnLinear(LinearBase):
    """Several checkpoint matrices stacked along the output rows (q/k/v, gate/up), one matmul."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        shard_ids: Sequence[Hashable] | None = None,
        bias: bool = False,
        weight_format: WeightFormat | None = None,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        ids = list(shard_ids) if shard_ids is not None else list(range(len(output_sizes)))
        if len(ids) != len(output_sizes) or len(set(ids)) != len(ids):
            raise ValueError(f"shard ids {ids} do not name the {len(output_sizes)} output blocks")
        offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        super().__init__(input_size, sum(output_sizes), bias, weight_format, params_dtype)
        self.shards = {s: Shard(o, n) for s, o, n in zip(ids, offsets, output_sizes, strict=True)}

    def shard(self, shard_id: Hashable | None) -> Shard | None:
        if shard_id is None:  # the packed tensor itself (a checkpoint that is already fused)
            return None
        return self.shards[shard_id]


def _choose(layer: LinearBase, site: LinearSite, out: torch.Tensor, compute: FormatCall) -> torch.Tensor:
    """`out` (the primary format's rows) with the rows each weight-format choice at `site` picks taken
    from that format instead; rows no choice picks keep the primary's bits."""
    for key, rows in site.choices():
        alt = compute(layer.formats[key])
        out = torch.where(rows.unsqueeze(1), alt, out)
    return out


# one format's forward over the site's (hooked) input
FormatCall = Callable[[WeightFormat], torch.Tensor]


def _product(layer: LinearBase, site: LinearSite, z: torch.Tensor) -> torch.Tensor:
    """The site's product over another input z (primary format, then the weight-format choices): what
    output hooks get as `LinearCall.matmul`."""
    out = layer.format.apply(layer, z)
    return _choose(layer, site, out, lambda f: f.apply(layer, z)) if site.weights else out


def _thresholded(
    x: torch.Tensor, layer: LinearBase, site: LinearSite, silu_mul: bool = False, sums: str | None = None
) -> torch.Tensor | None:
    """Every row through the layer's fused thresholded matmul, when the site's input hooks all hand over
    thresholds this step, no weight-format choice or output hook acts here and the format takes x; None
    otherwise. Hooks that observe fused steps then see x and the thresholds (`LinearSite.fused_input`).
    `sums`, and a hook's count target (`LinearSite.counter`): passed on to the format
    (`WeightFormat.apply_thresholded`)."""
    fmt = layer.thresholded
    if fmt is None or site.weights or site.outputs:
        return None
    thr = site.thresholds()
    if thr is None:
        return None
    out = fmt.apply_thresholded(layer, x, thr, silu_mul, sums, site.counter())
    if out is not None:
        site.fused_input(x, thr)
    return out


def linear(
    x: torch.Tensor, layer: LinearBase, site: LinearSite | None = None, sums: str | None = None
) -> torch.Tensor:
    """layer(x) through its primary format, without nn.Module.__call__ (the hot path). `site` (what
    plugins do at this projection this step; None on the plain path): input hooks act on x first (or hand
    thresholds to a fused thresholded matmul for every row, `_thresholded`), then rows a weight-format
    choice picks use that format's matmul. `sums` (a buffer key, e.g. the projection's name): the fused
    matmul may return one row's float32 sums unrounded instead of the output, for a caller whose next
    reader rounds and zeroes them (kernels/sparse_gemv.py `is_sums`); the plain paths ignore it."""
    if site is None:
        return layer.format.apply(layer, x)
    x_in = x
    if site.hooks:
        fused = _thresholded(x, layer, site, sums=sums)
        if fused is not None:
            return fused
        x = site(x)
    out = layer.format.apply(layer, x)
    if site.weights:
        out = _choose(layer, site, out, lambda f: f.apply(layer, x))
    if site.outputs:
        out = site.finish(x_in, x, out, lambda z: _product(layer, site, z))
    return out


def silu_mul_linear(
    gate_up: torch.Tensor,
    layer: LinearBase,
    site: LinearSite | None = None,
    sums: str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """layer(silu(gate) * up) for a fused [gate | up] input, through the layer's primary format.

    With input hooks at `site`, the input silu(gate) * up is formed explicitly and the hooks act on it.
    On the CPU that is the fast path itself. On CUDA the fast path never forms it (fused GEMV), so every
    row is computed on the fast path and only the hooks' rows (`site.row_mask`) take the explicit
    product: rows without the hook keep the fast path's bits. Weight-format choices then replace the
    rows they pick with that format's product. Hooks that hand over thresholds go to the fused
    thresholded matmul instead, which forms silu(gate) * up itself (`_thresholded`).

    `dtype` (the model's): given when gate_up may be the gate/up projection's pending float32 sums
    (`linear(sums=...)`): the fused matmul reads them as they are (the caller zeroes them after it);
    any other path gets them rounded to `dtype` and zeroed first (`settle_sums`). `sums`: as `linear`'s."""
    if dtype is not None and gate_up.dtype == torch.float32 and dtype != torch.float32:
        fused = (
            _thresholded(gate_up, layer, site, silu_mul=True, sums=sums)
            if site is not None and site.hooks
            else None
        )
        if fused is not None:
            return fused
        from actserve.kernels.sparse_gemv import settle_sums

        gate_up = settle_sums(gate_up, dtype)
    if site is None:
        return layer.format.apply_silu_mul(layer, gate_up)
    if not site.hooks:
        out = layer.format.apply_silu_mul(layer, gate_up)
        return _choose(layer, site, out, lambda f: f.apply_silu_mul(layer, gate_up))
    fused = _thresholded(gate_up, layer, site, silu_mul=True, sums=sums)
    if fused is not None:
        return fused
    if gate_up.is_cuda:
        from actserve.kernels.silu_mul import silu_mul

        fast = layer.format.apply_silu_mul(layer, gate_up)
        x_in = silu_mul(gate_up)
        x = site(x_in)
        out = torch.where(site.row_mask.unsqueeze(1), layer.format.apply(layer, x), fast)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        x_in = F.silu(gate) * up
        x = site(x_in)
        out = layer.format.apply(layer, x)
    if site.weights:
        out = _choose(layer, site, out, lambda f: f.apply(layer, x))
    if site.outputs:
        out = site.finish(x_in, x, out, lambda z: _product(layer, site, z))
    return out
