"""LLM-FP4 W4A4 fake-quant (server/layers/llm_fp4.py): activations land on the scaled E2M1 grid, the
per-channel folding is exact, and the searches never do worse than round-to-nearest."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from actserve.server.cli import build_parser, engine_config
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.layers.llm_fp4 import (
    LlmFp4Format,
    attach,
    channel_scales,
    fake_quant,
    fold,
    quantize_linear,
    search_act_scale,
    search_weight,
)
from actserve.server.models.builder import LoadConfig, load_model
from tests.engine_utils import HF_MODULES, assert_steps_close, capture_logits, greedy, hf_generate, run

STEPS = 6


def outlier_case(seed: int, n: int = 40, k: int = 96, t: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [n, k] and inputs [t, k] whose channels span ~2^-3..2^6 in magnitude, 3 of them 50x."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(t, k, generator=g) * torch.exp2(torch.rand(k, generator=g) * 6 - 3)
    x[:, torch.randperm(k, generator=g)[:3]] *= 50
    return w, x


def e2m1_grid_f64() -> torch.Tensor:
    """All E2M1 values, enumerated from the format (1 sign, 2 exponent bits bias 1, 1 mantissa bit)."""
    vals = set()
    for sign, e, m in itertools.product((1.0, -1.0), range(4), range(2)):
        vals.add(sign * (m / 2 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)))
    return torch.tensor(sorted(vals), dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_activations_on_scaled_e2m1_grid(seed: int) -> None:
    w, x = outlier_case(seed)
    q = quantize_linear(w, x, x.abs().amax(0))
    fresh = outlier_case(seed + 100)[1] * 1.5  # new draws, some beyond the calibration range
    xq = q.quantize_input(fresh).double()
    grid = e2m1_grid_f64()
    assert grid.numel() == 15
    a = q.act_scale
    points = (grid * a).float().double()  # the scaled grid, as float32 numbers
    on_grid = (xq[..., None] == points).any(-1)
    assert on_grid.all()
    # and it is the nearest point to x / s (saturating at +-6 a)
    target = (fresh.double() / q.in_scale.double()).clamp(-6 * a, 6 * a)
    dist = (target[..., None] - grid * a).abs()
    nearest = dist.min(-1).values
    assert ((xq - target).abs() <= nearest + 1e-6 * a).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_folding_is_exact_without_quantizers(alpha: float) -> None:
    w, x = outlier_case(7)
    s = channel_scales(x.abs().amax(0), alpha)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    fresh = outlier_case(8)[1]
    lin = torch.nn.functional.linear
    torch.testing.assert_close(lin(fresh / s, fold(w, s)), lin(fresh, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_weight_search_never_worse_than_unsearched(seed: int) -> None:
    w, x = outlier_case(seed + 20)
    w[:, :2] *= 8  # outlier columns in the weights too
    found, scales = search_weight(w, x)
    rtn, _ = search_weight(w, x, ratios=(1.0,))
    err = (x.double() @ (w.double() - found.double()).T).norm(dim=0)
    base = (x.double() @ (w.double() - rtn.double()).T).norm(dim=0)
    assert (err <= base * (1 + 1e-9)).all()
    assert err.norm() < base.norm()
    assert scales.shape == (w.shape[0], 1)


@pytest.mark.parametrize("seed", range(3))
def test_act_search_never_worse_than_absmax(seed: int) -> None:
    w, x = outlier_case(seed + 40)
    s = channel_scales(x.abs().amax(0), 1.0)
    xs, ws = x / s, fold(w, s)
    ref = xs.double() @ ws.double().T

    def err(ratios: tuple[float, ...]) -> float:
        a = torch.tensor(search_act_scale(xs, ws, ratios))
        return float((fake_quant(xs, a).double() @ ws.double().T - ref).norm())

    assert err((1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)) <= err((1.0,)) * (1 + 1e-9)


def test_alpha_choice_never_worse_than_no_migration() -> None:
    """The alpha search against alpha = 0 (no per-channel activation scales) on the calibration data:
    the W4A4 output error of the chosen form is never above it."""
    w, x = outlier_case(3)
    ref = x.double() @ w.double().T
    errs = []
    for alphas in ((1.0, 0.5, 0.0), (0.0,)):
        q = quantize_linear(w, x, x.abs().amax(0), alphas=alphas)
        errs.append(float((q.quantize_input(x).double() @ q.weight.double().T - ref).norm()))
    assert errs[0] <= errs[1] * (1 + 1e-9)


# ------------------------------------------------------------------- served: --quantization llm-fp4


def test_served_logits_equal_the_bench_fake_quant_model(tinystories_dir: Path, ref: torch.nn.Module) -> None:
    """`--quantization llm-fp4` on TinyStories: the engine's logits are transformers' with the bench's
    fake-quant (`attach`: folded fake-quantized weight + input pre-hook) of the same LLM-FP4 forms."""
    args = build_parser().parse_args(["serve", "--quantization", "llm-fp4"])
    assert engine_config(args).load_config().quantization == "llm-fp4"
    engine = LLMEngine(
        EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, block_size=8, quantization="llm-fp4")
    )
    ours = engine.loaded.model.model.layers
    saved = {m: m.weight.detach().clone() for m in ref.modules() if isinstance(m, torch.nn.Linear)}
    handles = []
    try:
        for i, layer in enumerate(ref.model.layers):
            for proj, (block, names) in HF_MODULES.items():
                fmt = getattr(getattr(ours[i], block), proj).format
                assert isinstance(fmt, LlmFp4Format)
                start = 0
                for name in names:
                    lin = getattr(getattr(layer, block), name)
                    handles.append(attach(lin, fmt.q.rows(start, lin.out_features)))
                    start += lin.out_features
        prompts = [[5, 99, 431, 12, 7, 1500, 23], [3, 77, 640, 8, 1024, 9, 88, 300, 41, 17, 260]]
        with capture_logits() as seen:
            outs = run(engine, prompts, greedy(STEPS, min_tokens=STEPS), tag="s")
        for i, prompt in enumerate(prompts):
            tokens, logits = hf_generate(ref, prompt, STEPS)
            assert_steps_close(seen[f"s{i}"], logits, 1e-4, f"prompt {i}")
            assert outs[i] == tokens
    finally:
        for h in handles:
            h.remove()
        for m, w in saved.items():
            m.weight.data.copy_(w)
    # and it is not the dense model
    with torch.no_grad():
        dense = ref(torch.tensor([prompts[0]])).logits[0, -1]
    assert (dense - seen["s0"][0]).abs().max() > 1e-2


def test_served_dense_weight_is_unfolded(tinystories_dir: Path) -> None:
    """A served projection's `dense_weight` is the fake-quantized weight divided back by the channel
    scales: with quantizers off, x @ dense_weight^T equals (x / s) @ (stored weight)^T."""
    loaded = load_model(
        LoadConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=64, quantization="llm-fp4")
    )
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(5, qkv.input_size)
    s = qkv.format.q.in_scale
    lin = torch.nn.functional.linear
    torch.testing.assert_close(lin(x, qkv.dense_weight()), lin(x / s, qkv.weight), rtol=1e-5, atol=1e-5)
