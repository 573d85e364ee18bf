"""The linear-output half of the linear hook point (server/contract/hooks.py `LinearOutputHook`): a linear
hook that also defines `output` sees the projection's input before and after the input hooks, the product,
and the site's product over any other input; against plain torch on random weights (float64)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from actserve.server.contract.hooks import BoundHooks, LinearCall, PluginHooks, StepHooks
from actserve.server.layers.linear import Linear, MergedColumnLinear, linear, silu_mul_linear


class Halve:
    """Input hook: halves the input; `output` records the call and adds matmul(x_in) - y (so the result
    is the product over the untouched input)."""

    def __init__(self, sites: set[tuple[int, str]]) -> None:
        self._sites = sites
        self.calls: list[LinearCall] = []

    def sites(self) -> set[tuple[int, str]]:
        return self._sites

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        return x * 0.5

    def output(self, layer: int, proj: str, call: LinearCall, inputs: Any) -> torch.Tensor:
        self.calls.append(call)
        return call.y + (call.matmul(call.x_in) - call.y)


class InputOnly(Halve):
    output = None  # type: ignore[assignment]


def site(hook: Any, proj: str, rows: int) -> Any:
    bound = BoundHooks(PluginHooks(linear=hook), {}, torch.ones(rows, dtype=torch.bool))
    return StepHooks([], plugins=[bound]).linear_at(0)[proj]  # type: ignore[index]


def test_output_hook_sees_both_inputs_the_product_and_a_matmul() -> None:
    g = torch.Generator().manual_seed(0)
    layer = MergedColumnLinear(16, [8, 4], bias=True, params_dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(12, generator=g, dtype=torch.float64))
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    hook = Halve({(0, "qkv_proj")})
    y = linear(x, layer, site(hook, "qkv_proj", 3))
    (call,) = hook.calls
    assert torch.equal(call.x_in, x) and torch.equal(call.x, x * 0.5)
    assert torch.allclose(call.y, F.linear(x * 0.5, layer.weight, layer.bias), atol=1e-12)
    z = torch.randn(2, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(call.matmul(z), F.linear(z, layer.weight, layer.bias), atol=1e-12)
    assert torch.allclose(y, F.linear(x, layer.weight, layer.bias), atol=1e-12)
    plain = InputOnly({(0, "qkv_proj")})  # no `output`: the site has no output hook
    s = site(plain, "qkv_proj", 3)
    assert not s.outputs and torch.allclose(linear(x, layer, s), F.linear(x * 0.5, layer.weight, layer.bias))


def test_output_hook_at_the_down_projection_sees_silu_mul() -> None:
    """CPU: the down projection's input before the hooks is silu(gate) * up, formed explicitly."""
    g = torch.Generator().manual_seed(1)
    layer = Linear(8, 5, params_dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 8, generator=g, dtype=torch.float64))
    gate_up = torch.randn(4, 16, generator=g, dtype=torch.float64)
    hook = Halve({(0, "down_proj")})
    y = silu_mul_linear(gate_up, layer, site(hook, "down_proj", 4))
    expect = F.silu(gate_up[:, :8]) * gate_up[:, 8:]
    (call,) = hook.calls
    assert torch.equal(call.x_in, expect) and torch.equal(call.x, expect * 0.5)
    assert torch.allclose(y, F.linear(expect, layer.weight), atol=1e-12)
