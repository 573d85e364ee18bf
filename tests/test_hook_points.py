"""Contract v2 hook points (docs/architecture.md §6), through third-party-style plugins installed via the
`actserve.interventions` entry-point group (tests/plugins/actserve_test_plugins, scripts/setup.sh):
`test_logit_bias` (logits hook) and `test_zero_channels` (linear-input hook), each against transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

from actserve.interventions import registry as registry_module
from actserve.server.engine.config import EngineConfig
from actserve.server.engine.llm_engine import LLMEngine
from tests.conftest import ENGINE_MODES, start_server
from tests.engine_utils import greedy, run_logged

STEPS = 8
TEXTS = ["Once upon a time, there was a", "The dog was happy because", "Sam saw a big tree", "Lily"]
TEST_PLUGINS = ("test_logit_bias", "test_zero_channels")


@pytest.fixture(scope="module")
def eng(tinystories_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=256))


@pytest.fixture(scope="module")
def prompts(tinystories_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    return [tok.encode(t) for t in TEXTS]


def ours(
    eng: LLMEngine, prompts: list[list[int]], specs: list[Any], tag: str
) -> tuple[list[list[int]], dict]:
    """STEPS greedy tokens each (min_tokens as transformers' min_new_tokens) and the logits seen."""
    return run_logged(eng, prompts, greedy(STEPS, min_tokens=STEPS), specs, tag)


class _Bias(LogitsProcessor):
    def __init__(self, ids: list[int], bias: float) -> None:
        self.ids, self.bias = ids, bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids] += self.bias
        return scores


def hf_generate(ref: Any, prompt: list[int], processors: list[Any] | None = None) -> tuple[list[int], list]:
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        logits_processor=LogitsProcessorList(processors or []),
    )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [x[0] for x in out.logits]


# our projection -> transformers modules whose input it is
HF_MODULES = {
    "qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]),
    "o_proj": ("self_attn", ["o_proj"]),
    "gate_up_proj": ("mlp", ["gate_proj", "up_proj"]),
    "down_proj": ("mlp", ["down_proj"]),
}


def hf_zeroed(
    ref: Any, prompt: list[int], layer: int, proj: str, channels: list[int]
) -> tuple[list[int], list]:
    """Greedy decode of transformers with a forward_pre_hook zeroing those input channels."""

    def pre(_m: Any, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., channels] = 0
        return (x, *args[1:])

    block, names = HF_MODULES[proj]
    parent = getattr(ref.model.layers[layer], block)
    handles = [getattr(parent, n).register_forward_pre_hook(pre) for n in names]
    try:
        return hf_generate(ref, prompt)
    finally:
        for h in handles:
            h.remove()


def bias_spec(ids: list[int], bias: float) -> dict[str, Any]:
    return {"test_logit_bias": {"token_ids": ids, "bias": bias}}


def zero_spec(layer: int, proj: str, channels: list[int]) -> dict[str, Any]:
    return {"test_zero_channels": {"layer": layer, "projection": proj, "channels": channels}}


def test_plugins_found_through_entry_points(eng: LLMEngine) -> None:
    names = {d["name"]: d for d in eng.registry.describe()}
    assert set(TEST_PLUGINS) <= set(names)
    assert names["test_logit_bias"]["hook_points"] == ["logits"]
    assert names["test_zero_channels"]["hook_points"] == ["linear_input"]


def test_logit_bias_equals_transformers_plus_bias(eng: LLMEngine, ref: Any, prompts: list[list[int]]) -> None:
    ids, bias = [5, 77, 300], 6.0
    (tokens,), seen = ours(eng, [prompts[0]], [bias_spec(ids, bias)], tag="b")
    ref_tokens, ref_logits = hf_generate(ref, prompts[0], [_Bias(ids, bias)])
    for step, (a, b) in enumerate(zip(seen["b0"], ref_logits, strict=True)):
        b = b.clone()
        b[ids] += bias
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert tokens == ref_tokens


def test_large_bias_forces_the_token(eng: LLMEngine, prompts: list[list[int]]) -> None:
    (tokens,), _ = ours(eng, [prompts[1]], [bias_spec([123], 1e4)], tag="f")
    assert tokens == [123] * STEPS


@pytest.mark.parametrize(
    ("layer", "proj"), [(1, "down_proj"), (0, "o_proj"), (1, "qkv_proj"), (0, "gate_up_proj")]
)
def test_zero_channels_equals_transformers_pre_hook(
    eng: LLMEngine, ref: Any, prompts: list[list[int]], layer: int, proj: str
) -> None:
    channels = [0, 3, 17, 40, 41, 99]
    (tokens,), seen = ours(eng, [prompts[2]], [zero_spec(layer, proj, channels)], tag="z")
    ref_tokens, ref_logits = hf_zeroed(ref, prompts[2], layer, proj, channels)
    plain_tokens, plain_logits = hf_generate(ref, prompts[2])
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(ref_logits, plain_logits, strict=True))  # it acts
    for step, (a, b) in enumerate(zip(seen["z0"], ref_logits, strict=True)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
    assert tokens == ref_tokens


MIXED = [
    bias_spec([9, 10], 3.0),
    zero_spec(1, "down_proj", [1, 2, 3, 4]),
    {"steering": {"vectors": [{"directions": {"0": [0.1] * 128}, "scale": 2.0}]},
     **zero_spec(0, "qkv_proj", [5, 6])},
    None,
]  # fmt: skip


def test_mixed_batch_equals_each_request_solo(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Plugin rows, a steered + plugin row and a plain row together == each alone (tokens exact; logits
    within 1e-4: CPU matmuls of other widths may round differently, as in tests/test_steering.py)."""
    batched, seen = ours(eng, prompts, MIXED, tag="m")
    _, plain_seen = ours(eng, prompts[:3], [None] * 3, tag="p")
    for i, (p, s) in enumerate(zip(prompts, MIXED, strict=True)):
        (solo,), solo_seen = ours(eng, [p], [s], tag=f"s{i}_")
        assert batched[i] == solo, i
        for a, b in zip(seen[f"m{i}"], solo_seen[f"s{i}_0"], strict=True):
            assert (a - b).abs().max().item() < 1e-4, i
    for i in range(3):  # each intervention acted
        assert (seen[f"m{i}"][0] - plain_seen[f"p{i}"][0]).abs().max().item() > 1e-3, i


def test_plain_rows_bit_identical_to_a_server_without_the_plugins(
    eng: LLMEngine, tinystories_dir: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    found = registry_module.discover()
    monkeypatch.setattr(
        registry_module, "discover", lambda: {k: v for k, v in found.items() if k not in TEST_PLUGINS}
    )
    bare = LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=256))
    assert not set(TEST_PLUGINS) & set(bare.registry.plugins)
    # the same batch on both servers: plugin rows on the one that has them, plain rows there on the other
    batch = [prompts[0], prompts[1], prompts[3], prompts[2]]
    without, without_seen = ours(bare, batch, [None] * 4, tag="w")
    mixed, mixed_seen = ours(eng, batch, [None, MIXED[0], None, MIXED[1]], tag="x")
    assert [mixed[0], mixed[2]] == [without[0], without[2]]
    for i in (0, 2):
        for a, b in zip(mixed_seen[f"x{i}"], without_seen[f"w{i}"], strict=True):
            assert torch.equal(a, b)
    for i in (1, 3):  # the plugin rows did change
        assert (mixed_seen[f"x{i}"][0] - without_seen[f"w{i}"][0]).abs().max().item() > 1e-3, i


def test_prompt_logprobs_see_the_logit_bias(eng: LLMEngine, ref: Any, prompts: list[list[int]]) -> None:
    """The logits hook acts on prompt-logprob rows too: they equal log_softmax(transformers + bias)."""
    from actserve.server.engine.offline import make_sequences, run_sequences

    prompt, ids, bias = prompts[0], [prompts[0][3], 50], 5.0
    (seq,) = make_sequences(eng, [prompt], greedy(1, prompt_logprobs=0), [bias_spec(ids, bias)], tag="lp")
    run_sequences(eng, [seq])
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float()
    logits[:, ids] += bias
    want = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    assert seq.prompt_logprobs is not None and seq.prompt_logprobs[0] is None
    got = torch.tensor([t.logprob for t in seq.prompt_logprobs[1:]])
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", list(ENGINE_MODES))
def test_over_http(tinystories_dir: Path, mode: str) -> None:
    """Thread and process engines: the plugins are listed, forced tokens come back, bad specs are 400s."""
    server = start_server(tinystories_dir, engine_process=ENGINE_MODES[mode])
    try:
        listed = {d["name"]: d for d in httpx.get(f"{server.url}/v1/interventions").json()["data"]}
        assert set(TEST_PLUGINS) <= set(listed)
        assert "token_ids" in listed["test_logit_bias"]["schema"]["properties"]
        body = {"model": "tinystories-656k", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
                "logprobs": 1, "interventions": bias_spec([123], 1e4)}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        tok = AutoTokenizer.from_pretrained(tinystories_dir)
        assert r.json()["choices"][0]["text"] == tok.decode([123] * 4)
        bad = {**body, "interventions": bias_spec([10**7], 1.0)}
        r = httpx.post(f"{server.url}/v1/completions", json=bad, timeout=60)
        assert r.status_code == 400 and "token_ids" in r.text
        body = {**body, "interventions": zero_spec(1, "down_proj", [1, 2, 3])}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        server.stop()


def test_transformers_fallback_logits_hook_and_refusal(
    tinystories_dir: Path, prompts: list[list[int]]
) -> None:
    """The fallback runs logits hooks too; a linear-input plugin refuses it (InterventionError)."""
    from actserve.interventions.base import InterventionError

    fallback = LLMEngine(
        EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=64, force_transformers=True)
    )
    (tokens,), _ = ours(fallback, [prompts[1]], [bias_spec([123], 1e4)], tag="hf")
    assert tokens == [123] * STEPS
    with pytest.raises(InterventionError):
        fallback.registry.prepare(zero_spec(1, "down_proj", [1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("proj", ["down_proj", "o_proj"])
def test_cuda_linear_hook_keeps_other_rows_on_the_fast_path(
    tinystories_dir: Path, prompts: list[list[int]], proj: str
) -> None:
    """bf16 on CUDA (eager): plain rows beside a zero-channels row are bit-identical to the same batch
    without it (down_proj: the fused silu·mul GEMV stays their path); the hooked row matches a float32
    CPU run of the same request roughly and differs from its plain run."""
    cuda = LLMEngine(
        EngineConfig(model=str(tinystories_dir), dtype="bfloat16", enforce_eager=True, num_kv_blocks=256)
    )
    z = zero_spec(1, proj, list(range(0, 64, 8)))  # the plugin takes at most 8 channels
    plain, plain_seen = ours(cuda, prompts, [None] * 4, tag="cp")
    mixed, mixed_seen = ours(cuda, prompts, [None, z, None, None], tag="cm")
    for i in (0, 2, 3):
        assert mixed[i] == plain[i]
        for a, b in zip(mixed_seen[f"cm{i}"], plain_seen[f"cp{i}"], strict=True):
            assert torch.equal(a, b), i
    assert (mixed_seen["cm1"][0] - plain_seen["cp1"][0]).abs().max().item() > 1e-2
    cpu = LLMEngine(EngineConfig(model=str(tinystories_dir), device="cpu", num_kv_blocks=256))
    _, cpu_seen = ours(cpu, [prompts[1]], [z], tag="cc")
    hooked, ref = mixed_seen["cm1"][0].float().cpu(), cpu_seen["cc0"][0]
    assert ((hooked - ref).norm() / ref.norm()).item() < 0.03  # bf16 vs float32, as the other GPU tests
