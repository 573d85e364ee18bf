"""Tensor parallelism on the CPU (gloo, float32), TinyStories-656K split over 2 ranks against the same
engine on one rank: logits at prefill and at every decode step within 1e-5, identical greedy tokens, with
chunked prefill and chained (overlapped) decode steps; steered, CoT-compressed, logit-biased and mixed
batches; prompt logprobs; collect mode (residuals gathered on rank 0, a KL meter's private table); and
what stays refused under TP (per request and at start, before any other rank is spawned).

One TP engine for the module: rank 0 in this process, rank 1 spawned by it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from actserve.interventions.base import InterventionError
from actserve.interventions.cot_compression.artifact import AscArtifact, Onset, load_artifact, save_artifact
from actserve.interventions.cot_compression.measure import Continuation, KLMeter
from actserve.interventions.steering.train import train_vector
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from actserve.server.engine.offline import make_sequences, run_sequences
from actserve.server.engine.sampling_params import SamplingParams
from tests.conftest import save_random_model
from tests.engine_utils import capture_logits, greedy, run

# 1e-5 relative to the logits' scale: an absolute 1e-5 is below float32's own error here (TinyStories'
# logits reach 19; one rank's float32 logits are ~1e-5 from float64's, and the split sums round differently)
TOL = 1e-5


def close(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| in units of TOL x the logits' scale (passes below 1)."""
    return (x - y).abs().max().item() / (TOL * max(1.0, y.abs().max().item()))


STEPS = 10
ART_LAYER, ONSET_LAYER = 1, 0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CoT compression artifact for TinyStories (random directions, an onset push, a KL table)."""
    g = torch.Generator().manual_seed(7)
    art = AscArtifact(
        direction=torch.randn(128, generator=g), layer=ART_LAYER, num_layers=2, model="tinystories-656k",
        gammas=[1.0, 2.0, 4.0], kls=[0.01, 0.04, 0.15],
        onset=Onset(torch.randn(128, generator=g), ONSET_LAYER, tokens=3, weight=2.0),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tp_asc") / "asc.safetensors"
    save_artifact(art, path)
    return path


def config(model: Path, artifact: Path, **kw: Any) -> EngineConfig:
    return EngineConfig(
        model=str(model), num_kv_blocks=96, block_size=8, max_model_len=256, max_num_batched_tokens=24,
        max_num_seqs=8, plugin_options={"cot_compression": {"artifact": str(artifact)}}, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one(tinystories_dir: Path, artifact: Path) -> LLMEngine:
    return LLMEngine(config(tinystories_dir, artifact))


@pytest.fixture(scope="module")
def two(tinystories_dir: Path, artifact: Path) -> Iterator[LLMEngine]:
    """TP=2, with chained decode steps (overlap) on: the next step's input ids reach rank 1 by broadcast."""
    eng = LLMEngine(config(tinystories_dir, artifact, tensor_parallel_size=2, overlap_steps=True))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [[1, *torch.randint(3, 2048, (n,), generator=g).tolist()] for n in (5, 19, 33, 12)]


Specs = list[dict[str, Any] | None] | None


def compare(
    one: LLMEngine, two: LLMEngine, prompts: list[list[int]], specs: Specs = None
) -> tuple[list[list[int]], dict[str, list[torch.Tensor]]]:
    """The same batch on both engines: every step's logits within TOL, the same tokens."""
    params = greedy(STEPS)  # ignore_eos: every row runs STEPS steps (and steps chain)
    with capture_logits() as a:
        out1 = run(one, prompts, params, specs, tag="s")
    with capture_logits() as b:
        out2 = run(two, prompts, params, specs, tag="s")
    assert out2 == out1
    for key in a:
        assert len(a[key]) == len(b[key]) == STEPS
        for step, (x, y) in enumerate(zip(a[key], b[key], strict=True)):
            assert close(y, x) < 1, f"{key} step {step}: max |logit diff| {(x - y).abs().max().item():.2e}"
    return out1, a


def test_plain_batch_equals_one_rank(one: LLMEngine, two: LLMEngine, prompts: list[list[int]]) -> None:
    assert two.model_info.tensor_parallel_size == 2 and two.runner.comm.world == 2
    assert two.runner.kv_caches[0].shape[2] * 2 == one.runner.kv_caches[0].shape[2]  # KV heads split
    compare(one, two, prompts)
    assert two.chained_steps > 0  # decode steps launched from rank 0's device tokens


def steer_spec(seed: int, layers: tuple[int, ...], scale: float, normalize: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    dirs = {str(layer): (torch.randn(128, generator=g) * 0.5).tolist() for layer in layers}
    return {"steering": {"vectors": [{"directions": dirs, "scale": scale, "normalize": normalize}]}}


def test_steered_cot_and_mixed_batches_equal_one_rank(
    one: LLMEngine, two: LLMEngine, prompts: list[list[int]]
) -> None:
    """Plain, steered (two kinds), CoT-compressed and logit-biased rows in one batch; the steering plugin's
    table reaches rank 1 through the activations replayed there."""
    specs: list[dict[str, Any] | None] = [
        steer_spec(1, (0, 1), 6.0),
        None,
        {"cot_compression": {"strength": 6.0}, **steer_spec(2, (1,), 3.0, normalize=True)},
        {"logit_bias": {"bias": {"17": 8.0, "40": -100.0}}},
    ]
    steered, logits = compare(one, two, prompts, specs)
    plain, _ = compare(one, two, prompts)
    assert steered[0] != plain[0] and steered[2] != plain[2]  # the interventions act
    assert steered[1] == plain[1]


def test_prompt_logprobs_equal_one_rank(one: LLMEngine, two: LLMEngine) -> None:
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2, logprobs=1)
    fresh = [[1, *range(300 + 7 * i, 330 + 7 * i)] for i in range(2)]  # not in the prefix cache yet
    got = []
    for eng in (one, two):
        seqs = make_sequences(eng, fresh, params, tag="p")
        run_sequences(eng, seqs)
        got.append([s.prompt_logprobs for s in seqs])
    for a, b in zip(got[0], got[1], strict=True):
        assert a is not None and b is not None and len(a) == len(b)
        for x, y in zip(a[1:], b[1:], strict=True):
            assert x is not None and y is not None and x.token_id == y.token_id
            assert abs(x.logprob - y.logprob) < TOL * max(1.0, abs(x.logprob))


def test_collect_residuals_and_logits_gathered_on_rank0(
    one: LLMEngine, two: LLMEngine, prompts: list[list[int]]
) -> None:
    kw: dict[str, Any] = {"logit_positions": [range(2, len(p)) for p in prompts]}
    a = one.runner.collect(prompts, [0, 1], position="mean", **kw)
    b = two.runner.collect(prompts, [0, 1], position="mean", **kw)
    assert a.residuals is not None and b.residuals is not None
    assert close(b.residuals, a.residuals) < 1
    assert a.logits is not None and b.logits is not None
    assert close(b.logits, a.logits) < 1
    assert two.blocks.num_free == two.blocks.num_blocks  # borrowed blocks given back


def test_vector_training_equals_one_rank(one: LLMEngine, two: LLMEngine) -> None:
    """`train_vector` (the training route's and the CLI's path) reads residuals on rank 0."""
    pos = ["The dog was very happy and laughed.", "She smiled at the sun all day."]
    neg = ["The dog was very sad and cried.", "She frowned at the rain all day."]
    got = [
        train_vector(eng.runner, eng.tokenizer, pos, neg, method="pca_diff", position="mean", progress=False)
        for eng in (one, two)
    ]
    for layer, d in got[0].directions.items():
        assert close(got[1].directions[layer], d) < 1, layer


def test_kl_meter_private_table(
    one: LLMEngine, two: LLMEngine, prompts: list[list[int]], artifact: Path
) -> None:
    """CoT compression's KL meter steers collect forwards through its own plugin instance and table,
    which rank 1 never saw filled: the rows a forward reads travel with it."""
    art = load_artifact(artifact)
    seqs = [Continuation(p[:6], p[6:]) for p in prompts[1:]]
    kls = []
    for eng in (one, two):
        meter = KLMeter(eng.runner, eng.model_info, art, seqs)
        kls.append([meter.kl(g) for g in (1.0, 4.0)])
    assert kls[0][1] > kls[0][0] > 0
    for x, y in zip(kls[0], kls[1], strict=True):
        assert abs(x - y) < 1e-5 * max(1.0, x)


def test_unsupported_plugins_are_refused_per_request(two: LLMEngine) -> None:
    """Every installed plugin that does not declare how it runs split over ranks gets a 400 naming it."""
    refused = two.registry.refused
    assert {"sparsity", "kv_retrieval", "precision"} <= set(refused)
    for name in refused:
        assert name not in two.registry.plugins
        with pytest.raises(InterventionError) as e:
            two.registry.prepare({name: {}})
        assert e.value.param == f"interventions.{name}"
        assert "--tensor-parallel-size 2" in str(e.value)


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"tensor_parallel_size": 3}, ["--tensor-parallel-size 3", "num_attention_heads (8)"]),
        ({"quantization": "nvfp4"}, ["--tensor-parallel-size 2", "FP4"]),
        ({"kv_offload_gb": 1.0}, ["--kv-offload-gb"]),
        ({"force_transformers": True}, ["--tensor-parallel-size 2", "transformers fallback"]),
        ({"plugin_options": {"sparsity": {"kernel": False}}}, ["sparsity", "--tensor-parallel-size 2"]),
        ({"tp_allreduce": "symm_mem"}, ["symm_mem", "CUDA"]),
    ],
)
def test_refused_at_start_before_any_rank_starts(
    tinystories_dir: Path, change: dict[str, Any], words: list[str]
) -> None:
    before = children()
    kw: dict[str, Any] = {"tensor_parallel_size": 2, **change}
    with pytest.raises(Exception) as e:
        LLMEngine(EngineConfig(model=str(tinystories_dir), num_kv_blocks=64, **kw))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert children() <= before  # nothing was spawned


def test_moe_model_refused(tmp_path: Path) -> None:
    from transformers import MixtralConfig

    cfg = MixtralConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    model = save_random_model(cfg, tmp_path / "mixtral")
    with pytest.raises(Exception, match="mixture-of-experts"):
        LLMEngine(EngineConfig(model=str(model), num_kv_blocks=16, tensor_parallel_size=2))


def test_thread_mode_refused() -> None:
    from actserve.server.engine.async_engine import make_engine

    with pytest.raises(ValueError, match="--engine-process off"):
        make_engine(EngineConfig(tensor_parallel_size=2, engine_process="off"))
