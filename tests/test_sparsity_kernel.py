"""The sparse GEMV inside the model (docs/architecture.md §6, "Activation sparsity"): the transposed weight
copy (`TransposedFormat`), thresholds handed from the linear-input hook to the layers (`ThresholdHook`,
`LinearSite.thresholds`), the TEAL plugin's fused steps (only when every row is its sparse decode row)
and graph mode, and the `--sparsity-kernel` flag.

On the CPU the kernel runs in Triton's interpreter in float32 through a test subclass of the format
(the real one takes CUDA half rows only), over TinyStories-656K with its calibration (the fixtures of
tests/test_sparsity.py): fused steps give transformers' tokens and logits with the same thresholds
(tests/engine_utils.py `HFTeal`), and rows of other requests keep their plain bits. On a GPU (marked
`gpu`) the real format in bf16: decode graphs replay the fused mode, close to the masked dense path, and
dense rows of a mixed batch equal an all-dense batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from actserve.interventions.base import FormatRequest, RowSpan, TransposedFormat
from actserve.interventions.sparsity.plugin import (
    FUSED,
    INPUT,
    MAX_UNION,
    TRANSPOSED,
    SparsityPlan,
    SparsityPlugin,
    TealHook,
)
from actserve.kernels.sparse_gemv_ref import silu_mul_ref_rounded, threshold_ref
from actserve.server.cli import build_parser, plugin_options
from actserve.server.contract.hooks import LinearSite
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.layers.linear import Linear, linear, silu_mul_linear
from actserve.server.models.formats import install_formats
from tests.engine_utils import HFTeal, assert_steps_close, greedy, hf_generate, run_logged
from tests.test_sparsity import PLUGIN, artifact, engine, heldout, prompts, spec, table  # noqa: F401

STEPS = 6


class InterpretedTransposed(TransposedFormat):
    """The transposed copy with the sparse kernel on CPU float32 rows (Triton's interpreter), counting
    its fused calls."""

    calls = 0

    def fuses(self, x: torch.Tensor) -> bool:
        return x.shape[0] <= 16

    def apply_thresholded(
        self,
        layer: Any,
        x: torch.Tensor,
        thr: torch.Tensor,
        silu_mul: bool = False,
        sums: str | None = None,
        count: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        InterpretedTransposed.calls += 1
        return super().apply_thresholded(layer, x, thr, silu_mul, sums, count)


def layer_with_copy(k: int, n: int, seed: int, fmt: TransposedFormat | None = None) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(k, n, bias=True)
    with torch.no_grad():
        lin.bias.normal_()
        lin.add_format(TRANSPOSED, fmt or InterpretedTransposed()).after_loading(lin)
    return lin


def test_transposed_copy_of_the_primary() -> None:
    """W^T equals the primary's W exactly; it is the layer's fused format; its dense product is the
    primary's; it is no checkpoint tensor; the real format declines CPU rows."""
    lin = layer_with_copy(40, 24, 0, TransposedFormat())
    fmt = lin.formats[TRANSPOSED]
    assert torch.equal(getattr(lin, f"{TRANSPOSED}_weight_t"), lin.weight.T)
    assert lin.thresholded is fmt and torch.equal(fmt.dense_weight(lin), lin.weight)
    assert set(lin.checkpoint_names()) == {"weight", "bias"}
    x = torch.randn(3, 40)
    torch.testing.assert_close(fmt.apply(lin, x), F.linear(x, lin.weight, lin.bias))
    assert fmt.apply_thresholded(lin, x, torch.zeros(3)) is None
    with pytest.raises(ValueError, match="reads no checkpoint tensor"):
        lin.load_tensor(f"{TRANSPOSED}_weight_t", torch.zeros(40, 24))


def site_with(
    hooks: list[Any], rows: int, inputs: dict[str, torch.Tensor], proj: str = "o_proj"
) -> LinearSite:
    site = LinearSite(0, proj)
    site.hooks = [(h, inputs, torch.ones(rows, dtype=torch.bool)) for h in hooks]
    return site


def teal_tables(levels: int, layers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A threshold table [levels, layers, 4] (level 0 zeros) and its +inf-padded twin."""
    t = torch.rand(levels, layers, 4, generator=torch.Generator().manual_seed(seed)) * 1.5
    t[0] = 0
    return t, torch.cat([t, torch.full_like(t[:1], float("inf"))])


def test_teal_hook_hands_over_thresholds_only_when_fused() -> None:
    """Both modes mask the plugin's rows alike; the fused one also returns every row's thresholds (a view
    of one gather per forward), -1 rows (padding) at +inf."""
    tab, padded = teal_tables(5, 2, 1)
    idx = torch.tensor([[3], [1], [-1]], dtype=torch.int32)
    inputs = {INPUT: idx}
    plain, fused = TealHook(tab, set()), TealHook(tab, set(), padded)
    x = torch.randn(3, 64)
    assert plain.thresholds(1, "down_proj", inputs) is None
    thr = fused.thresholds(1, "down_proj", inputs)
    assert thr is not None and torch.equal(thr, torch.tensor([tab[3, 1, 3], tab[1, 1, 3], float("inf")]))
    assert torch.equal(plain.apply(1, "down_proj", x, inputs)[:2], fused.apply(1, "down_proj", x, inputs)[:2])
    assert fused.apply(1, "down_proj", x, inputs)[2].eq(0).all()
    again = {INPUT: torch.tensor([[2], [2], [2]], dtype=torch.int32)}  # a new step's inputs: a new gather
    assert torch.equal(fused.thresholds(0, "qkv_proj", again), tab[2, 0, 0].repeat(3))  # type: ignore[arg-type]


class ZeroFirst:
    """An input hook without thresholds (zeroes column 0)."""

    def sites(self) -> set[tuple[int, str]]:
        return {(0, "o_proj")}

    def apply(self, layer: int, proj: str, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([x[:, :1] * 0, x[:, 1:]], dim=1)


def test_layers_run_the_fused_kernel_when_every_hook_hands_over_thresholds() -> None:
    """linear / silu_mul_linear take the fused kernel (thresholds of two hooks combine by max, padding rows
    give the bias), equal to masking then multiplying; a hook without thresholds, or a weight-format
    choice at the site, sends the step to the plain path."""
    tab, padded = teal_tables(4, 1, 2)
    rows = 5
    inputs = {INPUT: torch.tensor([[1], [2], [3], [1], [-1]], dtype=torch.int32)}
    hook_a, hook_b = (
        TealHook(tab, set(), padded),
        TealHook(*teal_tables(4, 1, 5)[:1], set(), teal_tables(4, 1, 5)[1]),
    )
    x = torch.randn(rows, 48) * 2
    lin = layer_with_copy(48, 20, 3)
    thr = torch.maximum(hook_a.thresholds(0, "o_proj", inputs), hook_b.thresholds(0, "o_proj", inputs))  # type: ignore[arg-type]
    want = F.linear(threshold_ref(x, thr), lin.weight, lin.bias)
    before = InterpretedTransposed.calls
    got = linear(x, lin, site_with([hook_a, hook_b], rows, inputs))
    assert InterpretedTransposed.calls == before + 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[4], lin.bias.detach())  # the padding row: nothing active
    # down projection: silu(gate) * up formed and thresholded by the kernel
    down = layer_with_copy(48, 20, 4)
    gate_up = torch.randn(rows, 96) * 2
    thr_d = hook_a.thresholds(0, "down_proj", inputs)
    got_d = silu_mul_linear(gate_up, down, site_with([hook_a], rows, inputs, "down_proj"))
    want_d = F.linear(threshold_ref(silu_mul_ref_rounded(gate_up), thr_d), down.weight, down.bias)  # type: ignore[arg-type]
    torch.testing.assert_close(got_d, want_d, atol=1e-5, rtol=1e-5)
    assert InterpretedTransposed.calls == before + 2
    # a hook without thresholds: every hook's `apply`, then the primary
    mixed = site_with([hook_a, ZeroFirst()], rows, inputs)
    masked = ZeroFirst().apply(0, "o_proj", hook_a.apply(0, "o_proj", x, inputs), inputs)
    assert torch.equal(linear(x, lin, mixed), F.linear(masked, lin.weight, lin.bias))
    # a weight-format choice at the site: the plain path too
    chosen = site_with([hook_a], rows, inputs)
    chosen.weights = [(object(), inputs, ())]  # type: ignore[list-item]
    assert torch.equal(
        linear(x, lin, chosen), F.linear(hook_a.apply(0, "o_proj", x, inputs), lin.weight, lin.bias)
    )
    assert InterpretedTransposed.calls == before + 2


def test_one_row_layers_hand_float32_sums_along() -> None:
    """One bf16 row with `sums` keys: gate_up's `linear` returns its float32 sums, `silu_mul_linear` reads
    them in the down GEMV and returns its own, and those settle to the bits of the path without sums; a
    down site that does not fuse (a weight-format choice there) settles the gate/up sums first: the same
    bits, every buffer zero after."""
    from actserve.kernels.sparse_gemv import atomic_sums, settle_sums

    tab, padded = teal_tables(4, 1, 7)
    inputs = {INPUT: torch.tensor([[2]], dtype=torch.int32)}
    hook = TealHook(tab, set(), padded)
    layers = []
    for k, n, seed in ((300, 320, 8), (160, 24, 9)):  # K of 2+ blocks: split sums that meet in atomics
        torch.manual_seed(seed)
        lin = Linear(k, n, params_dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, k**-0.5)
        lin.add_format(TRANSPOSED, InterpretedTransposed()).after_loading(lin)
        layers.append(lin)
    up, down = layers
    x = (torch.randn(1, 300) * 2).to(torch.bfloat16)
    gu_site, down_site = (
        site_with([hook], 1, inputs, "gate_up_proj"),
        site_with([hook], 1, inputs, "down_proj"),
    )
    want_gu = linear(x, up, gu_site)
    want = silu_mul_linear(want_gu, down, down_site)
    assert want_gu.dtype == want.dtype == torch.bfloat16
    gu = linear(x, up, gu_site, sums="t_gate_up")
    assert gu.dtype == torch.float32 and torch.equal(settle_sums(gu.clone(), torch.bfloat16), want_gu)
    out = silu_mul_linear(gu, down, down_site, sums="t_down", dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and torch.equal(settle_sums(out, torch.bfloat16), want)
    gu.zero_()  # the residual add's part (`zero`)
    # the down site declines: the gate/up sums are settled (rounded, zeroed), then the plain masked path
    chosen = site_with([hook], 1, inputs, "down_proj")
    chosen.weights = [(object(), inputs, ())]  # type: ignore[list-item]
    gu = linear(x, up, gu_site, sums="t_gate_up")
    plain = silu_mul_linear(gu, down, chosen, sums="t_down", dtype=torch.bfloat16)
    assert torch.equal(plain, silu_mul_linear(want_gu, down, chosen)) and not gu.any()
    for key in ("t_gate_up", "t_down"):
        assert not atomic_sums(torch.device("cpu"), 1, key).any()


def span(level: float, start: int, count: int = 1, prompt: bool = False) -> RowSpan:
    """A sequence's rows at `level`: decode rows (positions past the prompt), or prompt rows."""
    pos0 = 0 if prompt else 20
    return RowSpan(SparsityPlan("teal", round(level * 100)), start, count, pos0, 10)


def test_fused_steps(eng: LLMEngine) -> None:
    """A step is fused only with the kernel on, every row a decode row of the plugin, at most 16 rows and
    (2+ rows) an expected union of active inputs within MAX_UNION; graph mode and hooks follow; the W^T
    copies are asked for only with the kernel on."""
    plugin = eng.registry.plugin(PLUGIN)
    assert isinstance(plugin, SparsityPlugin) and not plugin.kernel  # on the CPU: off
    assert plugin.weight_formats() == [] and not plugin.fused([span(0.5, 0)], 1)
    plugin.kernel = True
    try:
        assert plugin.fused([span(0.5, 0)], 1) and plugin.graph_mode([span(0.5, 0)], 1) == FUSED
        assert not plugin.fused([span(0.5, 0)], 2)  # another request's row
        # one row: every level above 0 (the one-row kernel is as fast as the dense GEMV when dense);
        # level 0 keeps the dense path's bits
        assert plugin.fused([span(0.05, 0)], 1) and plugin.fused([span(0.9, 0)], 1)
        assert not plugin.fused([span(0.0, 0)], 1)
        assert not plugin.fused([span(0.5, 0, 3, prompt=True)], 3)  # prompt rows
        assert plugin.fused([span(0.5, 0, 2), span(0.5, 2)], 3) == (1 - 0.5**3 <= MAX_UNION)
        assert not plugin.fused([span(0.5, i) for i in range(8)], 8)  # the union covers ~all inputs
        assert not plugin.fused([span(0.9, i) for i in range(17)], 17)  # past the kernel's rows
        hook = plugin.linear_hook([span(0.5, 0)], 1)
        assert isinstance(hook, TealHook) and hook.padded is not None
        assert plugin.graph_hooks(FUSED).linear.padded is not None  # type: ignore[union-attr]
        assert getattr(plugin.graph_hooks().linear, "padded", None) is None  # the masking hook
        (req,) = plugin.weight_formats()
        assert req.key == TRANSPOSED and req.sites == frozenset(plugin.sites) and req.make is TransposedFormat
    finally:
        plugin.kernel = False
    assert plugin.graph_mode([span(0.5, 0)], 1) == "teal"  # not fused: the masking hook of TEAL alone


def test_fused_count_slot_is_filled_on_the_host(eng: LLMEngine) -> None:
    """The row inputs' SLOT column 2 (where a one-row fused GEMV counts its qkv input) holds what
    `Counters.target` picks on the device from the same rows: the slot of decode rows of the methods
    that count qkv_proj (not prompt rows, not CoreInfer's, not padding: -1)."""
    import numpy as np

    from actserve.interventions.sparsity.hooks import SLOT

    plugin = eng.registry.plugin(PLUGIN)
    assert isinstance(plugin, SparsityPlugin)
    spans = [
        RowSpan(SparsityPlan("teal", 50, slot=4), 0, 2, 20, 10),
        RowSpan(SparsityPlan("chess", 30, slot=1), 2, 4, 8, 10),  # 2 prompt rows, 2 decode rows
        RowSpan(SparsityPlan("r_sparse", 40, slot=7), 6, 1, 30, 10),
        RowSpan(SparsityPlan("coreinfer", 40, slot=2, core_slot=0), 7, 1, 30, 10),
    ]
    arrays = {ri.name: np.full((9, ri.width), ri.none, dtype=np.int32) for ri in plugin.row_inputs}
    plugin.fill_row_inputs(spans, arrays)
    inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
    assert torch.equal(plugin.counters.target("qkv_proj", inputs), inputs[SLOT][:, 2])
    assert inputs[SLOT][:, 2].tolist() == [4, 4, -1, -1, 1, 1, 7, -1, -1]


def test_kernel_option_and_flag(eng: LLMEngine) -> None:
    args = build_parser().parse_args(["serve", "--sparsity-kernel", "off", "--sparsity-calibration", "/c"])
    assert plugin_options(args)[PLUGIN] == {"calibration": "/c", "kernel": False}
    off = plugin_options(build_parser().parse_args(["serve", "--sparsity-kernel", "off"]))
    assert off[PLUGIN] == {"kernel": False}
    with pytest.raises(ValueError, match="kernel must be true or false"):
        SparsityPlugin(eng.model_info).configure({"kernel": "yes"})


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path, artifact: Path) -> LLMEngine:  # noqa: F811
    return engine(tinystories_dir, artifact)


@pytest.fixture(scope="module")
def fused_eng(tinystories_dir: Path, artifact: Path) -> LLMEngine:  # noqa: F811
    """A CPU engine whose sparse steps are fused: the plugin's kernel switched on and the interpreted W^T
    copies installed on every projection (what `weight_formats` asks for on CUDA)."""
    e = engine(tinystories_dir, artifact)
    plugin = e.registry.plugin(PLUGIN)
    assert isinstance(plugin, SparsityPlugin)
    plugin.kernel = True
    request = FormatRequest(TRANSPOSED, frozenset(plugin.sites), InterpretedTransposed)
    assert install_formats(e.loaded.model, {PLUGIN: [request]}, torch.float32) == len(plugin.sites)
    return e


def test_fused_decode_equals_transformers(
    fused_eng: LLMEngine,
    ref: Any,
    prompts: list[list[int]],  # noqa: F811
) -> None:
    """A sparse request alone: its decode steps run the kernel at every projection and give transformers'
    greedy tokens and logits with the same thresholds (the prompt runs dense)."""
    before = InterpretedTransposed.calls
    (tokens,), seen = run_logged(fused_eng, [prompts[0]], greedy(STEPS, min_tokens=STEPS), [spec(0.5)], "f")
    layers = fused_eng.model_info.num_layers
    assert InterpretedTransposed.calls - before == (STEPS - 1) * layers * 4  # every decode step, every site
    with HFTeal(ref, table(fused_eng)[50], decode_only=True):
        ref_tokens, ref_logits = hf_generate(ref, prompts[0], STEPS)
    assert tokens == ref_tokens
    assert_steps_close(seen["f0"], ref_logits, 5e-5, "fused 0.5")


def test_fused_steps_feed_the_achieved_sparsity_histogram(
    fused_eng: LLMEngine,
    ref: Any,
    prompts: list[list[int]],  # noqa: F811
) -> None:
    """A fused request (no `apply` called) is still observed at its finish: from the qkv inputs the fused
    matmul saw, the share below the thresholds, as transformers' q_proj inputs count it."""
    name, labels = "actserve_sparsity_achieved_ratio", {"model_name": fused_eng.model_name, "method": "teal"}
    before = fused_eng.metrics.registry.get_sample_value(f"{name}_count", labels) or 0.0
    total0 = fused_eng.metrics.registry.get_sample_value(f"{name}_sum", labels) or 0.0
    calls = InterpretedTransposed.calls
    run_logged(fused_eng, [prompts[1]], greedy(STEPS, min_tokens=STEPS), [spec(0.5)], "c")
    assert InterpretedTransposed.calls > calls  # the steps were fused
    with HFTeal(ref, table(fused_eng)[50], decode_only=True) as h:
        hf_generate(ref, prompts[1], STEPS)
    qkv = [c for (_, p), c in h.counts.items() if p == "qkv_proj"]
    expect = sum(z for z, _ in qkv) / sum(n for _, n in qkv)
    assert fused_eng.metrics.registry.get_sample_value(f"{name}_count", labels) == before + 1
    got = fused_eng.metrics.registry.get_sample_value(f"{name}_sum", labels) - total0  # type: ignore[operator]
    assert abs(got - expect) < 1e-3, (got, expect)


def test_mixed_batch_keeps_dense_rows_bit_identical(
    fused_eng: LLMEngine,
    eng: LLMEngine,
    prompts: list[list[int]],  # noqa: F811
) -> None:
    """Sparse and dense requests together: no step is fused (the dense row would leave its plain bits),
    so the dense row's logits equal an all-dense batch's bit for bit, and the sparse rows the masked path's
    (the engine without the copies)."""
    params = greedy(STEPS, min_tokens=STEPS)
    before = InterpretedTransposed.calls
    specs = [spec(0.5), None, spec(0.3)]
    toks, seen = run_logged(fused_eng, prompts, params, specs, "m")
    assert InterpretedTransposed.calls == before
    _, plain = run_logged(fused_eng, prompts, params, [None, None, None], "p")
    assert all(torch.equal(a, b) for a, b in zip(seen["m1"], plain["p1"], strict=True))
    masked_toks, masked = run_logged(eng, prompts, params, specs, "k")
    assert toks == masked_toks
    for i in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(seen[f"m{i}"], masked[f"k{i}"], strict=True))


# -- on the GPU: the real format in bf16, decode graphs ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_graphs(tinystories_dir: Path, tmp_path: Path, heldout: list[str]) -> None:  # noqa: F811
    """bf16 on CUDA, calibrated there: sparse-only batches (1 and 3 rows: bucket 4 has a padding row) replay
    the plugin's fused graph mode with no eager decode step and stay close to the masked dense path
    (`--sparsity-kernel off`: tokens mostly equal, first decode logits close) and leave every buffer of
    pending sums zero; a mixed batch replays the plain mode and its dense rows keep the tokens of an
    all-dense batch."""
    from transformers import AutoTokenizer

    from actserve.server.cli import main

    out = tmp_path / "cal.safetensors"
    argv = [
        "sparsity",
        "calibrate",
        "--model",
        str(tinystories_dir),
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
    ]
    text = Path(__file__).resolve().parents[1] / "bench" / "data" / "fp4_quality" / "tinystories_calib.jsonl"
    assert main([*argv, "--text", str(text), "--out", str(out), "--correction-tokens", "1024"]) == 0
    kw: dict[str, Any] = {"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 256}
    fast = engine(tinystories_dir, out, **kw)
    options = {PLUGIN: {"calibration": str(out), "kernel": False}}
    off = LLMEngine(EngineConfig(model=str(tinystories_dir), plugin_options=options, **kw))
    lin = fast.loaded.model.projection(0, "qkv_proj")
    assert isinstance(lin.thresholded, TransposedFormat)
    assert not off.loaded.model.projection(0, "qkv_proj").thresholded
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    prompts_ = [tok(t).input_ids[:16] for t in heldout[:4]]
    params = greedy(24, min_tokens=24)
    for batch, specs in (([prompts_[0]], [spec(0.5)]), (prompts_[1:4], [spec(0.7), spec(0.7), spec(0.8)])):
        eager0 = fast.runner.eager_decode_steps
        a, seen_a = run_logged(fast, batch, params, specs, "a")
        assert fast.runner.eager_decode_steps == eager0
        b, seen_b = run_logged(off, batch, params, specs, "b")
        assert sum(x == y for x, y in zip(a, b, strict=True)) >= len(batch) - 1
        for i in range(len(batch)):
            assert (seen_a[f"a{i}"][1].float() - seen_b[f"b{i}"][1].float()).abs().max() < 0.25
    assert any(("sparsity", FUSED) in v for v in fast.runner.graphs.variants)  # type: ignore[union-attr]
    # one-row fused steps left float32 sums per projection for their readers, which zeroed them all
    from actserve.kernels.sparse_gemv import atomic_sums

    for key in ("", "qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert not atomic_sums(torch.device("cuda"), 1, key).any(), key
    specs = [spec(0.5), None, spec(0.6), None]
    mixed = run_logged(fast, prompts_, params, specs, "m")[0]
    plain = run_logged(fast, prompts_, params, [None] * 4, "p")[0]
    assert [mixed[i] for i in (1, 3)] == [plain[i] for i in (1, 3)]
